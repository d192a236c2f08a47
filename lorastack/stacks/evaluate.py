"""Exact-match evaluation of a stack: every record's input through all stages, scored on
the final output, with each example's trace kept (a wrong answer is debuggable stage by stage).

The same `evaluate` as any route: every record is one `Runtime.start` of the stack.
"""

from __future__ import annotations

from ..data import Record
from ..eval import EvalResult, Scorer, evaluate
from .run import StackRunner
from .spec import StackSpec


def evaluate_stack(runner: StackRunner, spec: StackSpec, records: list[Record], scorer: Scorer | None = None,
                   label: str | None = None, progress: bool = True) -> EvalResult:
    runner.check(spec)
    return evaluate(runner.runtime, spec, records, scorer, progress=progress, label=label or f"stack/{spec.name}",
                    stop_early=False)
