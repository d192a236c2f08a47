"""Count how many times one word occurs in a list: counting is hard for small LMs."""

import random

from .task import Fields, Task
from .words import NOUNS


def make(rng: random.Random) -> tuple[Fields, str]:
    target, *others = rng.sample(NOUNS, 4)
    k = rng.randint(1, 6)
    items = [target] * k + [rng.choice(others) for _ in range(rng.randint(2, 6))]
    rng.shuffle(items)
    return {"target": target, "items": ", ".join(items)}, str(k)


TEMPLATES = (
    "How many times does '{target}' appear in: {items}",
    "{items}\nCount the occurrences of '{target}'.",
    "Count how often {target} occurs in this list: {items}",
    "In the list {items}, how many are '{target}'?",
    "Number of '{target}' in: {items}?",
    "Tally the word {target} in {items}",
)
PARAPHRASES = (
    "My basket holds {items}. How many {target} items are there?",
    "How often is '{target}' mentioned here: {items}",
    "{items} -- how many of these say {target}?",
)

TASK = Task("count_items", "Count the occurrences of one word in a comma-separated list.", make, TEMPLATES, PARAPHRASES)
