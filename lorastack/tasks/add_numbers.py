"""Multi-digit addition: carries make it more than pattern copying."""

import random

from .task import Fields, Task


def make(rng: random.Random) -> tuple[Fields, str]:
    a, b = rng.randint(10, 999), rng.randint(10, 999)
    return {"a": a, "b": b}, str(a + b)


TEMPLATES = (
    "What is {a} + {b}?",
    "Add {a} and {b}.",
    "{a} plus {b} equals what?",
    "Compute the sum of {a} and {b}.",
    "Calculate {a} + {b}",
    "What do you get when you add {b} to {a}?",
)
PARAPHRASES = (
    "I had {a} coins and found {b} more. How many coins do I have now?",
    "Find the total of {a} and {b}.",
    "A shop sold {a} apples in the morning and {b} in the afternoon. How many apples did it sell?",
)

TASK = Task("add_numbers", "Add two numbers of 2-3 digits.", make, TEMPLATES, PARAPHRASES)
