"""Rewrite an ISO date (2021-03-07) as 'March 7, 2021': month lookup plus reordering."""

import random

from .task import Example, Task
from .words import MONTHS


def make(rng: random.Random) -> Example:
    y, m, d = rng.randint(1950, 2049), rng.randint(1, 12), rng.randint(1, 28)
    return f"Rewrite the date {y:04d}-{m:02d}-{d:02d} in words", f"{MONTHS[m - 1]} {d}, {y}"


TASK = Task("date_format", "Rewrite an ISO date (YYYY-MM-DD) as 'Month D, YYYY'.", make)
