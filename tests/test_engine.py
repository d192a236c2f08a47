"""The engine: per-row LoRA in mixed batches matches PEFT; continuous batching; streaming."""

from __future__ import annotations

import copy
import random
import threading
from unittest.mock import patch

import pytest
import torch

from lorastack.engine.engine import Engine
from lorastack.engine.generate import Generator
from lorastack.engine.sampling import Sampling
from lorastack.errors import LorastackError
from lorastack.library import Library
from lorastack.route import BASE_ROUTE, Route, parse_spec
from test_library import make_peft_adapter


@pytest.fixture()
def lib_with_adapters(tiny_base, tmp_path):
    lib = Library(tmp_path / "lib")
    specs = {"a": ("q_proj", "v_proj"), "b": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
             "c": ("up_proj", "down_proj"), "d": ("o_proj",)}
    for i, (name, targets) in enumerate(specs.items()):
        lib.add(make_peft_adapter(tiny_base, tmp_path / name, rank=4 + 2 * i, seed=i, targets=targets), name, base=tiny_base)
    return lib


def peft_logits(tiny_base, lib, route: Route, ids: list[int]) -> torch.Tensor:
    """Logits of the whole sequence through PEFT, one request alone (the reference)."""
    from peft import PeftModel

    if route.is_base:
        model = tiny_base.model
    else:
        names = route.names
        model = PeftModel.from_pretrained(copy.deepcopy(tiny_base.model), str(lib.get(names[0]).path), adapter_name=names[0])
        for n in names[1:]:
            model.load_adapter(str(lib.get(n).path), adapter_name=n)
        if len(route.entries) > 1 or route.entries[0][1] != 1.0:
            model.add_weighted_adapter(names, [w for _, w in route.entries], adapter_name="mix", combination_type="cat")
            model.set_adapter("mix")
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def test_mixed_batch_matches_peft_per_request_fp32(tiny_base, lib_with_adapters):
    lib = lib_with_adapters
    engine = Engine(tiny_base, resolve=lib.get)
    routes = [BASE_ROUTE, parse_spec("a"), parse_spec("b"), parse_spec("c"), parse_spec("a:0.7+d:0.3"), parse_spec("b")]
    prompts = [tiny_base.chat_ids([{"role": "user", "content": f"Sort these words alphabetically: pear fig {w}"}])
               for w in ["apple", "kiwi plum", "a", "lemon lime melon", "x", "apple"]]
    prompts[5] = prompts[5][:-3]  # uneven lengths
    reqs = [engine.submit_ids(p, r, Sampling(max_tokens=12)) for p, r in zip(prompts, routes)]
    # Record the logits the engine computes at each step for each request.
    seen: dict[int, list[torch.Tensor]] = {r.id: [] for r in reqs}
    emit = engine._emit

    def spy(rs, logits, rows):
        for r, l in zip(rs, logits):
            seen[r.id].append(l.clone())
        emit(rs, logits, rows)

    engine._emit = spy
    while not all(r.done for r in reqs):
        engine.step()
    assert engine.stats["prefills"] == 1, "all six were admitted and prefilled together"
    for req, route, prompt in zip(reqs, routes, prompts):
        gen = req.tokens
        ref = peft_logits(tiny_base, lib, route, prompt + gen)
        steps = torch.stack(seen[req.id])
        expect = ref[len(prompt) - 1 : len(prompt) - 1 + len(steps)]
        assert torch.allclose(steps, expect, atol=1e-4), (str(route), (steps - expect).abs().max())
        assert gen == expect.argmax(-1).tolist()[: len(gen)]
    # Routes really differ: not all rows produced the same continuation.
    assert len({tuple(r.tokens) for r in reqs[:5]}) > 1


def test_generate_matches_peft_generator(tiny_base, lib_with_adapters):
    from lorastack.engine.generate import Generator

    lib = lib_with_adapters
    convs = [[{"role": "user", "content": f"Reverse the order of these words: {w}"}] for w in ["a b c", "river stone", "x"]]
    engine = Engine(tiny_base, resolve=lib.get)
    ours = engine.generate(convs, parse_spec("b"), Sampling(max_tokens=10))
    ref = Generator(dataclasses_replace(tiny_base), resolve=lambda n: str(lib.get(n).path)).generate(convs, parse_spec("b"), Sampling(max_tokens=10))
    assert [g.text for g in ours] == [g.text for g in ref]
    assert [g.completion_tokens for g in ours] == [g.completion_tokens for g in ref]


def dataclasses_replace(base):
    import dataclasses

    return dataclasses.replace(base, model=copy.deepcopy(base.model))


def test_continuous_batching_admits_between_steps_and_respects_limits(tiny_base, lib_with_adapters):
    engine = Engine(tiny_base, resolve=lib_with_adapters.get, max_batch=3)
    ids = tiny_base.chat_ids([{"role": "user", "content": "What is 1 + 2?"}])
    reqs = [engine.submit_ids(ids, parse_spec(r), Sampling(max_tokens=n)) for r, n in
            [("a", 3), ("b", 8), ("base", 5), ("c", 4), ("d", 2)]]
    max_running = 0
    while not all(r.done for r in reqs):
        engine.step()
        max_running = max(max_running, len(engine.running))
    assert max_running == 3
    for r, n in zip(reqs, [3, 8, 5, 4, 2]):
        assert len(r.tokens) == n or r.finish_reason == "stop"
    # FIFO: the fourth request started before the fifth.
    assert reqs[3].first_token_at <= reqs[4].first_token_at


def test_answers_stop_at_the_base_context_and_overlong_prompts_are_refused(tiny_base):
    context = tiny_base.context_length()
    engine = Engine(tiny_base)
    ids = [5] * (context - 4)
    req = engine.submit_ids(ids, BASE_ROUTE, Sampling(max_tokens=50, ignore_eos=True))
    while not req.done:
        engine.step()
    gen = req.result()
    assert gen.completion_tokens == 4 and gen.finish_reason == "length"
    with pytest.raises(LorastackError, match=f"prompt is {context} tokens; the base's context is {context}"):
        engine.submit_ids([5] * context, BASE_ROUTE, Sampling(max_tokens=1))
    gen = Generator(tiny_base).generate([[{"role": "user", "content": "word " * (context - 40)}]], BASE_ROUTE,
                                        Sampling(max_tokens=50))[0]
    assert gen.prompt_tokens + gen.completion_tokens <= context
    with pytest.raises(LorastackError, match="the base's context is"):
        Generator(tiny_base).generate([[{"role": "user", "content": "word " * context}]], BASE_ROUTE, Sampling(max_tokens=1))


def test_sampling_seed_is_reproducible_and_stop_strings(tiny_base):
    engine = Engine(tiny_base)
    s = Sampling(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    a = engine.generate([[{"role": "user", "content": "hello"}]], BASE_ROUTE, s)[0]
    b = engine.generate([[{"role": "user", "content": "hello"}]], BASE_ROUTE, s)[0]
    assert a.text == b.text and a.completion_tokens == b.completion_tokens
    if len(a.text) > 3:
        stop = a.text[1:3]
        c = engine.generate([[{"role": "user", "content": "hello"}]], BASE_ROUTE, Sampling(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=7, stop=(stop,)))[0]
        assert stop not in c.text and c.finish_reason == "stop" and a.text.startswith(c.text)


def test_unknown_adapter_fails_only_its_request(tiny_base, lib_with_adapters):
    engine = Engine(tiny_base, resolve=lib_with_adapters.get)
    good = engine.submit("hi", parse_spec("a"), Sampling(max_tokens=3))
    bad = engine.submit("hi", Route((("nope", 1.0),)), Sampling(max_tokens=3))
    while not (good.done and bad.done):
        engine.step()
    assert good.result().completion_tokens > 0
    with pytest.raises(LorastackError, match="unknown adapter 'nope'"):
        bad.result()


def test_stress_threads_random_routes_no_crosstalk(tiny_base, lib_with_adapters):
    """200 requests from 8 threads with random routes and lengths, background loop."""
    engine = Engine(tiny_base, resolve=lib_with_adapters.get, max_batch=16, max_resident=3)
    routes = ["base", "a", "b", "c", "d", "a:0.5+b:0.5"]
    prompt = tiny_base.chat_ids([{"role": "user", "content": "Close the brackets: ( [ {"}])
    # Reference: each route alone, greedy, long enough for every length used below.
    alone = {r: engine.generate([[{"role": "user", "content": "Close the brackets: ( [ {"}]], parse_spec(r), Sampling(max_tokens=24))[0] for r in routes}
    ref_tokens = {}
    for r in routes:
        req = engine.submit_ids(prompt, parse_spec(r), Sampling(max_tokens=24))
        while not req.done:
            engine.step()
        ref_tokens[r] = req.tokens
    engine.start()
    results, errors = [], []

    def worker(seed):
        rng = random.Random(seed)
        for _ in range(25):
            r, n = rng.choice(routes), rng.randint(1, 24)
            req = engine.submit_ids(prompt, parse_spec(r), Sampling(max_tokens=n))
            try:
                req.result(timeout=120)
                results.append((r, n, req.tokens))
            except Exception as e:  # noqa: BLE001
                errors.append(e)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    engine.stop()
    assert not errors and len(results) == 200
    for r, n, toks in results:
        expect = ref_tokens[r][:n]
        assert toks == expect, f"route {r} max_tokens {n}: {toks} != {expect}"
    assert alone["a"].text is not None


def test_prefix_reuse_matches_peft(tiny_base, lib_with_adapters):
    """A second prompt sharing the first's opening reuses its KV and still matches PEFT."""
    lib = lib_with_adapters
    engine = Engine(tiny_base, resolve=lib.get)
    seen: list[torch.Tensor] = []
    emit = engine._emit

    def spy(rs, logits, rows):
        seen.append(logits[0].clone())
        emit(rs, logits, rows)

    p1 = tiny_base.chat_ids([{"role": "user", "content": "Sort these words alphabetically: pear fig apple"}])
    p2 = tiny_base.chat_ids([{"role": "user", "content": "Sort these words alphabetically: kiwi lime"}])
    route = parse_spec("a:0.6+b:0.4")
    first = engine.submit_ids(p1, route, Sampling(max_tokens=4))
    while not first.done:
        engine.step()
    engine._emit = spy
    second = engine.submit_ids(p2, route, Sampling(max_tokens=6))
    while not second.done:
        engine.step()
    assert engine.prefixes.hits == 1 and engine.prefixes.reused_tokens >= 10
    ref = peft_logits(tiny_base, lib, route, p2 + second.tokens)
    steps = torch.stack(seen)
    assert torch.allclose(steps, ref[len(p2) - 1 : len(p2) - 1 + len(steps)], atol=1e-4)
    # Another route never reuses this route's KV.
    other = engine.submit_ids(p2, parse_spec("a"), Sampling(max_tokens=2))
    while not other.done:
        engine.step()
    assert engine.prefixes.hits == 1
    engine.forget("b")
    assert not any("b" in k[0] for k in engine.prefixes.entries)


def test_int8_decode_weights_are_close_and_used_for_small_batches(tiny_base):
    from lorastack.base import Base
    from lorastack.engine.llama import quantize_int8

    w = torch.randn(96, 64)
    w8, scale = quantize_int8(w)
    assert w8.dtype == torch.int8
    assert (w8.float() * scale[:, None] - w).abs().max() <= scale.max() / 2 + 1e-6

    model = copy.deepcopy(tiny_base.model).to(torch.bfloat16)
    base = Base.from_model(model, tiny_base.tokenizer, source="tiny-bf16")
    eng = Engine(base, int8_rows=2)
    assert eng.runner.int8_rows == 2 and eng.runner.q8
    x = torch.randn(1, 1, 64, dtype=torch.bfloat16)
    weight = eng.runner.fused[0]["gate_up_proj"][0]
    exact = torch.nn.functional.linear(x.float(), weight.float())
    got = eng.runner._matmul(x, weight, None).float()
    assert ((got - exact).norm() / exact.norm()) < 0.03
    calls = []
    real = torch.ops.aten._weight_int8pack_mm
    with patch.object(torch.ops.aten, "_weight_int8pack_mm", side_effect=lambda *a: calls.append(a[0].shape[0]) or real(*a)):
        out = eng.generate([[{"role": "user", "content": "hi"}]], Route(), Sampling(max_tokens=5, ignore_eos=True))
        assert out[0].completion_tokens == 5 and calls and max(calls) <= 2
        calls.clear()
        eng.generate([[{"role": "user", "content": f"hi {i}"}] for i in range(4)], Route(), Sampling(max_tokens=3, ignore_eos=True))
        assert not calls  # 4 rows > int8_rows: the bf16 weights serve the batch
