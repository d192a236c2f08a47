"""Reverse a few words and title-case them: held out for few-shot composition, a blend of
reverse_words and title_case."""

import random

from .task import Example, Task
from .words import ADJECTIVES, NOUNS


def make(rng: random.Random) -> Example:
    words = rng.sample(NOUNS + ADJECTIVES, rng.randint(3, 6))
    return (f"Reverse the order of these words and capitalise each one: {' '.join(words)}",
            " ".join(w.capitalize() for w in reversed(words)))


TASK = Task("reverse_title", "Reverse 3-6 words and title-case them.", make)
