"""Instruction views: more wordings of an adapter's stored examples, for fitting the learned gate.

A user's narrow adapter is often trained on one or two phrasings, so its stored examples
show the gate one instruction in one place ("Convert to title case: {phrase}"), and a
request worded any other way lands on a broader neighbour (measured: 36% of a two-template
title-case adapter's held-out paraphrases reached it; most went to sort_words). These views
re-frame each example without inventing task knowledge:

- the example is split into its constant *instruction* (the word prefix or suffix shared by
  many of the adapter's examples) and its varying *payload* (the rest). A one-word label in
  front of the data ("Words: a, b, c. List them from last to first.") stays with the
  payload, so the sentence after it is still found as the instruction;
- generic frames, written here and never taken from any task's templates, put the
  instruction after the payload (on its own line or in the same line), before it, in a
  polite request (imperatives only: "Please which order ...?" is not a request), or wrap the
  whole example in conversational filler. Only examples whose instruction sits cleanly at one
  end (ending in ':' or '?', or a sentence of its own) are re-ordered; the others are only
  wrapped;
- a payload that is a plain list of words is also written with the other separator (spaces
  or commas), in half of its re-ordered views: a list is the same list either way, and the
  held-out phrasings of word-list tasks use both. Measured offline it is a wash (two-phrasing
  reverse_words and sort_words adapters: -5 to +1 points of their paraphrases, the
  8-adapter library's paraphrase top-1 98.6% with it, 99.0% without). The label rule and the
  inline and request frames moved those four narrowed cases from 67/77/67/64% to
  71/80/67/65% of their paraphrases (same features, `routing.gate_features`). What they
  still lose goes to each other on phrasings whose meaning MiniLM does not catch ("from A
  to Z" sits nearer "reverse the order" than "alphabetically").

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
from dataclasses import dataclass

# Frames over (instruction, payload) for any instruction: after the data, before it, labelled.
# {instruction} ends in its own mark ('.' or '?'); {instruction_core} has none.
PLACE_FRAMES = (
    "{payload}\n{instruction}",
    "{instruction}\n\n{payload}",
    "{payload}\n\n{instruction}",
    "{payload}. {instruction}",
    "Task: {instruction}\nInput: {payload}",
    "Input: {payload}\n{instruction}",
)
# Frames that turn an imperative instruction into a request.
REQUEST_FRAMES = (
    "Please {instruction_lc}: {payload}",
    "Would you {instruction_lc}? {payload}",
    "I need help. {instruction_core}: {payload}",
    "{payload}. Please {instruction_lc}.",
    "Given {payload}, {instruction_lc}.",
)
REORDER_FRAMES = PLACE_FRAMES + REQUEST_FRAMES
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
# Part of the stored views' key: stored views are recomputed whenever the frames change (the
# last item names the splitting rules: bump it when `instruction_parts`/`other_separator` change).
VIEWS_VERSION = hashlib.sha256(json.dumps([PLACE_FRAMES, REQUEST_FRAMES, WRAP_FRAMES, MIN_SHARE, MIN_INSTRUCTION_WORDS,
                                           VIEWS_PER_EXAMPLE, "label+list2"]).encode()).hexdigest()[:8]
_WORD = r"[A-Za-z][A-Za-z'-]*"
_SPACED = re.compile(rf"{_WORD}(?: {_WORD}){{2,}}")
_COMMAS = re.compile(rf"{_WORD}(?:, {_WORD}){{2,}}")
_LABEL = re.compile(r"[A-Za-z]+: ")


@dataclass(frozen=True)
class Parts:
    """An example cut into its instruction (without its end mark) and its payload."""

    instruction: str
    payload: str
    question: bool


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


def _ends_sentence(text: str) -> bool:
    return text.rstrip()[-1:] in (".", "?", "!")


def instruction_parts(text: str, prefix: str, payload: str, suffix: str) -> Parts | None:
    """The instruction and payload when the instruction sits cleanly at one end of the example, else None."""
    if prefix and suffix:
        # A one-word label before the data ("Words: ...") belongs to the payload.
        if len(prefix.split()) < MIN_INSTRUCTION_WORDS and prefix.rstrip().endswith(":"):
            return instruction_parts(text, "", prefix + text[len(prefix):len(text) - len(suffix)], suffix)
        return None
    if prefix:
        clean = prefix.rstrip()[-1:] in (":", "?") or "\n" in text[len(prefix):len(text) - len(payload)]
        ins = prefix
    elif suffix:
        clean = _ends_sentence(payload) or "\n" in text[len(payload):len(text) - len(suffix)]
        ins = suffix
    else:
        return None
    ins = ins.strip()
    question = ins.endswith("?")
    core = ins.rstrip(":.!? ").strip()
    data = payload.strip()
    data = data[:-1].rstrip() if data[-1:] in (".", ",", ";") else data
    if not clean or len(core.split()) < MIN_INSTRUCTION_WORDS or not data:
        return None
    return Parts(core, data, question)


def other_separator(payload: str) -> str | None:
    """A plain word list (after an optional one-word label) written with the other separator
    ("a b c" <-> "a, b, c"), else None."""
    label, _, rest = payload.rpartition(": ") if _LABEL.match(payload) else ("", "", payload)
    label = label + ": " if label else ""
    if _SPACED.fullmatch(rest):
        return label + rest.replace(" ", ", ")
    if _COMMAS.fullmatch(rest):
        return label + rest.replace(", ", " ")
    return None


def _reframe(frame: str, parts: Parts, payload: str) -> str:
    ins = parts.instruction
    return frame.format(instruction=ins + ("?" if parts.question else "."), instruction_core=ins,
                        instruction_lc=ins[0].lower() + ins[1:], payload=payload)


def example_views(examples: list[str], per: int = VIEWS_PER_EXAMPLE, seed: int = 0) -> list[tuple[int, str]]:
    """Up to `per` re-framed views of each example, as (index of the example, view)."""
    rng = random.Random(seed)
    out = []
    for i, (text, (p, pay, s)) in enumerate(zip(examples, split_instruction(examples))):
        parts = instruction_parts(text, p, pay, s)
        frames = [("wrap", f) for f in WRAP_FRAMES]
        if parts is not None:
            frames += [("reorder", f) for f in (PLACE_FRAMES if parts.question else REORDER_FRAMES)]
        for kind, frame in rng.sample(frames, min(per, len(frames))):
            if kind == "wrap":
                out.append((i, frame.format(text=text)))
                continue
            payload = parts.payload
            other = other_separator(payload)
            if other is not None and rng.random() < 0.5:
                payload = other
            out.append((i, _reframe(frame, parts, payload)))
    return out


def generic_views(prompts: list[str], seed: int = 0) -> list[tuple[int, str]]:
    """One wrapped view of each generic prompt, as (index of the prompt, view)."""
    rng = random.Random(seed)
    return [(i, rng.choice(WRAP_FRAMES).format(text=p)) for i, p in enumerate(prompts)]
