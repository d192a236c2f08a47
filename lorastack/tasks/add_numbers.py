"""Multi-digit addition: carries make it more than pattern copying."""

import random

from .task import Example, Task


def make(rng: random.Random) -> Example:
    a, b = rng.randint(10, 999), rng.randint(10, 999)
    return f"What is {a} + {b}?", str(a + b)


TASK = Task("add_numbers", "Add two numbers of 2-3 digits.", make)
