"""Routing: kNN vote math on synthetic embeddings, and the knn router end to end on the tiny base."""

from __future__ import annotations

import numpy as np
import pytest

from lorastack.errors import LorastackError, NotFoundError
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


def _top1(decisions, expect):
    """Share of inputs whose best candidate (routed or not) is the expected adapter."""
    return np.mean([d.candidate == e for d, e in zip(decisions, expect)])


def _task_inputs(split, n, seed=1):
    prompts, expect = [], []
    for t in TASKS:
        for r in get_task(t).generate(n, split, seed=seed):
            prompts.append(r["prompt"])
            expect.append(t)
    return prompts, expect


def test_knn_router_routes_by_task_and_stores_signatures(routed_runtime, tmp_path, tiny_base):
    rt = routed_runtime
    prompts, expect = _task_inputs("test", 10)
    decisions = rt.router("knn").route(prompts)
    assert _top1(decisions, expect) >= 0.9
    routed = [d for d in decisions if not d.abstained]
    assert routed and all(d.route.names == [d.candidate] and d.confidence >= d.threshold for d in routed)
    assert all(d.confidence < d.threshold and d.route.is_base for d in decisions if d.abstained)
    assert len(rt.library.signatures(rt.router("knn")._kind())) == 3
    assert len(list(rt.library.root.glob("router-generic-*.safetensors"))) == 1  # generic embeddings stored once
    # A new adapter is routable at once, without retraining anything.
    src = make_peft_adapter(tiny_base, tmp_path / "bool", seed=9)
    rt.library.add(src, "bool_eval", base=tiny_base, examples=[r["prompt"] for r in get_task("bool_eval").generate(32, "train", 0)])
    ds = rt.router("knn").route([r["prompt"] for r in get_task("bool_eval").generate(5, "test", 0)])
    assert sum(d.candidate == "bool_eval" for d in ds) >= 4


def test_auto_spec_through_runtime_and_unknown_router(routed_runtime):
    rt = routed_runtime
    assert rt.route("auto") == AutoSpec(None)
    prompt = get_task("date_format").generate(1, "test", 0)[0]["prompt"]
    d = rt.decide("auto:knn", [prompt], false_route=1.0)[0]  # the loosest operating point routes it
    assert d.route.names == ["date_format"]
    assert rt.routes_for("base", ["x", "y"]) == [BASE_ROUTE, BASE_ROUTE]
    with pytest.raises(NotFoundError, match="did you mean 'knn'"):
        rt.route("auto:knnn")


def test_operating_point_moves_abstention_per_request(routed_runtime):
    """A stricter false-route rate never routes more inputs; the threshold each decision
    reports is the one it was held to, and abstentions show the candidate they rejected."""
    from lorastack.tasks.generic import heldout_prompts

    router = routed_runtime.router("knn")
    prompts = _task_inputs("paraphrase", 4)[0] + heldout_prompts(40)
    strict, loose = router.route(prompts, false_route=0.0), router.route(prompts, false_route=0.5)
    assert sum(not d.abstained for d in strict) <= sum(not d.abstained for d in loose)
    assert strict[0].threshold >= loose[0].threshold
    assert all(d.candidate and d.confidence is not None for d in strict)
    text = strict[-1].explain()
    assert ("abstained" in text and "<" in text) or ("routed" in text and ">=" in text)
    with pytest.raises(LorastackError, match="between 0 and 1"):
        router.route(prompts[:1], false_route=2.0)


def test_calibration_on_synthetic_embeddings_routes_a_shifted_cluster_and_abstains_on_a_far_one():
    """Adapters are tight clusters, generic prompts another region. A paraphrase is a *shifted*
    copy of a cluster (further from its examples than they are from each other, so a
    self-similarity rule abstains), yet much closer to it than to anything generic: it must be
    routed. A far cluster (new requests unlike any adapter) must abstain."""
    from lorastack.routing.knn import _decide, _unit, calibrate

    rng = np.random.default_rng(0)
    d = 32
    axes = np.linalg.qr(rng.normal(size=(d, d)))[0]
    centres = axes[:3]
    bank = _unit(np.repeat(centres, 20, axis=0) + 0.05 * rng.normal(size=(60, d)))
    owners = np.repeat(np.arange(3), 20)
    groups = np.repeat(np.arange(10), 6)
    generic = _unit(np.repeat(axes[3:13], 6, axis=0) * 1.0 + 0.3 * rng.normal(size=(60, d)))
    cal = calibrate(bank, owners, 3, generic, k=5, generic_groups=groups)
    t = cal.threshold(0.02)
    shifted = _unit(centres + 0.6 * axes[20:23] + 0.05 * rng.normal(size=(3, d)))
    far = _unit(axes[25:28] + 0.5 * rng.normal(size=(3, d)) * 0.2)
    win, z = _decide(shifted @ bank.T, owners, 3, shifted @ generic.T, 5)
    assert list(win) == [0, 1, 2] and (z >= t).all()
    # Closer to its examples than chance, but not as close as they are to each other.
    assert (shifted @ bank.T).max(1).max() < np.percentile((bank @ bank.T - 2 * np.eye(60)).max(1), 2)
    _, z_far = _decide(far @ bank.T, owners, 3, far @ generic.T, 5)
    assert (z_far < t).all()
    # The operating point means what it says on the negatives it was fitted on.
    for rate in (0.0, 0.05, 0.2):
        tr = cal.threshold(rate)
        assert (cal.false_margins >= tr).sum() <= rate * cal.n_neg
    assert cal.threshold(0.0) >= cal.threshold(0.2)



def test_calibration_treats_twin_adapters_as_one_job():
    """A retrained copy of an adapter (its examples drawn from the same cluster) must not make the
    router abstain on everything: the twins' examples landing on each other are not false routes,
    so a paraphrase of another adapter is still routed, and one of the twins' own is routed to
    one of them."""
    from lorastack.routing.knn import _decide, _unit, calibrate

    rng = np.random.default_rng(1)
    d = 32
    axes = np.linalg.qr(rng.normal(size=(d, d)))[0]
    centres = axes[[0, 0, 1, 2]]  # adapters 0 and 1 are twins
    bank = _unit(np.repeat(centres, 20, axis=0) + 0.05 * rng.normal(size=(80, d)))
    owners = np.repeat(np.arange(4), 20)
    generic = _unit(np.repeat(axes[3:13], 6, axis=0) + 0.3 * rng.normal(size=(60, d)))
    cal = calibrate(bank, owners, 4, generic, k=5, generic_groups=np.repeat(np.arange(10), 6))
    t = cal.threshold(0.02)
    shifted = _unit(axes[[0, 1, 2]] + 0.6 * axes[20:23] + 0.05 * rng.normal(size=(3, d)))
    win, z = _decide(shifted @ bank.T, owners, 4, shifted @ generic.T, 5)
    assert win[0] in (0, 1) and list(win[1:]) == [2, 3] and (z >= t).all(), (win, z, t)
    far = _unit(axes[25:28] + 0.1 * rng.normal(size=(3, d)))
    _, z_far = _decide(far @ bank.T, owners, 4, far @ generic.T, 5)
    assert (z_far < t).all()

def test_fit_labelled_picks_the_threshold_that_gets_most_inputs_right():
    from lorastack.routing.calibration import fit_labelled

    margin = np.array([0.9, 0.7, 0.5, 0.3, 0.2, 0.1])
    correct = np.array([True, True, True, False, True, True])
    should = np.array([True, True, True, False, False, False])
    t, acc = fit_labelled(margin, correct, should)
    assert t == 0.5 and acc == 1.0


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


def test_learned_router_fits_itself_and_refits_when_the_library_changes(routed_runtime, tiny_base, tmp_path):
    rt = routed_runtime
    router = rt.router("learned")
    prompts, expect = _task_inputs("test", 5, seed=2)
    decisions = router.route(prompts)  # no `router fit` first: the gate fits itself
    assert router.path.exists() and _top1(decisions, expect) >= 0.9
    assert all(d.signal in ("gate", "description") and d.threshold is not None for d in decisions)
    src = make_peft_adapter(tiny_base, tmp_path / "bool", seed=9)
    rt.library.add(src, "bool_eval", base=tiny_base, examples=[r["prompt"] for r in get_task("bool_eval").generate(32, "train", 0)])
    ds = router.route([r["prompt"] for r in get_task("bool_eval").generate(5, "test", 0)])
    assert sum(d.candidate == "bool_eval" for d in ds) >= 4  # refitted on 4 adapters, no error
    info = router.fit()
    assert info["adapters"] == 4 and info["generic"] > 100 and info["train_accuracy"] > 0.9


def test_taught_wordings_are_learned_without_retraining(routed_runtime):
    """`adapters examples NAME --add`: requests worded a new way, added to an adapter's stored
    examples, refit the learned gate on next use and are routed to that adapter."""
    rt = routed_runtime
    router = rt.router("learned")
    wording = "~~ please handle #{i}: quokka zephyr xylophone {i} ~~"
    probe = [wording.format(i=i) for i in range(100, 106)]
    before = router.route(probe)
    # Teach the wording to an adapter the gate does not already pick for it. (The tiny random
    # model's thresholds sit near 1, so, as in the tests above, the candidate is what is checked.)
    target = next(t for t in TASKS if sum(d.candidate == t for d in before) == 0)
    fitted = router.path.stat().st_mtime_ns
    rt.library.add_examples(target, [wording.format(i=i) for i in range(12)])
    after = router.route(probe)
    assert router.path.stat().st_mtime_ns != fitted  # refitted on the new examples by itself
    assert sum(d.candidate == target for d in after) >= 5, [(target, d.candidate, d.confidence) for d in after]
    prompts, expect = _task_inputs("test", 5, seed=2)
    assert _top1(router.route(prompts), expect) >= 0.9  # the other requests still go where they did


def test_example_less_adapter_is_routed_by_its_description(routed_runtime, tiny_base, tmp_path):
    """An adapter imported without examples has no kNN signature; its card's description is the
    fallback signal, with a threshold fitted on the same negatives."""
    rt = routed_runtime
    # The tiny random model's embeddings follow characters, not meaning, so the request shares
    # the description's symbols; on the embedded base this is where meaning would carry it.
    desc = "Close brackets like these: ( [ { < ( [ { < > } ] ) > } ] )"
    src = make_peft_adapter(tiny_base, tmp_path / "brackets", seed=5)
    rt.library.add(src, "brackets", base=tiny_base, card_updates={"description": desc})
    assert not rt.library.get("brackets").examples()
    for name in ("knn", "learned"):
        router = rt.router(name)
        d = router.route(["Close these brackets: ( [ { < ( { < > } ) > } ] )"])[0]
        assert d.route.names == ["brackets"] and d.signal == "description", (name, d)
        assert d.confidence >= d.threshold
        # The fallback takes neither the other adapters' inputs nor generic requests.
        ds = router.route([r["prompt"] for r in get_task("date_format").generate(5, "test", 0)] + ["What is the capital of Peru?"])
        assert not any(x.route.names == ["brackets"] for x in ds)


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
    assert rt.router_name("auto") == "learned"
    isolated_home.mkdir(parents=True, exist_ok=True)
    (isolated_home / "config.toml").write_text('[routing]\ndefault = "arrow"\n[routing.knn]\nfalse_route = 0.05\nk = 3\n')
    assert rt.router_name("auto") == "arrow"
    assert rt.router().name == "arrow"
    knn = rt.router("knn")
    assert (knn.false_route, knn.k) == (0.05, 3)
    monkeypatch.setenv("LORASTACK_ROUTER", "knn")
    assert rt.router_name("auto") == "knn"
    (isolated_home / "config.toml").write_text('[routing.learned]\nbogus = 1\n')
    with pytest.raises(LorastackError, match="router 'learned': bad option"):
        rt.router("learned")
    (isolated_home / "config.toml").write_text('[routing\n')
    with pytest.raises(LorastackError, match="not valid TOML"):
        rt.router("arrow")



def test_example_less_adapter_without_description_is_routed_by_arrow(routed_runtime, tiny_base, tmp_path, monkeypatch):
    """No examples, no description: Arrow's probability for the adapter (from its weights) is the
    signal, thresholded at the same false-route rate on negatives (generic prompts and the other
    adapters' examples). Arrow itself is stubbed here: on the tiny random model its scores mean
    nothing; what is tested is the calibration and the override."""
    from lorastack.routing.arrow import ArrowRouter

    rt = routed_runtime
    src = make_peft_adapter(tiny_base, tmp_path / "imported", seed=6)
    rt.library.add(src, "imported", base=tiny_base)
    calls = []

    def fake(self, texts):
        names, _ = self.index()
        p = np.full((len(texts), len(names)), 0.1)
        p[:, names.index("imported")] = [0.95 if "qqq" in t else 0.02 + 0.001 * (i % 50) for i, t in enumerate(texts)]
        calls.append(len(texts))
        return names, p

    monkeypatch.setattr(ArrowRouter, "probabilities", fake)
    for name in ("knn", "learned"):
        router = rt.router(name)
        assert "imported" in router.index().arrow if name == "knn" else "imported" in router.knn.index().arrow
        ds = router.route(["qqq please do the imported thing", "What is the capital of Peru?",
                           get_task("date_format").generate(1, "test", 0)[0]["prompt"]])
        assert ds[0].route.names == ["imported"] and ds[0].signal == "arrow" and ds[0].confidence >= ds[0].threshold
        assert all(d.route.names != ["imported"] for d in ds[1:])
    assert calls[0] > 40  # the negatives were scored once, then stored with the library
    assert list(rt.library.root.glob("router-arrow-negatives-*.safetensors"))


def test_auto_with_only_example_less_adapters_abstains_instead_of_failing(tiny_base, tmp_path):
    """Plain PEFT imports carry no examples: kNN has nothing to vote for and must say so, not crash."""
    from lorastack.library import Library
    from lorastack.runtime import Runtime
    from test_library import make_peft_adapter

    lib = Library(tmp_path / "lib")
    lib.add(make_peft_adapter(tiny_base, tmp_path / "a"), "plain", base=tiny_base)
    rt = Runtime(tiny_base, lib)
    for spec in ("auto", "auto:knn"):
        d = rt.decide(spec, ["hello there"])[0]
        assert d.route.names in ([], ["plain"])  # abstains, or the weights-based fallback picks it
