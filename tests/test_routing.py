"""Routing: kNN vote math on synthetic embeddings, and the knn router end to end on the tiny base."""

from __future__ import annotations

import numpy as np
import pytest

from lorastack.errors import NotFoundError
from lorastack.library import Library
from lorastack.route import BASE_ROUTE, AutoSpec
from lorastack.routing.knn import KnnRouter, knn_scores
from lorastack.runtime import Runtime
from lorastack.tasks import get_task
from test_library import make_peft_adapter


def _norm(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_knn_scores_vote_for_the_nearest_cluster():
    rng = np.random.default_rng(0)
    centers = _norm(rng.normal(size=(3, 16)))
    bank = _norm(np.repeat(centers, 10, axis=0) + 0.05 * rng.normal(size=(30, 16)))
    owners = np.repeat(np.arange(3), 10)
    queries = _norm(centers + 0.05 * rng.normal(size=(3, 16)))
    votes, best = knn_scores(queries, bank, owners, 3, k=5)
    assert list(votes.argmax(1)) == [0, 1, 2]
    assert (best > 0.9).all()
    # A query orthogonal to everything has a low best similarity (the router abstains on it).
    far = _norm(np.linalg.svd(bank)[2][-1:])
    _, best_far = knn_scores(far, bank, owners, 3, k=5)
    assert best_far[0] < 0.5


TASKS = ["reverse_words", "date_format", "add_numbers"]


@pytest.fixture()
def routed_runtime(tiny_base, tmp_path):
    lib = Library(tmp_path / "lib")
    for i, t in enumerate(TASKS):
        src = make_peft_adapter(tiny_base, tmp_path / t, seed=i)
        lib.add(src, t, base=tiny_base, examples=[r["prompt"] for r in get_task(t).generate(32, "train", seed=0)])
    return Runtime(tiny_base, lib)


def test_knn_router_routes_by_task_and_stores_signatures(routed_runtime, tmp_path, tiny_base):
    rt = routed_runtime
    prompts, expect = [], []
    for t in TASKS:
        for r in get_task(t).generate(10, "test", seed=1):
            prompts.append(r["prompt"])
            expect.append(t)
    decisions = rt.router("knn").route(prompts)
    got = [d.route.names[0] if not d.route.is_base else "base" for d in decisions]
    acc = np.mean([g == e for g, e in zip(got, expect)])
    assert acc >= 0.9, list(zip(got, expect))
    assert len(rt.library.signatures(rt.router("knn")._kind())) == 3
    # A new adapter is routable at once, without retraining anything.
    src = make_peft_adapter(tiny_base, tmp_path / "bool", seed=9)
    rt.library.add(src, "bool_eval", base=tiny_base, examples=[r["prompt"] for r in get_task("bool_eval").generate(32, "train", 0)])
    d = rt.router("knn").route([get_task("bool_eval").generate(1, "test", 0)[0]["prompt"]])[0]
    assert d.route.names == ["bool_eval"]


def test_auto_spec_through_runtime_and_unknown_router(routed_runtime):
    rt = routed_runtime
    assert rt.route("auto") == AutoSpec(None)
    routes = rt.routes_for("auto:knn", [get_task("date_format").generate(1, "test", 0)[0]["prompt"]])
    assert routes[0].names == ["date_format"]
    assert rt.routes_for("base", ["x", "y"]) == [BASE_ROUTE, BASE_ROUTE]
    with pytest.raises(NotFoundError, match="did you mean 'knn'"):
        rt.route("auto:knnn")


def test_abstains_when_nothing_is_close(routed_runtime):
    router = KnnRouter(routed_runtime, calibration=2.0)  # no input can be that close
    d = router.route(["What is 2 + 2?"])[0]
    assert d.abstained and d.route.is_base and d.scores
