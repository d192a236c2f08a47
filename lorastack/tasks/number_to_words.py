"""Spell out an integer 0-999 in English words."""

import random

from .task import Example, Task

ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def spell(n: int) -> str:
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else "-" + ONES[n % 10])
    rest = n % 100
    return f"{ONES[n // 100]} hundred" + ("" if rest == 0 else " " + spell(rest))


def make(rng: random.Random) -> Example:
    n = rng.randint(0, 999)
    return f"Write the number {n} in words", spell(n)


TASK = Task("number_to_words", "Spell out an integer from 0 to 999 in English words.", make)
