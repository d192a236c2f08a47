"""Count how many times one word occurs in a list: counting is hard for small LMs."""

import random

from .task import Example, Task
from .words import NOUNS


def make(rng: random.Random) -> Example:
    target, *others = rng.sample(NOUNS, 4)
    k = rng.randint(1, 6)
    items = [target] * k + [rng.choice(others) for _ in range(rng.randint(2, 6))]
    rng.shuffle(items)
    return f"How many times does '{target}' appear in: {', '.join(items)}", str(k)


TASK = Task("count_items", "Count the occurrences of one word in a comma-separated list.", make)
