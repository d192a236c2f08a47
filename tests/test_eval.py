"""Evaluation options: --batch-size bounds the rows in flight; accuracy per route."""

from __future__ import annotations

import time

from lorastack.eval import evaluate
from lorastack.route import BASE_ROUTE


def test_batch_size_caps_rows_decoded_together(tiny_base, tmp_path):
    from lorastack.library import Library
    from lorastack.runtime import Runtime
    from lorastack.tasks import get_task

    records = get_task("reverse_words").generate(7, "test", seed=0)
    rt = Runtime(tiny_base, Library(tmp_path / "lib"), max_batch=32)
    engine = rt.generator
    widest = []
    step = engine.step

    def spy():
        if not engine.running:  # an idle engine waits a moment, so everything submitted by then is admitted together
            time.sleep(0.5)
        step()
        widest.append(len(engine.running))

    engine.step = spy
    a = evaluate(rt, BASE_ROUTE, records, batch_size=2, max_tokens=4, progress=False, stop_early=False)
    assert max(widest) == 2
    widest.clear()
    b = evaluate(rt, BASE_ROUTE, records, batch_size=None, max_tokens=4, progress=False, stop_early=False)
    assert max(widest) == 7
    assert [r["output"] for r in a.rows] == [r["output"] for r in b.rows]  # same answers, in record order


def test_accuracy_per_route(tiny_base):
    from lorastack.eval import EvalResult

    rows = [{"route": "a", "correct": True}, {"route": "a", "correct": False}, {"route": "base", "correct": True}]
    assert EvalResult("auto", 3, 2, 1.0, 0, rows).by_route() == {
        "a": {"n": 2, "correct": 1, "accuracy": 0.5}, "base": {"n": 1, "correct": 1, "accuracy": 1.0}}
