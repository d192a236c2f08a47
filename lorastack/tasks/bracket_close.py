"""Close an open bracket sequence: needs a stack, the classic Dyck-language task."""

import random

from .task import Fields, Task

PAIRS = {"(": ")", "[": "]", "{": "}", "<": ">"}


def make(rng: random.Random) -> tuple[Fields, str]:
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
    return {"seq": " ".join(seq)}, " ".join(closing)


TEMPLATES = (
    "Close the brackets: {seq}",
    "{seq}\nWrite the brackets that close this sequence.",
    "Complete the bracket sequence so it is balanced: {seq}",
    "Which closing brackets finish {seq}?",
    "Balance these open brackets: {seq}",
    "Finish the sequence {seq} with matching closers.",
)
PARAPHRASES = (
    "My code has {seq} open. What do I type to close everything?",
    "Give the closing parentheses needed for: {seq}",
    "{seq} -- add the missing closing brackets.",
)

TASK = Task("bracket_close", "Write the closing brackets that balance an open sequence.", make, TEMPLATES, PARAPHRASES)
