"""Evaluate a short boolean expression (not / and / or, Python precedence)."""

import random

from .task import Fields, Task


def _term(rng: random.Random) -> str:
    value = rng.choice(["True", "False"])
    return f"not {value}" if rng.random() < 0.35 else value


def make(rng: random.Random) -> tuple[Fields, str]:
    parts = [_term(rng)]
    for _ in range(rng.randint(1, 3)):
        parts += [rng.choice(["and", "or"]), _term(rng)]
    expr = " ".join(parts)
    return {"expr": expr}, str(eval(expr, {"__builtins__": {}}, {}))  # noqa: S307 - our own grammar


TEMPLATES = (
    "Evaluate the boolean expression: {expr}",
    "{expr}\nIs this expression True or False?",
    "What does {expr} evaluate to?",
    "Compute the truth value of: {expr}",
    "Simplify to True or False: {expr}",
    "Is `{expr}` true or false?",
)
PARAPHRASES = (
    "In Python, what is the result of {expr}?",
    "Work out whether {expr} holds.",
    "{expr} -- answer True or False.",
)

TASK = Task("bool_eval", "Evaluate a boolean expression of True/False with not/and/or.", make, TEMPLATES, PARAPHRASES)
