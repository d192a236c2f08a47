"""Instruction views: more wordings of an adapter's stored examples, for fitting the learned gate.

A user's narrow adapter is often trained on one or two phrasings, so its stored examples
show the gate one instruction in one place ("Convert to title case: {phrase}"), and a
request worded any other way lands on a broader neighbour (measured: 36% of a two-template
title-case adapter's held-out paraphrases reached it; most went to sort_words). These views
re-frame each example without inventing task knowledge:

- the example is split into its constant *instruction* (the word prefix or suffix shared by
  many of the adapter's examples) and its varying *payload* (the rest);
- generic frames, written here and never taken from any task's templates, put the
  instruction after the payload, on its own line, in a polite request, or wrap the whole
  example in conversational filler. Only examples whose instruction sits cleanly at one end
  (ending in ':' or '?', or on its own line) are re-ordered; the others are only wrapped.

Wrappers say nothing about the task, so `generic_views` wraps the generic "no expert"
prompts the same way: a "Thanks!" must not pull a request towards an adapter.
Payload-alone views were tried and lost (a bare word list is every word task's payload:
paraphrase top-1 fell from 95% to 87% on the 8-adapter library).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter

# Frames over (instruction, payload): the instruction moved after the data, alone on a line, asked politely.
REORDER_FRAMES = (
    "{payload}\n{instruction}",
    "{instruction}\n\n{payload}",
    "{payload}\n\n{instruction}",
    "Please {instruction_lc}: {payload}",
    "Would you {instruction_lc}? {payload}",
    "I need help. {instruction}: {payload}",
    "Task: {instruction}\nInput: {payload}",
)
# Frames over a whole request (an example or a generic prompt): conversational filler only.
WRAP_FRAMES = (
    "Please help me with this. {text}",
    "{text} Thanks!",
    "Could you do this for me? {text}",
    "Quick question: {text}",
)
MIN_SHARE = 0.1  # an instruction is a word prefix/suffix shared by at least this share of the examples
MIN_INSTRUCTION_WORDS = 2
VIEWS_PER_EXAMPLE = 2  # 3 measured the same
# Part of the stored views' key: stored views are recomputed whenever the frames change.
VIEWS_VERSION = hashlib.sha256(json.dumps([REORDER_FRAMES, WRAP_FRAMES, MIN_SHARE, MIN_INSTRUCTION_WORDS,
                                           VIEWS_PER_EXAMPLE]).encode()).hexdigest()[:8]


def _words(text: str) -> list[tuple[str, str]]:
    """(whitespace before, word) pairs, so a prefix or suffix re-joins exactly."""
    parts = re.split(r"(\s+)", text)
    out, sep = [], ""
    for i, p in enumerate(parts):
        if i % 2:
            sep = p
        elif p:
            out.append((sep, p))
            sep = ""
    return out


def _join(words: list[tuple[str, str]]) -> str:
    return "".join((s if i else "") + w for i, (s, w) in enumerate(words))


def split_instruction(examples: list[str], min_share: float = MIN_SHARE) -> list[tuple[str, str, str]]:
    """Per example: (prefix, payload, suffix), where prefix and suffix are the longest word
    prefix / suffix that at least `min_share` of the examples (and at least 2) share."""
    need = max(2, int(min_share * len(examples) + 0.999))
    split = [_words(t) for t in examples]
    key = lambda ws: tuple(w for _, w in ws)  # noqa: E731
    pre: Counter = Counter()
    suf: Counter = Counter()
    for ws in split:
        for k in range(1, len(ws)):
            pre[key(ws[:k])] += 1
            suf[key(ws[-k:])] += 1
    out = []
    for ws in split:
        p = max((k for k in range(1, len(ws)) if pre[key(ws[:k])] >= need), default=0)
        s = max((k for k in range(1, len(ws) - p) if suf[key(ws[-k:])] >= need), default=0)
        out.append((_join(ws[:p]), _join(ws[p:len(ws) - s]), _join(ws[len(ws) - s:])))
    return out


def _instruction(text: str, prefix: str, payload: str, suffix: str) -> str | None:
    """The instruction when it sits cleanly at one end of the example, else None."""
    if prefix and not suffix:
        sep_newline = "\n" in text[len(prefix):len(text) - len(payload)]
        clean = prefix.rstrip()[-1:] in (":", "?") or sep_newline
    elif suffix and not prefix:
        sep_newline = "\n" in text[len(payload):len(text) - len(suffix)]
        clean = payload.rstrip()[-1:] in (".", "?", "!") or sep_newline
    else:
        return None
    ins = (prefix or suffix).strip().rstrip(":").strip()
    return ins if clean and len(ins.split()) >= MIN_INSTRUCTION_WORDS and payload.strip() else None


def example_views(examples: list[str], per: int = VIEWS_PER_EXAMPLE, seed: int = 0) -> list[tuple[int, str]]:
    """Up to `per` re-framed views of each example, as (index of the example, view)."""
    rng = random.Random(seed)
    out = []
    for i, (text, (p, pay, s)) in enumerate(zip(examples, split_instruction(examples))):
        ins = _instruction(text, p, pay, s)
        frames = [("wrap", f) for f in WRAP_FRAMES] + ([("reorder", f) for f in REORDER_FRAMES] if ins else [])
        for kind, frame in rng.sample(frames, min(per, len(frames))):
            if kind == "wrap":
                out.append((i, frame.format(text=text)))
            else:
                out.append((i, frame.format(instruction=ins, instruction_lc=ins[0].lower() + ins[1:], payload=pay.strip())))
    return out


def generic_views(prompts: list[str], seed: int = 0) -> list[tuple[int, str]]:
    """One wrapped view of each generic prompt, as (index of the prompt, view)."""
    rng = random.Random(seed)
    return [(i, rng.choice(WRAP_FRAMES).format(text=p)) for i, p in enumerate(prompts)]
