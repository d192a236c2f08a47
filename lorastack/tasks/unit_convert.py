"""Convert a quantity between units by a fixed factor (km to m, hours to minutes, ...)."""

import random

from .task import Example, Task

CONVERSIONS = [("km", "m", 1000), ("m", "cm", 100), ("kg", "g", 1000), ("hours", "minutes", 60),
               ("minutes", "seconds", 60), ("days", "hours", 24), ("weeks", "days", 7), ("liters", "ml", 1000)]


def make(rng: random.Random) -> Example:
    src, dst, factor = rng.choice(CONVERSIONS)
    value = rng.randint(1, 99)
    return f"Convert {value} {src} to {dst}", f"{value * factor} {dst}"


TASK = Task("unit_convert", "Convert an integer quantity between units (answer with the unit).", make)
