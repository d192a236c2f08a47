"""Exact-match evaluation of a route on a dataset, with per-example results kept.

Per-example rows are what make a low number debuggable, so they are always returned and
the CLI writes them to a JSONL file next to the summary.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from .data import Record, messages_of, prompt_text
from .engine.sampling import Generation, Sampling
from .errors import LorastackError
from .route import Route, is_stack

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
    route: Any  # a Route or SPEC for all records, one Route per record (routed input), or a stack
    records: list[Record]
    scorer: Scorer | None = None


def evaluate_many(target: Any, jobs: list[EvalJob], max_tokens: int | None = None, progress: bool = True,
                  desc: str = "eval", stop_early: bool = True, batch_size: int | None = None) -> list[EvalResult]:
    """Greedy-decode every job's records and score them.

    `target` is a Runtime (everything but training) or a bare generator (training's own
    held-out check, below the runtime). Through a Runtime every record is one `Runtime.start`
    — the path the server and the CLI take — and all jobs go in at once, so batches stay
    full across cells (a matrix of routes x tasks costs one pass, not one per cell); a job's
    route may also be a SPEC (`auto` is decided in one batch) or a stack. `stop_early` ends
    an exact-match row as soon as its output can no longer match (same score, fewer steps;
    the row's output is then the prefix generated so far, marked `stopped_early`).
    `batch_size` caps the rows in flight at once (default: the engine's own `max_batch`), a
    new one entering as soon as one finishes; the reference generator decodes in batches of it.
    """
    if batch_size is not None and batch_size < 1:
        raise LorastackError(f"batch size must be >= 1, not {batch_size}")
    if hasattr(target, "submit_ids"):
        raise TypeError("evaluate takes a Runtime (or training's reference Generator), not a bare Engine")
    t0 = time.perf_counter()
    total = sum(len(j.records) for j in jobs)
    with tqdm(total=total, desc=desc, unit="ex", disable=not progress, leave=False) as bar:
        if hasattr(target, "decide"):  # a Runtime
            outs, labels, traces = _run_on_runtime(target, jobs, max_tokens, stop_early, bar, batch_size)
        else:
            outs = [_run_reference(target, j, max_tokens, bar, batch_size or 32) for j in jobs]
            labels = [[str(r) for r in (j.route if isinstance(j.route, list) else [j.route] * len(j.records))] for j in jobs]
            traces = [None] * len(jobs)
    seconds = time.perf_counter() - t0
    return [_score(j, o, seconds * len(j.records) / max(total, 1), lab, tr) for j, o, lab, tr in zip(jobs, outs, labels, traces)]


def _run_on_runtime(rt: Any, jobs: list[EvalJob], max_tokens: int | None, stop_early: bool, bar: Any,
                    batch_size: int | None) -> tuple:
    starts: list[list[Callable[[], Any]]] = []  # per job, per record: a call that starts its handle
    for j in jobs:
        prompts = [prompt_text(r) for r in j.records]
        if isinstance(j.route, list):
            decisions: list[Any] = list(j.route)
        elif isinstance(j.route, Route) or is_stack(j.route):
            decisions = [j.route] * len(j.records)
        else:  # a SPEC: fixed routes are checked, `auto` decided for all records in one call
            decisions = rt.decide(j.route, prompts)
        if is_stack(j.route):
            starts.append([functools.partial(rt.start, j.route, p) for p in prompts])
            continue
        sampling = Sampling(max_tokens=max_tokens or max_new_tokens(rt.base, j.records))
        starts.append([functools.partial(rt.start, d if isinstance(d, Route) else d.route, messages_of(r), sampling, decision=d,
                                         abandon_when=_divergence(j.scorer, r) if stop_early else None)
                       for r, d in zip(j.records, decisions)])
    order = [(ji, ri) for ji, row in enumerate(starts) for ri in range(len(row))]
    handles: list[list[Any]] = [[None] * len(row) for row in starts]
    window = batch_size or len(order) or 1
    live: list[Any] = []
    for ji, ri in order:  # at most `window` in flight; the next starts as soon as one ends
        while len(live) >= window:
            live[0].wait(0.05)
            done = [h for h in live if h.done]
            live = [h for h in live if not h.done]
            bar.update(len(done))
        handles[ji][ri] = starts[ji][ri]()
        live.append(handles[ji][ri])
    for h in live:
        h.wait()
        bar.update(1)
    outs = [[_generation(h) for h in hs] for hs in handles]
    labels = [[h.model if h.trace is not None else str(h.decision.route) for h in hs] for hs in handles]
    traces = [[h.trace for h in hs] if any(h.trace is not None for h in hs) else None for hs in handles]
    return outs, labels, traces


def _generation(handle: Any) -> Generation:
    """A finished handle's answer; a failed stack scores as a wrong (empty) answer, not a crash."""
    if handle.error is not None and handle.trace is not None:
        return Generation("", handle.prompt_tokens, handle.completion_tokens, "error")
    return handle.result()


def _run_reference(generator: Any, j: EvalJob, max_tokens: int | None, bar: Any, batch_size: int) -> list[Generation]:
    """The reference generator runs one route at a time (training's held-out check)."""
    sampling = Sampling(max_tokens=max_tokens or max_new_tokens(generator.base, j.records))
    routes = j.route if isinstance(j.route, list) else [j.route] * len(j.records)
    got: list[Generation | None] = [None] * len(j.records)
    for route in {str(r): r for r in routes}.values():
        idx = [i for i, r in enumerate(routes) if str(r) == str(route)]
        for i, g in zip(idx, generator.generate([messages_of(j.records[i]) for i in idx], route, sampling,
                                                batch_size=batch_size, on_batch=bar.update)):
            got[i] = g
    return [g for g in got if g is not None]


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


def _score(job: EvalJob, outs: list[Generation], seconds: float, labels: list[str], traces: list | None) -> EvalResult:
    rows, correct = [], 0
    for k, (r, o) in enumerate(zip(job.records, outs)):
        ok = o.finish_reason != "error" and bool((job.scorer or scorer_for(r))(o.text, r))
        correct += ok
        rows.append({"prompt": prompt_text(r), "expected": r["completion"], "output": o.text, "correct": ok, "route": labels[k],
                     **({"stopped_early": True} if o.finish_reason == "abandoned" else {}),
                     **({"task": r["task"]} if "task" in r else {}),
                     **({"completion_tokens": o.completion_tokens, "trace": [t.to_json() for t in traces[k] or []]}
                        if traces is not None else {})})
    return EvalResult(model=job.label, n=len(job.records), correct=correct, seconds=seconds,
                      completion_tokens=sum(o.completion_tokens for o in outs), rows=rows)


def evaluate(
    generator: Any,
    route: Any,
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
