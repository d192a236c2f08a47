"""Convert a quantity between units by a fixed factor (km to m, hours to minutes, ...)."""

import random

from .task import Fields, Task

CONVERSIONS = [("km", "m", 1000), ("m", "cm", 100), ("kg", "g", 1000), ("hours", "minutes", 60),
               ("minutes", "seconds", 60), ("days", "hours", 24), ("weeks", "days", 7), ("liters", "ml", 1000)]


def make(rng: random.Random) -> tuple[Fields, str]:
    src, dst, factor = rng.choice(CONVERSIONS)
    value = rng.randint(1, 99)
    return {"value": value, "src": src, "dst": dst}, f"{value * factor} {dst}"


TEMPLATES = (
    "Convert {value} {src} to {dst}",
    "How many {dst} are in {value} {src}?",
    "{value} {src} is how many {dst}?",
    "Express {value} {src} in {dst}.",
    "Change {value} {src} into {dst}.",
    "What is {value} {src} when measured in {dst}?",
)
PARAPHRASES = (
    "A recipe needs {value} {src}. How much is that in {dst}?",
    "I have {value} {src}; give it to me in {dst}.",
    "Please turn {value} {src} into {dst}.",
)

TASK = Task("unit_convert", "Convert an integer quantity between units (answer with the unit).", make, TEMPLATES, PARAPHRASES)
