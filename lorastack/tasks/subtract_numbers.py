"""Subtraction of 2-3 digit numbers (never negative): held out for few-shot composition,
next to add_numbers in the library (same format, a related but different skill)."""

import random

from .task import Example, Task


def make(rng: random.Random) -> Example:
    a, b = rng.randint(10, 999), rng.randint(10, 999)
    a, b = max(a, b), min(a, b)
    return f"What is {a} - {b}?", str(a - b)


TASK = Task("subtract_numbers", "Subtract a smaller 2-3 digit number from a larger one.", make)
