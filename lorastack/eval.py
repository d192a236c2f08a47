"""Exact-match evaluation of a route on a dataset, with per-example results kept.

Per-example rows are what make a low number debuggable, so they are always returned and
the CLI writes them to a JSONL file next to the summary.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from .data import Record, messages_of, prompt_text
from .engine.generate import Generator, Sampling
from .route import Route

Scorer = Callable[[str, Record], bool]


@dataclass
class EvalResult:
    model: str
    n: int
    correct: int
    seconds: float
    completion_tokens: int
    rows: list[dict[str, Any]] = field(default_factory=list, repr=False)

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "n": self.n,
            "correct": self.correct,
            "accuracy": round(self.accuracy, 4),
            "seconds": round(self.seconds, 2),
            "tokens_per_s": round(self.completion_tokens / self.seconds, 1) if self.seconds else None,
        }


def scorer_for(record: Record) -> Scorer:
    """A record tagged with a built-in task is scored by that task; anything else by exact match."""
    from .tasks import TASKS, exact_match

    task = TASKS.get(record.get("task", ""))
    return task.score if task else exact_match


def max_new_tokens(generator: Generator, records: list[Record]) -> int:
    """Room for the longest reference answer plus slack: answers longer than that are wrong anyway."""
    tok = generator.base.tokenizer
    longest = max(len(tok(r["completion"], add_special_tokens=False)["input_ids"]) for r in records)
    return min(512, longest + 8)


def evaluate(
    generator: Generator,
    route: Route,
    records: list[Record],
    scorer: Scorer | None = None,
    batch_size: int = 32,
    max_tokens: int | None = None,
    progress: bool = True,
    label: str | None = None,
) -> EvalResult:
    """Greedy-decode every record under `route` and score it."""
    sampling = Sampling(max_tokens=max_tokens or max_new_tokens(generator, records))
    t0 = time.perf_counter()
    name = label or str(route)
    with tqdm(total=len(records), desc=f"eval {name}", unit="ex", disable=not progress, leave=False) as bar:
        outs = generator.generate([messages_of(r) for r in records], route, sampling, batch_size=batch_size, on_batch=bar.update)
    seconds = time.perf_counter() - t0
    rows, correct = [], 0
    for r, o in zip(records, outs):
        ok = bool((scorer or scorer_for(r))(o.text, r))
        correct += ok
        rows.append({"prompt": prompt_text(r), "expected": r["completion"], "output": o.text, "correct": ok, **({"task": r["task"]} if "task" in r else {})})
    return EvalResult(
        model=name,
        n=len(records),
        correct=correct,
        seconds=seconds,
        completion_tokens=sum(o.completion_tokens for o in outs),
        rows=rows,
    )
