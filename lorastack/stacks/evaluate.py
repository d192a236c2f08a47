"""Exact-match evaluation of a stack: every record's input through all stages, scored on
the final output, with each example's trace kept (a wrong answer is debuggable stage by stage)."""

from __future__ import annotations

import time

from tqdm.auto import tqdm

from ..data import Record, prompt_text
from ..eval import EvalResult, Scorer, scorer_for
from .run import StackRunner
from .spec import StackSpec


def evaluate_stack(runner: StackRunner, spec: StackSpec, records: list[Record], scorer: Scorer | None = None,
                   label: str | None = None, progress: bool = True) -> EvalResult:
    t0 = time.perf_counter()
    with tqdm(total=len(records), desc=f"eval stack/{spec.name}", unit="ex", disable=not progress, leave=False) as bar:
        results = runner.run_many(spec, [prompt_text(r) for r in records], on_done=bar.update)
    seconds = time.perf_counter() - t0
    rows, correct = [], 0
    for r, res in zip(records, results):
        ok = res.error is None and bool((scorer or scorer_for(r))(res.output, r))
        correct += ok
        rows.append({"prompt": prompt_text(r), "expected": r["completion"], "output": res.output, "correct": ok,
                     "route": f"stack/{spec.name}", "completion_tokens": res.completion_tokens,
                     "seconds": round(res.seconds, 4), **({"error": res.error} if res.error else {}),
                     **({"task": r["task"]} if "task" in r else {}), "trace": [t.to_json() for t in res.trace]})
    return EvalResult(model=label or f"stack/{spec.name}", n=len(records), correct=correct, seconds=seconds,
                      completion_tokens=sum(res.completion_tokens for res in results), rows=rows)
