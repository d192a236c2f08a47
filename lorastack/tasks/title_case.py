"""Title-case a lowercase phrase: a pure surface rewrite, token by token."""

import random

from .task import Example, Task
from .words import ADJECTIVES, NOUNS


def make(rng: random.Random) -> Example:
    words = [rng.choice(ADJECTIVES + NOUNS) for _ in range(rng.randint(3, 7))]
    phrase = " ".join(words)
    return f"Convert to title case: {phrase}", " ".join(w.capitalize() for w in words)


TASK = Task("title_case", "Capitalise every word of a 3-7 word lowercase phrase.", make)
