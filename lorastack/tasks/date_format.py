"""Rewrite an ISO date (2021-03-07) as 'March 7, 2021': month lookup plus reordering."""

import random

from .task import Fields, Task
from .words import MONTHS


def make(rng: random.Random) -> tuple[Fields, str]:
    y, m, d = rng.randint(1950, 2049), rng.randint(1, 12), rng.randint(1, 28)
    return {"iso": f"{y:04d}-{m:02d}-{d:02d}"}, f"{MONTHS[m - 1]} {d}, {y}"


TEMPLATES = (
    "Rewrite the date {iso} in words",
    "{iso}\nWrite this date out with the month name.",
    "Convert the ISO date {iso} to 'Month D, YYYY' format.",
    "Spell out the date {iso} using the month's name.",
    "How would you write {iso} in long form?",
    "Format this date for a letter: {iso}",
)
PARAPHRASES = (
    "The invoice is dated {iso}. Write that date the way people read it.",
    "Turn {iso} into a human-friendly date.",
    "What is {iso} written with the month spelled out?",
)

TASK = Task("date_format", "Rewrite an ISO date (YYYY-MM-DD) as 'Month D, YYYY'.", make, TEMPLATES, PARAPHRASES)
