"""Decode a word Caesar-shifted by one letter (b->a): character-level work under BPE."""

import random

from .task import Example, Task
from .words import NOUNS


def shift(word: str, k: int) -> str:
    return "".join(chr((ord(c) - 97 + k) % 26 + 97) for c in word)


def make(rng: random.Random) -> Example:
    words = rng.sample(NOUNS, rng.randint(1, 2))
    coded = " ".join(shift(w, 1) for w in words)
    return f"Decode this Caesar cipher (shift 1): {coded}", " ".join(words)


TASK = Task("caesar_decode", "Decode 1-2 words Caesar-shifted forward by one letter.", make)
