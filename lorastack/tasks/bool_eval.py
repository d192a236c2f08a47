"""Evaluate a short boolean expression (not / and / or, Python precedence)."""

import random

from .task import Example, Task


def _term(rng: random.Random) -> str:
    value = rng.choice(["True", "False"])
    return f"not {value}" if rng.random() < 0.35 else value


def make(rng: random.Random) -> Example:
    parts = [_term(rng)]
    for _ in range(rng.randint(1, 3)):
        parts += [rng.choice(["and", "or"]), _term(rng)]
    expr = " ".join(parts)
    return f"Evaluate the boolean expression: {expr}", str(eval(expr, {"__builtins__": {}}, {}))  # noqa: S307 - our own grammar


TASK = Task("bool_eval", "Evaluate a boolean expression of True/False with not/and/or.", make)
