"""Close an open bracket sequence: needs a stack, the classic Dyck-language task."""

import random

from .task import Example, Task

PAIRS = {"(": ")", "[": "]", "{": "}", "<": ">"}


def make(rng: random.Random) -> Example:
    stack: list[str] = []
    seq: list[str] = []
    for _ in range(rng.randint(3, 8)):
        if stack and rng.random() < 0.35:
            seq.append(PAIRS[stack.pop()])
        else:
            b = rng.choice(list(PAIRS))
            stack.append(b)
            seq.append(b)
    if not stack:
        b = rng.choice(list(PAIRS))
        stack.append(b)
        seq.append(b)
    closing = [PAIRS[b] for b in reversed(stack)]
    return f"Close the brackets: {' '.join(seq)}", " ".join(closing)


TASK = Task("bracket_close", "Write the closing brackets that balance an open sequence.", make)
