"""Decode a word Caesar-shifted by one letter (b->a): character-level work under BPE."""

import random

from .task import Fields, Task
from .words import NOUNS


def shift(word: str, k: int) -> str:
    return "".join(chr((ord(c) - 97 + k) % 26 + 97) for c in word)


def make(rng: random.Random) -> tuple[Fields, str]:
    words = rng.sample(NOUNS, rng.randint(1, 2))
    return {"coded": " ".join(shift(w, 1) for w in words)}, " ".join(words)


TEMPLATES = (
    "Decode this Caesar cipher (shift 1): {coded}",
    "{coded}\nEach letter was moved forward by one. Decode it.",
    "Shift every letter of {coded} back by one.",
    "Decipher {coded} (Caesar shift of 1).",
    "Undo a shift-by-one cipher: {coded}",
    "What word is {coded} with each letter moved back one place?",
)
PARAPHRASES = (
    "A friend sent me the secret message {coded}, made by shifting letters one step. What does it say?",
    "Decrypt {coded} with a Caesar key of 1.",
    "{coded} -- decode this shifted text.",
)

TASK = Task("caesar_decode", "Decode 1-2 words Caesar-shifted forward by one letter.", make, TEMPLATES, PARAPHRASES)
