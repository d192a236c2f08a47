"""Title-case a lowercase phrase: a pure surface rewrite, token by token."""

import random

from .task import Fields, Task
from .words import ADJECTIVES, NOUNS


def make(rng: random.Random) -> tuple[Fields, str]:
    words = [rng.choice(ADJECTIVES + NOUNS) for _ in range(rng.randint(3, 7))]
    return {"phrase": " ".join(words)}, " ".join(w.capitalize() for w in words)


TEMPLATES = (
    "Convert to title case: {phrase}",
    "{phrase}\nCapitalize the first letter of every word.",
    "Make every word start with a capital letter: {phrase}",
    "Rewrite \"{phrase}\" in title case.",
    "Title-case this phrase: {phrase}",
    "Write {phrase} with each word capitalized.",
)
PARAPHRASES = (
    "Turn the phrase '{phrase}' into a headline with capitalised words.",
    "Give me this with upper-case initials on each word: {phrase}",
    "{phrase} -- please capitalise it like a book title.",
)

TASK = Task("title_case", "Capitalise every word of a 3-7 word lowercase phrase.", make, TEMPLATES, PARAPHRASES)
