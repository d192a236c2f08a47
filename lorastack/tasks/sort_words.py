"""Sort words alphabetically: needs comparing first letters across the whole list."""

import random

from .task import Example, Task
from .words import NOUNS


def make(rng: random.Random) -> Example:
    words = rng.sample(NOUNS, rng.randint(3, 6))
    return f"Sort these words alphabetically: {' '.join(words)}", " ".join(sorted(words))


TASK = Task("sort_words", "Sort 3-6 words alphabetically.", make)
