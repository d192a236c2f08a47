"""The Task type: a seeded generator of Dataset records plus the scorer that judges answers.

A task draws its *content* (the words, the date, the numbers) and its answer from a seeded
generator, and words the request with one of several phrasings (templates). Real users do
not phrase requests like our training data, so every family has several templates with
different wording and word order (some with the instruction after the data), split in two:

- `templates` are used by the `train` and `test` splits (in-template evaluation);
- `paraphrases` are held out: only the `paraphrase` split uses them, so an adapter or a
  router is measured on phrasings it never saw.

Train and test streams are disjoint by construction: every train/test prompt is assigned
to a split by a hash of its text, so no test prompt can ever appear in training data,
whatever seeds or sizes are asked for.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import LorastackError

Example = tuple[str, str]  # (prompt, completion)
Fields = dict[str, Any]  # the values a template is filled with
SPLITS = ("train", "test", "paraphrase")
TEST_SHARE = 0.2  # fraction of the (in-template) prompt space reserved for the test split
MIN_TEMPLATES = 6  # train templates per family: enough variety that routing learns the task, not a sentence


def normalize(text: str) -> str:
    """Whitespace-insensitive comparison: models often add a trailing space or newline."""
    return " ".join(text.split())


def exact_match(output: str, record: dict[str, Any]) -> bool:
    return normalize(output) == normalize(record["completion"])


def split_of(prompt: str) -> str:
    """Which split an in-template prompt belongs to, forever (a stable hash, not Python's salted one)."""
    h = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "big")
    return "test" if (h % 10_000) < TEST_SHARE * 10_000 else "train"


def stable_seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()[:8], "big")


@dataclass(frozen=True)
class Task:
    """A built-in task family.

    `make_fields(rng)` draws one request's content and its answer; a template (a
    `str.format` string over those fields) turns the content into a prompt.
    """

    name: str
    description: str
    make_fields: Callable[[random.Random], tuple[Fields, str]]
    templates: tuple[str, ...]
    paraphrases: tuple[str, ...]
    scorer: Callable[[str, dict[str, Any]], bool] = exact_match

    def __post_init__(self) -> None:
        if len(self.templates) < MIN_TEMPLATES or not self.paraphrases:
            raise ValueError(f"task {self.name}: needs >= {MIN_TEMPLATES} train templates and some held-out paraphrases")
        if set(self.templates) & set(self.paraphrases):
            raise ValueError(f"task {self.name}: a held-out paraphrase is also a train template")

    def score(self, output: str, record: dict[str, Any]) -> bool:
        return self.scorer(output, record)

    def templates_for(self, split: str) -> tuple[str, ...]:
        """The phrasings a split draws from: held-out ones only for `paraphrase`."""
        return self.paraphrases if split == "paraphrase" else self.templates

    def make_example(self, rng: random.Random, split: str = "train") -> tuple[str, str, int]:
        """One (prompt, completion, template index within the split's templates)."""
        fields, completion = self.make_fields(rng)
        pool = self.templates_for(split)
        i = rng.randrange(len(pool))
        return pool[i].format(**fields), completion, i

    def generate(self, n: int, split: str = "train", seed: int = 0) -> list[dict[str, Any]]:
        """`n` records of `split`; the same (n, split, seed) always gives the same records.

        Prompts are unique within a call while the prompt space allows it; a small space
        (after many draws without a new prompt) falls back to repeating prompts.
        """
        if split not in SPLITS:
            raise LorastackError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        if n < 0:
            raise LorastackError(f"n must be >= 0, got {n}")
        rng = random.Random(stable_seed(self.name, split, seed))
        out: list[dict[str, Any]] = []
        seen: set[str] = set()
        misses = 0
        while len(out) < n:
            prompt, completion, template = self.make_example(rng, split)
            if split != "paraphrase" and split_of(prompt) != split:
                continue
            if prompt in seen and misses < 200 * max(n, 1):
                misses += 1
                continue
            seen.add(prompt)
            out.append({"prompt": prompt, "completion": completion, "task": self.name, "template": template})
        return out
