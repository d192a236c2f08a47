"""Reverse the order of a few words: trivial to state, and a 135M model will not do it zero-shot."""

import random

from .task import Fields, Task
from .words import ADJECTIVES, NOUNS


def make(rng: random.Random) -> tuple[Fields, str]:
    words = rng.sample(NOUNS + ADJECTIVES, rng.randint(3, 6))
    return {"words": " ".join(words), "words_comma": ", ".join(words)}, " ".join(reversed(words))


TEMPLATES = (
    "Reverse the order of these words: {words}",
    "{words}\nWrite these words in reverse order.",
    "Put the following words backwards, last one first: {words}",
    "Words: {words_comma}. List them from last to first.",
    "Can you flip the order of the words in \"{words}\"?",
    "Read this list backwards and write it out: {words}",
)
PARAPHRASES = (
    "I have the words {words}. Give them to me in the opposite order.",
    "Starting from the end, repeat each word of this sequence: {words}",
    "{words_comma} -- say these words back in reverse.",
)

TASK = Task("reverse_words", "Reverse the order of 3-6 words.", make, TEMPLATES, PARAPHRASES)
