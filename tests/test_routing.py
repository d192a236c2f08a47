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


def test_arrow_prototype_is_the_top_singular_vector_of_the_update():
    """A hand-made update B A = 3 b1 u^T + 1 b2 w^T has top right singular vector u."""
    import torch

    from lorastack.routing.arrow import top_right_singular_vector

    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=g))
    u, w = q[:, 0], q[:, 1]
    p, _ = torch.linalg.qr(torch.randn(48, 48, generator=g))
    b1, b2 = 3 * p[:, 0], p[:, 1]
    A = torch.stack([u, w])  # [r=2, in=32]
    B = torch.stack([b1, b2], dim=1)  # [out=48, r=2]
    v = top_right_singular_vector(A, B)
    assert abs(float(v @ u)) > 0.999 and abs(float(v @ w)) < 1e-3
    # Scaling B changes nothing about the direction; swapping the magnitudes flips the answer.
    assert abs(float(top_right_singular_vector(A, B * 7) @ u)) > 0.999
    B2 = torch.stack([p[:, 0], 3 * p[:, 1]], dim=1)
    assert abs(float(top_right_singular_vector(A, B2) @ w)) > 0.999


def test_arrow_scores_prefer_the_aligned_adapter():
    from lorastack.routing.arrow import arrow_scores

    rng = np.random.default_rng(0)
    d = 16
    e = np.eye(d, dtype=np.float32)
    protos = np.zeros((2, 1, 2, 3, d), dtype=np.float32)
    protos[0, 0, 0, 0] = e[0]
    protos[1, 0, 0, 0] = e[1]
    tokens = np.zeros((1, 2, 5, d), dtype=np.float32)
    tokens[0, 0] = e[1] * 2 + 0.1 * rng.normal(size=(5, d))
    tokens[0, 1] = rng.normal(size=(5, d))
    s = arrow_scores(tokens, protos)
    assert s[1] > s[0]


def test_arrow_centring_removes_a_shared_offset():
    """Every input carries a large shared direction that adapter 0's prototype leans on:
    raw scores pick adapter 0 for everything; centring on the mean input recovers adapter 1."""
    from lorastack.routing.arrow import arrow_scores

    rng = np.random.default_rng(1)
    d = 16
    e = np.eye(d, dtype=np.float32)
    protos = np.zeros((2, 1, 1, 1, d), dtype=np.float32)
    protos[0, 0, 0, 0] = (e[0] + e[2]) / np.sqrt(2)  # half on the shared direction e[2]
    protos[1, 0, 0, 0] = e[1]
    mean = np.zeros((1, 1, d), dtype=np.float32)
    mean[0, 0] = 10 * e[2]
    tokens = (mean[:, :, None, :] + e[1] * 2 + 0.1 * rng.normal(size=(1, 1, 5, d))).astype(np.float32)
    raw, centred = arrow_scores(tokens, protos), arrow_scores(tokens, protos, mean)
    assert raw[0] > raw[1] and centred[1] > centred[0]


def test_arrow_router_runs_without_any_data(routed_runtime):
    rt = routed_runtime
    d = rt.router("arrow").route(["Rewrite the date 2031-04-09 in words"])[0]
    assert not d.route.is_base and set(d.scores) == set(TASKS)
    assert abs(sum(d.scores.values()) - 1) < 1e-3
    assert len(rt.library.signatures(rt.router("arrow")._kind())) == 3
    assert rt.router("arrow")._mean is not None  # centred by default, on generic prompts only


def test_learned_router_fit_and_route(routed_runtime):
    from lorastack.errors import LorastackError

    rt = routed_runtime
    with pytest.raises(LorastackError, match="router fit"):
        rt.router("learned").route(["x"])
    info = rt.router("learned").fit()
    assert info["adapters"] == 3 and info["train_accuracy"] > 0.9
    prompts = [r["prompt"] for t in TASKS for r in get_task(t).generate(5, "test", 2)]
    got = [d.route.names[:1] for d in rt.router("learned").route(prompts)]
    assert np.mean([g == [t] for g, t in zip(got, [t for t in TASKS for _ in range(5)])]) >= 0.9


def test_fit_gate_separates_synthetic_classes():
    from lorastack.routing.learned import fit_gate

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(loc=c, size=(50, 4)) for c in (-2, 0, 2)]).astype(np.float32)
    y = np.repeat(np.arange(3), 50)
    W, b = fit_gate(x, y, 3)
    assert ((x @ W + b).argmax(1) == y).mean() > 0.9


def test_config_file_sets_default_router_and_its_options(routed_runtime, isolated_home, monkeypatch):
    from lorastack.errors import LorastackError

    rt = routed_runtime
    assert rt.router_name("auto") == "knn"
    isolated_home.mkdir(parents=True, exist_ok=True)
    (isolated_home / "config.toml").write_text('[routing]\ndefault = "arrow"\n[routing.knn]\ncalibration = 0.5\nk = 3\n')
    assert rt.router_name("auto") == "arrow"
    assert rt.router().name == "arrow"
    knn = rt.router("knn")
    assert (knn.calibration, knn.k) == (0.5, 3)
    monkeypatch.setenv("LORASTACK_ROUTER", "knn")
    assert rt.router_name("auto") == "knn"
    (isolated_home / "config.toml").write_text('[routing.learned]\nbogus = 1\n')
    with pytest.raises(LorastackError, match="router 'learned': bad option"):
        rt.router("learned")
    (isolated_home / "config.toml").write_text('[routing\n')
    with pytest.raises(LorastackError, match="not valid TOML"):
        rt.router("arrow")
