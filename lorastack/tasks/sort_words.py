"""Sort words alphabetically: needs comparing first letters across the whole list."""

import random

from .task import Fields, Task
from .words import NOUNS


def make(rng: random.Random) -> tuple[Fields, str]:
    words = rng.sample(NOUNS, rng.randint(3, 6))
    return {"words": " ".join(words), "words_comma": ", ".join(words)}, " ".join(sorted(words))


TEMPLATES = (
    "Sort these words alphabetically: {words}",
    "{words}\nArrange these words in alphabetical order.",
    "Put the following words in A-to-Z order: {words_comma}",
    "Alphabetize this list: {words}",
    "Which order do these words go in alphabetically? {words}",
    "Order the words {words} as they would appear in a dictionary.",
)
PARAPHRASES = (
    "Here are some words: {words_comma}. Rearrange them from A to Z.",
    "List {words} sorted by their first letters, alphabetical.",
    "{words} -- can you sort them the way a dictionary would?",
)

TASK = Task("sort_words", "Sort 3-6 words alphabetically.", make, TEMPLATES, PARAPHRASES)
