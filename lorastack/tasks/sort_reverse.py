"""Sort words in reverse alphabetical order: held out for few-shot composition, a blend of
sort_words and reverse_words (sorting, then reversing the sorted list)."""

import random

from .task import Fields, Task
from .words import NOUNS


def make(rng: random.Random) -> tuple[Fields, str]:
    words = rng.sample(NOUNS, rng.randint(3, 6))
    return {"words": " ".join(words)}, " ".join(sorted(words, reverse=True))


TEMPLATES = (
    "Sort these words in reverse alphabetical order: {words}",
    "Sort from Z to A: {words}",
    "Put these words in descending alphabetical order: {words}",
    "Alphabetize backwards: {words}",
    "Order these words from last to first alphabetically: {words}",
    "Reverse-alphabetize this list: {words}",
)
PARAPHRASES = ("List these words the opposite way a dictionary would: {words}",)

TASK = Task("sort_reverse", "Sort 3-6 words in reverse alphabetical order.", make, TEMPLATES, PARAPHRASES)
