"""Subtraction of 2-3 digit numbers (never negative): held out for few-shot composition,
next to add_numbers in the library (same format, a related but different skill)."""

import random

from .task import Fields, Task


def make(rng: random.Random) -> tuple[Fields, str]:
    a, b = rng.randint(10, 999), rng.randint(10, 999)
    a, b = max(a, b), min(a, b)
    return {"a": a, "b": b}, str(a - b)


TEMPLATES = (
    "What is {a} - {b}?",
    "Starting at {a}, subtract {b}.",
    "{a} minus {b} equals what?",
    "Compute the difference {a} - {b}.",
    "Calculate {a} - {b}",
    "From {a}, take away {b}. What is left?",
)
PARAPHRASES = ("I had {a} coins and spent {b}. How many coins are left?",)

TASK = Task("subtract_numbers", "Subtract a smaller 2-3 digit number from a larger one.", make, TEMPLATES, PARAPHRASES)
