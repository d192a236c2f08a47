"""The Task type: a seeded generator of Dataset records plus the scorer that judges answers.

Train and test streams are disjoint by construction: every prompt is assigned to a split
by a hash of its text, so no test prompt can ever appear in training data, whatever seeds
or sizes are asked for.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import LorastackError

Example = tuple[str, str]  # (prompt, completion)
SPLITS = ("train", "test")
TEST_SHARE = 0.2  # fraction of the prompt space reserved for the test split


def normalize(text: str) -> str:
    """Whitespace-insensitive comparison: models often add a trailing space or newline."""
    return " ".join(text.split())


def exact_match(output: str, record: dict[str, Any]) -> bool:
    return normalize(output) == normalize(record["completion"])


def split_of(prompt: str) -> str:
    """Which split a prompt belongs to, forever (a stable hash, not Python's salted one)."""
    h = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "big")
    return "test" if (h % 10_000) < TEST_SHARE * 10_000 else "train"


def stable_seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()[:8], "big")


@dataclass(frozen=True)
class Task:
    """A built-in task family; `make_example` draws one (prompt, completion) from `rng`."""

    name: str
    description: str
    make_example: Callable[[random.Random], Example]
    scorer: Callable[[str, dict[str, Any]], bool] = exact_match

    def score(self, output: str, record: dict[str, Any]) -> bool:
        return self.scorer(output, record)

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
            prompt, completion = self.make_example(rng)
            if split_of(prompt) != split:
                continue
            if prompt in seen and misses < 200 * max(n, 1):
                misses += 1
                continue
            seen.add(prompt)
            out.append({"prompt": prompt, "completion": completion, "task": self.name})
        return out
