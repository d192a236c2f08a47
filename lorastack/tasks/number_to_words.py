"""Spell out an integer 0-999 in English words."""

import random

from .task import Fields, Task

ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def spell(n: int) -> str:
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else "-" + ONES[n % 10])
    rest = n % 100
    return f"{ONES[n // 100]} hundred" + ("" if rest == 0 else " " + spell(rest))


def make(rng: random.Random) -> tuple[Fields, str]:
    n = rng.randint(0, 999)
    return {"n": n}, spell(n)


TEMPLATES = (
    "Write the number {n} in words",
    "{n}\nSpell this number out in English.",
    "How do you say {n} in words?",
    "Spell out {n}.",
    "Convert {n} to English words.",
    "Write out the number {n} as you would on a cheque.",
)
PARAPHRASES = (
    "My house number is {n}. How is that written in letters?",
    "Express {n} in words, please.",
    "What is {n} spelled with letters instead of digits?",
)

TASK = Task("number_to_words", "Spell out an integer from 0 to 999 in English words.", make, TEMPLATES, PARAPHRASES)
