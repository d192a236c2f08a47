"""Composition: exactness of merges, TIES/DARE definitions, the mixture-SPEC/cat equivalence,
the engine's scoring call, few-shot search, and one-line errors that leave the library as it was."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from lorastack.adapter import LoraPairs, read_lora_pairs
from lorastack.compose import ComposeError, fewshot, merge, merge_pairs, minus, parse_weights
from lorastack.engine.engine import Engine
from lorastack.engine.sampling import Sampling
from lorastack.engine.score import MixtureLora, completion_logprobs, score
from lorastack.errors import IncompatibleError, NotFoundError
from lorastack.library import Library
from lorastack.route import parse_spec
from lorastack.tasks import get_task
from test_library import make_peft_adapter


@pytest.fixture()
def lib(tiny_base, tmp_path):
    """a, b: rank 4 on q,v (same config); c: rank 6 on q,v; d: rank 4 on o only."""
    lib = Library(tmp_path / "lib")
    specs = {"a": (4, ("q_proj", "v_proj")), "b": (4, ("q_proj", "v_proj")), "c": (6, ("q_proj", "v_proj")), "d": (4, ("o_proj",))}
    for i, (name, (rank, targets)) in enumerate(specs.items()):
        lib.add(make_peft_adapter(tiny_base, tmp_path / name, rank=rank, seed=i, targets=targets), name, base=tiny_base,
                examples=[f"example {name}"])
    return lib


def deltas(pairs: LoraPairs) -> dict[str, torch.Tensor]:
    return {m: pairs.delta(m) for m in pairs.modules}


def close(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    assert set(x) == set(y)
    for m in x:
        assert torch.allclose(x[m], y[m], atol=atol), (m, (x[m] - y[m]).abs().max())


@pytest.mark.parametrize("method", ["linear", "cat"])
def test_one_adapter_at_weight_one_reproduces_it(lib, tiny_base, method):
    from peft import PeftModel

    m = merge(lib, ["a"], "m", method=method, weights=[1.0])
    close(deltas(read_lora_pairs(m)), deltas(read_lora_pairs(lib.get("a"))), atol=1e-6)
    # ...and PEFT itself, loading the new directory, computes what it computes for the parent.
    ids = torch.tensor([tiny_base.chat_ids([{"role": "user", "content": "Sort these words: pear fig"}])])
    outs = []
    for name in ("a", "m"):
        model = PeftModel.from_pretrained(copy.deepcopy(tiny_base.model), str(lib.get(name).path))
        with torch.no_grad():
            outs.append(model(ids).logits)
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    card = json.loads((m.path / "card.json").read_text())
    assert card["composition"]["method"] == method and card["composition"]["parents"] == [{"name": "a", "weight": 1.0}]


def test_cat_of_two_equals_sum_of_deltas(lib):
    m = merge(lib, ["a", "c", "d"], "m", method="cat", weights=[1.0, 1.0, 1.0])  # different ranks and targets
    got = deltas(read_lora_pairs(m))
    want: dict[str, torch.Tensor] = {}
    for n in ("a", "c", "d"):
        for mod, d in deltas(read_lora_pairs(lib.get(n))).items():
            want[mod] = want.get(mod, 0) + d
    close(got, want, atol=1e-5)
    assert m.card.rank == 4 + 6  # q/v modules stack a and c; d's o_proj is zero-padded to that rank


@pytest.mark.parametrize("method", ["linear", "cat", "svd"])
def test_matches_peft_add_weighted_adapter(lib, tiny_base, method):
    """Our tensor-level merges give PEFT's add_weighted_adapter result on the same parents."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(tiny_base.model), str(lib.get("a").path), adapter_name="a")
    model.load_adapter(str(lib.get("b").path), adapter_name="b")
    model.add_weighted_adapter(["a", "b"], [0.7, 0.3], adapter_name="mix", combination_type=method)
    ours = merge_pairs([read_lora_pairs(lib.get("a")), read_lora_pairs(lib.get("b"))], [0.7, 0.3], method)
    for module in ours.modules:
        layer = model.get_submodule("base_model.model." + module)
        assert torch.allclose(layer.get_delta_weight("mix").float(), ours.delta(module), atol=1e-5), module


def _row(values: list[float]) -> LoraPairs:
    """A hand-made one-module adapter whose update is exactly the row vector `values`
    (A = identity, B = values), so merged updates can be read off directly."""
    n = len(values)
    return LoraPairs("x", {"m": (torch.eye(n), torch.tensor([values]))})


def test_ties_trims_elects_sign_and_takes_disjoint_mean():
    d1 = [4.0, -1.0, 2.0, 0.5]
    d2 = [-3.0, -2.0, 1.0, 0.1]
    # density 0.5 keeps the two largest magnitudes of each: [4, 0, 2, 0] and [-3, -2, 0, 0];
    # elected signs (sign of the sum): +, -, +, (0 -> +); disjoint mean of agreeing entries:
    out = merge_pairs([_row(d1), _row(d2)], [1.0, 1.0], "ties", density=0.5, svd_rank=4).delta("m")
    assert torch.allclose(out, torch.tensor([[4.0, -2.0, 2.0, 0.0]]), atol=1e-5)
    with pytest.raises(ComposeError, match="--svd-rank must be >= 1, got 0"):  # 0 is not "the default"
        merge_pairs([_row(d1), _row(d2)], [1.0, 1.0], "svd", svd_rank=0)
    # magnitude_prune: the same trim, then a plain weighted sum
    out = merge_pairs([_row(d1), _row(d2)], [1.0, 1.0], "magnitude_prune", density=0.5, svd_rank=4).delta("m")
    assert torch.allclose(out, torch.tensor([[1.0, -2.0, 2.0, 0.0]]), atol=1e-5)


def test_magnitude_trim_matches_peft_and_truncation_matches_exact_svd():
    """Our kthvalue trim keeps exactly PEFT's topk entries (random values: no ties), and the
    randomized rank-r factors of a large trimmed update are as good as the exact SVD's."""
    from peft.utils.merge_utils import magnitude_based_pruning

    from lorastack.compose.merge import _top_factors, kth_largest, trim_by_magnitude

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, 30, generator=g)
    ours = trim_by_magnitude(x, 0.3)
    assert torch.equal(ours, torch.stack([magnitude_based_pruning(t, 0.3) for t in x]))
    assert torch.equal(trim_by_magnitude(x, 1.0), x) and not trim_by_magnitude(x, 0.0).any()
    for values, k in ((torch.randn(5000, generator=g).abs() * 1e-4, 1234), (torch.tensor([3.0, 1.0, 2.0, 2.0, 0.0]), 3),
                      (torch.zeros(10), 4)):
        assert kth_largest(values, k) == values.sort(descending=True).values[k - 1]
    update = trim_by_magnitude((torch.randn(300, 8, generator=g) @ torch.randn(8, 200, generator=g))[None], 0.5)[0]
    torch.manual_seed(0)
    a, b = _top_factors(update, 8)
    assert a.shape == (8, 200) and b.shape == (300, 8)
    U, S, Vh = torch.linalg.svd(update, full_matrices=False)
    best = (update - (U[:, :8] * S[:8]) @ Vh[:8]).norm()
    assert (update - b @ a).norm() <= best * 1.001


def test_dare_drops_at_random_and_rescales():
    n = 64
    ones = LoraPairs("x", {"m": (torch.eye(n), torch.ones(n, n))})  # update = all ones, full rank via A = I
    out = merge_pairs([ones], [1.0], "dare_linear", density=0.25, svd_rank=n, seed=3).delta("m")
    kept = out.abs() > 0.5
    assert torch.allclose(out[kept], torch.full_like(out[kept], 4.0), atol=1e-3)  # survivors rescaled by 1/density
    assert torch.allclose(out[~kept], torch.zeros_like(out[~kept]), atol=1e-3)  # the rest dropped
    assert 0.2 < kept.float().mean() < 0.3
    again = merge_pairs([ones], [1.0], "dare_linear", density=0.25, svd_rank=n, seed=3).delta("m")
    other = merge_pairs([ones], [1.0], "dare_linear", density=0.25, svd_rank=n, seed=4).delta("m")
    assert torch.equal(out, again) and not torch.allclose(out, other)


def test_subtract_is_exact(lib):
    a, b = read_lora_pairs(lib.get("a")), read_lora_pairs(lib.get("b"))
    diff = minus(a, b)
    for m in a.modules:
        assert torch.allclose(diff.delta(m), a.delta(m) - b.delta(m), atol=1e-6)
    m = merge(lib, ["a", "c"], "m", method="cat", weights=[0.5, 0.5], subtract="b")
    c = read_lora_pairs(lib.get("c"))
    got = read_lora_pairs(m)
    for mod in a.modules:
        want = 0.5 * (a.delta(mod) - b.delta(mod)) + 0.5 * (c.delta(mod) - b.delta(mod))
        assert torch.allclose(got.delta(mod), want, atol=1e-5)
    assert m.card.model_dump()["composition"]["subtract"] == "b"


def test_mixture_spec_and_cat_merge_give_identical_engine_outputs(lib, tiny_base):
    merge(lib, ["a", "b"], "ab", method="cat", weights=parse_weights("0.7,0.3", 2))
    engine = Engine(tiny_base, resolve=lib.get)
    prompts = [[{"role": "user", "content": f"Sort these words alphabetically: {w}"}] for w in ("pear fig", "kiwi plum apple")]
    spec, merged = parse_spec("a:0.7+b:0.3"), parse_spec("ab")
    outs = engine.generate(prompts + prompts, [spec, spec, merged, merged], Sampling(max_tokens=10))
    assert [o.text for o in outs[:2]] == [o.text for o in outs[2:]]
    seqs = [(tiny_base.chat_ids(p), tiny_base.completion_ids("fig pear")) for p in prompts]
    s_spec, s_merged = score(engine, seqs, [spec] * 2), score(engine, seqs, [merged] * 2)
    assert s_spec == pytest.approx(s_merged, abs=1e-4)
    assert score(engine, seqs, [parse_spec("base")] * 2) != pytest.approx(s_spec, abs=1e-3)  # the adapters matter


def test_score_matches_peft_and_mixture_lora(lib, tiny_base):
    from peft import PeftModel

    engine = Engine(tiny_base, resolve=lib.get)
    prompt = tiny_base.chat_ids([{"role": "user", "content": "Reverse the order of these words: a b c"}])
    completion = tiny_base.completion_ids("c b a")
    (got,) = score(engine, [(prompt, completion)], [parse_spec("c")])
    model = PeftModel.from_pretrained(copy.deepcopy(tiny_base.model), str(lib.get("c").path))
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt + completion])).logits[0].float(), -1)
    want = sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(completion))
    assert got == pytest.approx(want, abs=1e-3)
    # The differentiable mixture path scores what the engine's bank scores.
    mix = MixtureLora(engine.runner.groups, [read_lora_pairs(lib.get(n)) for n in ("a", "d")], tiny_base.dtype)
    seqs = [(prompt, completion)] * 2
    mix.set_rows(torch.tensor([[0.7, 0.3], [1.0, 0.0]]), [len(prompt) + len(completion)] * 2)
    with torch.no_grad():
        sums, counts = completion_logprobs(engine.runner, seqs, mix)
    want2 = score(engine, seqs, [parse_spec("a:0.7+d:0.3"), parse_spec("a")])
    assert sums.tolist() == pytest.approx(want2, abs=1e-4) and counts.tolist() == [len(completion)] * 2


@pytest.fixture()
def runtime(tiny_base, lib):
    from lorastack.runtime import Runtime

    return Runtime(tiny_base, lib)


def _records(n: int = 5):
    return get_task("reverse_words").generate(n, "train", seed=0)


@pytest.mark.parametrize("search", ["cma", "gradient"])
def test_fewshot_search_is_seeded_and_not_worse_than_uniform(runtime, search):
    from lorastack.compose import fewshot_search

    kw = dict(candidates=["a", "b", "c"], search=search, budget=13, l1=0.0, seed=1)
    r1 = fewshot_search(runtime, _records(), **kw)
    r2 = fewshot_search(runtime, _records(), **kw)
    assert r1.weights == r2.weights and r1.loss == r2.loss
    assert r1.loss <= r1.uniform_loss + 1e-6
    assert r1.evaluations <= 13


def test_fewshot_adds_an_exact_cat_adapter(runtime, lib):
    adapter, result = fewshot(runtime, _records(), "fs", candidates=["a", "b", "c"], budget=12, l1=0.0, seed=0)
    got = read_lora_pairs(adapter)
    parents = {n: read_lora_pairs(lib.get(n)) for n in result.candidates}
    for mod in got.modules:
        want = sum(w * parents[n].delta(mod) for n, w in zip(result.candidates, result.weights) if abs(w) >= 1e-3)
        assert torch.allclose(got.delta(mod), want, atol=1e-5)
    comp = adapter.card.model_dump()["composition"]
    assert comp["kind"] == "fewshot" and [p["name"] for p in comp["parents"]] == ["a", "b", "c"]
    assert runtime.generate("Reverse the order of these words: x y", model="fs", sampling=Sampling(max_tokens=4)).text is not None


def test_fewshot_interrupted_leaves_library_unchanged(runtime, lib):
    before = sorted(os.listdir(lib.adapters_dir))

    def stop(done, best):
        if done > 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fewshot(runtime, _records(), "fs", candidates=["a", "b"], budget=20, progress=stop)
    assert sorted(os.listdir(lib.adapters_dir)) == before and "fs" not in lib.names()


@pytest.mark.parametrize("args, message", [
    (["merge", "a", "nope", "--name", "m"], "nope"),
    (["merge", "a", "c", "--method", "linear", "--name", "m"], "one rank"),
    (["merge", "a", "d", "--method", "ties", "--name", "m"], "same target modules"),
    (["merge", "a", "b", "--weights", "0.7,x", "--name", "m"], "comma-separated numbers"),
    (["merge", "a", "b", "--weights", "0.7", "--name", "m"], "1 weights for 2 adapters"),
    (["merge", "a", "b", "--method", "blend", "--name", "m"], "unknown merge method"),
    (["merge", "a", "b", "--method", "ties", "--density", "1.5", "--name", "m"], "--density"),
    (["merge", "a", "b", "--name", "a"], "own parent"),
    (["merge", "a", "b", "--name", "m", "--subtract", "zz"], "zz"),
    (["fewshot", "--data", "EMPTY", "--name", "m"], "no records"),
    (["fewshot", "--data", "BAD", "--name", "m"], "invalid JSON"),
    (["fewshot", "--data", "MISSING", "--name", "m"], "no such file"),
    (["general", "--name", "a"], "already exists"),
    (["general", "--prompts", "MISSING"], "no such file"),
    (["general", "--name", "../x"], "name"),
])
def test_bad_input_is_one_line_and_library_unchanged(lib, tmp_path, capsys, args, message):
    from lorastack.cli import main

    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x", "completion": "y"}\n{not json\n')
    files = {"EMPTY": tmp_path / "empty.jsonl", "BAD": tmp_path / "bad.jsonl", "MISSING": tmp_path / "missing.jsonl"}
    args = [str(files.get(a, a)) for a in args]
    before = sorted(os.listdir(lib.adapters_dir))
    with pytest.raises(SystemExit) as exit_info:
        main(["--library", str(lib.root), "compose", *args])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.startswith("error:") and "\n" not in err, err
    assert message in err
    assert sorted(os.listdir(lib.adapters_dir)) == before and lib.names() == ["a", "b", "c", "d"]


def test_merge_errors_in_the_python_api(lib):
    with pytest.raises(NotFoundError):
        merge(lib, ["a", "zz"], "m")
    with pytest.raises(IncompatibleError):
        merge(lib, ["a", "d"], "m", method="ties")
    assert merge(lib, ["a", "c"], "m", method="ties").card.rank == 6  # ranks may differ: ties works on B @ A
    with pytest.raises(ComposeError):
        parse_weights("nan,1", 2)


def test_held_out_task_generators_are_correct():
    """The families bench/compose.py holds out of the library (not registered in TASKS)."""
    from lorastack.tasks import reverse_title, sort_reverse, subtract_numbers

    import re

    for r in subtract_numbers.TASK.generate(50, "test"):
        a, b = (int(x) for x in re.findall(r"\d+", r["prompt"]))  # every template names a before b
        assert int(r["completion"]) == a - b >= 0
    for r in sort_reverse.TASK.generate(50, "train"):
        words = r["prompt"].split(": ", 1)[1].split()
        assert r["completion"].split() == sorted(words, reverse=True)
    for r in reverse_title.TASK.generate(50, "train"):
        words = r["prompt"].split(": ", 1)[1].split()
        assert r["completion"] == " ".join(w.capitalize() for w in words[::-1])
    train = {r["prompt"] for r in sort_reverse.TASK.generate(200, "train")}
    assert not train & {r["prompt"] for r in sort_reverse.TASK.generate(200, "test")}


def test_cli_merge_and_fewshot_then_generate_with_the_new_adapter(lib, tiny_base_dir, tmp_path, capsys):
    from lorastack.cli import main

    few = tmp_path / "few.jsonl"
    few.write_text("".join(json.dumps(r) + "\n" for r in _records(5)))
    common = ["--base", str(tiny_base_dir), "--library", str(lib.root)]
    main([*common, "compose", "merge", "a", "b", "--method", "ties", "--weights", "1,1", "--name", "ab"])
    assert "added ab: ties of a:1, b:1" in capsys.readouterr().out
    # A merge stores its parents' examples: routable, it would split auto's choice with them.
    assert lib.get("ab").card.routable is False and lib.get("a").card.routable
    main([*common, "compose", "merge", "a", "--method", "svd", "--svd-rank", "2", "--name", "a2", "--routable"])
    assert "not routable" not in capsys.readouterr().out and lib.get("a2").card.routable is True
    main([*common, "compose", "fewshot", "--data", str(few), "--candidates", "a,b,c", "--budget", "6", "--seed", "2",
          "--name", "fs", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["adapter"] == "fs" and out["candidates"] == ["a", "b", "c"] and out["evaluations"] <= 6
    assert lib.get("fs").card.routable  # its examples are the new task's own
    main([*common, "generate", "Reverse the order of these words: x y", "--model", "fs", "--max-tokens", "3"])
    assert capsys.readouterr().out.strip()  # the composed adapter serves like any other


class _Finished:
    """A handle whose answer counts as finished: a random tiny model almost never emits EOS."""

    def __init__(self, handle):
        self.handle = handle

    def result(self):
        from dataclasses import replace

        return replace(self.handle.result(), finish_reason="stop")


def test_general_adapter_is_distilled_from_the_bases_own_answers_and_never_routed(lib, tiny_base, monkeypatch):
    from lorastack.compose.general import train_general
    from lorastack.runtime import Runtime
    from lorastack.train import TrainConfig

    with torch.no_grad():  # the random tiny model answers only newlines, which are dropped: make it say words
        blank = [i for i in range(len(tiny_base.tokenizer)) if not tiny_base.tokenizer.decode([i]).strip()]
        tiny_base.model.lm_head.weight[blank] = 0
    runtime = Runtime(tiny_base, lib)
    prompts = ["What is the capital of Peru?", "Write a short poem about rain.", "Explain how a lock works."]
    want = [runtime.generate(p, sampling=Sampling(max_tokens=6)).text for p in prompts]
    real_start = runtime.start
    monkeypatch.setattr(runtime, "start", lambda *a, **k: _Finished(real_start(*a, **k)))
    adapter = train_general(tiny_base, runtime, "general", TrainConfig(steps=2, batch_size=2, eval_n=0, eval_generate=0,
                                                                       checkpoint_every=0),
                            prompts=prompts, max_tokens=6, progress=False)
    assert adapter.card.routable is False and adapter.card.data["records"] == 3
    assert not adapter.examples()  # nothing for kNN to match either
    assert not runtime.fits("general") and runtime.fits("a")  # every router skips it; it is still served by name
    assert runtime.generate("x", model="general", sampling=Sampling(max_tokens=2)).text is not None
    merged = merge(lib, ["a", "b"], "ab_minus_general", method="linear", subtract="general")
    assert merged.card.model_dump()["composition"]["subtract"] == "general"
    # The records were the base's greedy answers: a record is (prompt, what the bare base said).
    from lorastack.compose.general import self_distilled_records

    records, dropped = self_distilled_records(runtime, prompts, max_tokens=6)
    assert [r["completion"] for r in records] == want and dropped == 0


def test_general_adapter_refuses_when_answers_do_not_end(runtime):
    from lorastack.compose.general import self_distilled_records
    from lorastack.errors import LorastackError

    with pytest.raises(LorastackError, match="answers ended within 3 tokens; raise --max-tokens"):
        self_distilled_records(runtime, ["What is the capital of Peru?", "Tell me a joke."], max_tokens=3)
