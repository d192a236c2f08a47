"""Reverse a few words and title-case them: held out for few-shot composition, a blend of
reverse_words and title_case."""

import random

from .task import Fields, Task
from .words import ADJECTIVES, NOUNS


def make(rng: random.Random) -> tuple[Fields, str]:
    words = rng.sample(NOUNS + ADJECTIVES, rng.randint(3, 6))
    return {"words": " ".join(words)}, " ".join(w.capitalize() for w in reversed(words))


TEMPLATES = (
    "Reverse the order of these words and capitalise each one: {words}",
    "Write these words backwards in title case: {words}",
    "Reverse and capitalize: {words}",
    "Last word first, each capitalised: {words}",
    "Flip the word order and title-case the result: {words}",
    "Capitalize each word and reverse their order: {words}",
)
PARAPHRASES = ("Read these words from the end, capitalising every one: {words}",)

TASK = Task("reverse_title", "Reverse 3-6 words and title-case them.", make, TEMPLATES, PARAPHRASES)
