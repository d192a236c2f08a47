"""Reverse the order of a few words: trivial to state, and a 135M model will not do it zero-shot."""

import random

from .task import Example, Task
from .words import ADJECTIVES, NOUNS


def make(rng: random.Random) -> Example:
    words = rng.sample(NOUNS + ADJECTIVES, rng.randint(3, 6))
    return f"Reverse the order of these words: {' '.join(words)}", " ".join(reversed(words))


TASK = Task("reverse_words", "Reverse the order of 3-6 words.", make)
