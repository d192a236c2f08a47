"""Sort words in reverse alphabetical order: held out for few-shot composition, a blend of
sort_words and reverse_words (sorting, then reversing the sorted list)."""

import random

from .task import Example, Task
from .words import NOUNS


def make(rng: random.Random) -> Example:
    words = rng.sample(NOUNS, rng.randint(3, 6))
    return f"Sort these words in reverse alphabetical order: {' '.join(words)}", " ".join(sorted(words, reverse=True))


TASK = Task("sort_reverse", "Sort 3-6 words in reverse alphabetical order.", make)
