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
from .engine.sampling import Generation, Sampling
from .errors import LorastackError
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

    def by_route(self) -> dict[str, dict[str, Any]]:
        """Accuracy per route that answered (for routed evaluations: which expert, or the
        base after an abstention, earned or lost the points)."""
        groups: dict[str, list[bool]] = {}
        for row in self.rows:
            groups.setdefault(row["route"], []).append(bool(row["correct"]))
        return {route: {"n": len(v), "correct": sum(v), "accuracy": round(sum(v) / len(v), 4)}
                for route, v in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))}

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


def max_new_tokens(base: Any, records: list[Record]) -> int:
    """Room for the longest reference answer plus slack: answers longer than that are wrong anyway."""
    tok = base.tokenizer
    longest = max(len(tok(r["completion"], add_special_tokens=False)["input_ids"]) for r in records)
    return min(512, longest + 8)


@dataclass
class EvalJob:
    """One cell of an evaluation: a route on a set of records."""

    label: str
    route: Route | list[Route]  # one for all records, or one per record (routed input)
    records: list[Record]
    scorer: Scorer | None = None


def evaluate_many(generator: Any, jobs: list[EvalJob], max_tokens: int | None = None, progress: bool = True,
                  desc: str = "eval", stop_early: bool = True, batch_size: int | None = None) -> list[EvalResult]:
    """Greedy-decode every job's records and score them.

    With the engine, all jobs go in as one stream of requests with per-row routes, so
    batches stay full across cells (a matrix of routes x tasks costs one pass, not one per
    cell); `batch_size` caps the rows in flight at once (default: the engine's own
    `max_batch`), a new one entering as soon as one finishes. The reference generator runs
    job by job in batches of `batch_size`. `stop_early` ends an exact-match row as
    soon as its output can no longer match (same score, fewer steps; the row's output is
    then the prefix generated so far, marked `stopped_early`).
    """
    from .engine.engine import Engine

    if batch_size is not None and batch_size < 1:
        raise LorastackError(f"batch size must be >= 1, not {batch_size}")
    t0 = time.perf_counter()
    outs: list[list[Generation]] = []
    total = sum(len(j.records) for j in jobs)
    with tqdm(total=total, desc=desc, unit="ex", disable=not progress, leave=False) as bar:
        if isinstance(generator, Engine):
            todo = []  # (job, row, submit arguments) in order
            for ji, j in enumerate(jobs):
                sampling = Sampling(max_tokens=max_tokens or max_new_tokens(generator.base, j.records))
                routes = j.route if isinstance(j.route, list) else [j.route] * len(j.records)
                todo += [(ji, ri, (messages_of(r), route, sampling, _divergence(j.scorer, r) if stop_early else None))
                         for ri, (r, route) in enumerate(zip(j.records, routes))]
            results: list[list[Any]] = [[None] * len(j.records) for j in jobs]
            window = batch_size or total or 1
            pending: dict[Any, tuple[int, int]] = {}
            nxt = 0
            while nxt < len(todo) or pending:
                while nxt < len(todo) and len(pending) < window:
                    ji, ri, (msgs, route, sampling, abandon) = todo[nxt]
                    pending[generator.submit(msgs, route, sampling, abandon_when=abandon)] = (ji, ri)
                    nxt += 1
                if not generator.alive:
                    generator.step()
                else:
                    next(iter(pending)).wait(0.05)
                finished = [r for r in pending if r.done]
                for r in finished:
                    ji, ri = pending.pop(r)
                    results[ji][ri] = r.result()
                bar.update(len(finished))
            outs = results
        else:
            for j in jobs:
                sampling = Sampling(max_tokens=max_tokens or max_new_tokens(generator.base, j.records))
                routes = j.route if isinstance(j.route, list) else [j.route] * len(j.records)
                got: list[Generation | None] = [None] * len(j.records)
                for route in {str(r): r for r in routes}.values():  # the reference path runs one route at a time
                    idx = [i for i, r in enumerate(routes) if str(r) == str(route)]
                    for i, g in zip(idx, generator.generate([messages_of(j.records[i]) for i in idx], route, sampling,
                                                            batch_size=batch_size or 32, on_batch=bar.update)):
                        got[i] = g
                outs.append([g for g in got if g is not None])
    seconds = time.perf_counter() - t0
    results_ = []
    for j, o in zip(jobs, outs):
        results_.append(_score(j, o, seconds * len(j.records) / max(total, 1)))
    return results_


def _divergence(scorer: Scorer | None, record: Record) -> Callable[[str], bool] | None:
    """For exact-match scoring: a test that says the output can no longer match.

    The normalised text of any prefix of an output is a prefix of the normalised output,
    so once it stops being a prefix of the reference the verdict is already "wrong":
    stopping there changes no score and saves the decode steps a wrong answer would take.
    """
    from .tasks import Task, exact_match, normalize

    scorer = scorer or scorer_for(record)
    owner = getattr(scorer, "__self__", None)
    if not (scorer is exact_match or (isinstance(owner, Task) and owner.scorer is exact_match)):
        return None
    reference = normalize(record["completion"])
    return lambda text: not reference.startswith(normalize(text))


def _score(job: EvalJob, outs: list[Generation], seconds: float) -> EvalResult:
    rows, correct = [], 0
    for r, o in zip(job.records, outs):
        ok = bool((job.scorer or scorer_for(r))(o.text, r))
        correct += ok
        route = job.route[len(rows)] if isinstance(job.route, list) else job.route
        rows.append({"prompt": prompt_text(r), "expected": r["completion"], "output": o.text, "correct": ok, "route": str(route),
                     **({"stopped_early": True} if o.finish_reason == "abandoned" else {}),
                     **({"task": r["task"]} if "task" in r else {})})
    return EvalResult(model=job.label, n=len(job.records), correct=correct, seconds=seconds,
                      completion_tokens=sum(o.completion_tokens for o in outs), rows=rows)


def evaluate(
    generator: Any,
    route: Route | list[Route],
    records: list[Record],
    scorer: Scorer | None = None,
    batch_size: int | None = None,
    max_tokens: int | None = None,
    progress: bool = True,
    label: str | None = None,
    stop_early: bool = True,
) -> EvalResult:
    """Greedy-decode every record under `route` and score it (`batch_size` rows at a time)."""
    name = label or (str(route) if isinstance(route, Route) else "routed")
    return evaluate_many(generator, [EvalJob(name, route, records, scorer)], max_tokens, progress, desc=f"eval {name}",
                         stop_early=stop_early, batch_size=batch_size)[0]
