"""Fault isolation in the engine: a row that raises while being prepared, sampled or
finished fails alone; a step that raises fails its rows and the loop goes on; a loop that
dies is reported and restarted. Every other request must complete with the output it
gets when run alone."""

from __future__ import annotations

import time

import pytest
import torch

from lorastack.engine import sampling as sampling_mod
from lorastack.engine.engine import Engine, EngineError
from lorastack.engine.sampling import Sampling
from lorastack.errors import LorastackError
from lorastack.library import Library
from lorastack.route import BASE_ROUTE, parse_spec
from test_library import make_peft_adapter

PROMPTS = [f"Reverse the order of these words: {w}" for w in ("red green", "one two three", "sun moon", "a b c d")]
ROUTES = ["base", "a", "b", "a:0.5+b:0.5"]


@pytest.fixture()
def engine(tiny_base, tmp_path) -> Engine:
    lib = Library(tmp_path / "lib")
    for i, name in enumerate(("a", "b")):
        lib.add(make_peft_adapter(tiny_base, tmp_path / name, seed=i), name, base=tiny_base)
    return Engine(tiny_base, resolve=lib.get, max_batch=8)


def reference(engine: Engine) -> list[str]:
    """Each request alone, greedy: what every unaffected request must still produce."""
    return [engine.generate([[{"role": "user", "content": p}]], parse_spec(r), Sampling(max_tokens=8))[0].text
            for p, r in zip(PROMPTS, ROUTES)]


def run_all(engine: Engine, victim: int, sampling_for_victim: Sampling | None = None, **victim_kw) -> list:
    reqs = []
    for i, (p, r) in enumerate(zip(PROMPTS, ROUTES)):
        s = sampling_for_victim if (i == victim and sampling_for_victim) else Sampling(max_tokens=8)
        reqs.append(engine.submit(p, parse_spec(r), s, **(victim_kw if i == victim else {})))
    while not all(r.done for r in reqs):
        engine.step()
    return reqs


def assert_others_intact(reqs, expected: list[str], victim: int) -> None:
    for i, (req, want) in enumerate(zip(reqs, expected)):
        if i == victim:
            assert req.error is not None
            with pytest.raises(LorastackError):
                req.result()
        else:
            assert req.error is None, f"request {i} failed: {req.error}"
            assert req.result().text == want


def test_row_failing_while_prepared_fails_alone(engine, monkeypatch):
    expected = reference(engine)
    real = engine.bank.slots_for

    def broken(route):
        if route == parse_spec("b"):
            raise RuntimeError("injected: adapter load failed")
        return real(route)

    monkeypatch.setattr(engine.bank, "slots_for", broken)
    reqs = run_all(engine, victim=2)
    assert_others_intact(reqs, expected, victim=2)
    assert "injected" in str(reqs[2].error)


def test_row_failing_while_sampled_fails_alone(engine, monkeypatch):
    expected = reference(engine)
    real = sampling_mod._sample

    def broken(logits, s, gen):
        if s.seed == 666:
            raise RuntimeError("injected: sampler exploded")
        return real(logits, s, gen)

    monkeypatch.setattr(sampling_mod, "_sample", broken)
    reqs = run_all(engine, victim=1, sampling_for_victim=Sampling(max_tokens=8, temperature=0.7, seed=666))
    assert_others_intact(reqs, expected, victim=1)
    assert "sampler exploded" in str(reqs[1].error)


def test_row_failing_while_finished_fails_alone(engine):
    expected = reference(engine)

    def broken(text: str) -> bool:
        raise ValueError("injected: stop check failed")

    reqs = run_all(engine, victim=3, abandon_when=broken)
    assert_others_intact(reqs, expected, victim=3)


def test_nan_logits_with_temperature_fail_only_their_row(engine, monkeypatch):
    """What an adapter holding NaN weights does at temperature > 0 (import refuses such
    adapters; this covers one written into the library behind its back)."""
    expected = reference(engine)
    real = engine.runner.decode

    def poisoned(cache, tokens, lora):
        logits = real(cache, tokens, lora).clone()
        for row, req in enumerate(engine.running):
            if req.sampling.seed == 7:
                logits[row] = float("nan")
        return logits

    monkeypatch.setattr(engine.runner, "decode", poisoned)
    reqs = run_all(engine, victim=0, sampling_for_victim=Sampling(max_tokens=8, temperature=1.0, seed=7))
    assert_others_intact(reqs, expected, victim=0)
    assert "NaN" in str(reqs[0].error)


def test_failed_decode_step_fails_its_rows_and_the_engine_goes_on(engine, monkeypatch):
    expected = reference(engine)
    real = engine.runner.decode
    calls = {"n": 0}

    def flaky(cache, tokens, lora):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected: decode blew up")
        return real(cache, tokens, lora)

    monkeypatch.setattr(engine.runner, "decode", flaky)
    first = [engine.submit(p, parse_spec(r), Sampling(max_tokens=8)) for p, r in zip(PROMPTS, ROUTES)]
    while not all(r.done for r in first):
        engine.step()
    assert all(isinstance(r.error, EngineError) and "decode" in str(r.error) for r in first)
    assert engine.cache.n == 0 and not engine.running
    assert not engine.bank.pinned  # every failed row released its adapter slots
    again = run_all(engine, victim=-1)
    assert [r.result().text for r in again] == expected


def test_failed_prefill_fails_only_the_admitted_rows(engine, monkeypatch):
    expected = reference(engine)
    running = engine.submit(PROMPTS[0], BASE_ROUTE, Sampling(max_tokens=8))
    engine.step()  # admitted and prefilled: now decoding
    real = engine.runner.prefill

    def broken(*args, **kw):
        raise RuntimeError("injected: prefill failed")

    monkeypatch.setattr(engine.runner, "prefill", broken)
    late = engine.submit(PROMPTS[1], parse_spec("a"), Sampling(max_tokens=8))
    engine.step()
    monkeypatch.setattr(engine.runner, "prefill", real)
    while not running.done:
        engine.step()
    assert isinstance(late.error, EngineError) and "prefill" in str(late.error)
    assert running.result().text == expected[0]
    assert engine.cache.n == 0 and not engine.bank.pinned


def test_dead_loop_is_reported_fails_waiters_and_restarts(engine, monkeypatch):
    expected = reference(engine)
    real_step = engine.step

    def fatal() -> None:
        raise SystemExit("injected: the loop itself died")

    monkeypatch.setattr(engine, "step", fatal)
    engine.start()
    doomed = engine.submit(PROMPTS[0], BASE_ROUTE, Sampling(max_tokens=8))
    with pytest.raises(EngineError, match="engine stopped"):
        doomed.result(timeout=30)  # failed, not left hanging
    deadline = time.monotonic() + 10
    while engine.alive and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not engine.alive and engine.failure is not None
    monkeypatch.setattr(engine, "step", real_step)
    engine.start()  # what the server does on the next request
    try:
        assert engine.alive and engine.stats["restarts"] == 1
        req = engine.submit(PROMPTS[1], parse_spec("a"), Sampling(max_tokens=8))
        assert req.result(timeout=60).text == expected[1]
    finally:
        engine.stop()


@pytest.mark.parametrize("field, value", [("temperature", 1e-300), ("top_p", 1e-300), ("temperature", 5e-324)])
def test_degenerate_sampling_values_mean_greedy(engine, field, value):
    expected = reference(engine)
    kw = {"temperature": 0.8, field: value} if field == "top_p" else {field: value}
    s = Sampling(max_tokens=8, seed=1, **kw)
    assert s.greedy
    out = engine.generate([[{"role": "user", "content": PROMPTS[1]}]], parse_spec("a"), s)[0]
    assert out.text == expected[1]


@pytest.mark.parametrize("kw, msg", [({"seed": 2**64}, "64 bits"), ({"seed": -(2**63) - 1}, "64 bits"),
                                     ({"temperature": float("nan")}, "finite"), ({"top_p": float("inf")}, "finite")])
def test_out_of_range_sampling_is_refused(kw, msg):
    with pytest.raises(LorastackError, match=msg):
        Sampling(**kw)


def test_sampling_keeps_the_top_token_whatever_top_p_rounds_to():
    logits = torch.tensor([0.0, 5.0, 1.0])
    gen = torch.Generator().manual_seed(0)
    s = Sampling(temperature=1.0, top_p=1e-5)  # above the greedy floor, tiny after float32 rounding
    assert not s.greedy
    assert all(sampling_mod._sample(logits, s, gen) == 1 for _ in range(20))


def test_prefix_cache_keeps_only_the_start_of_long_prompts(engine):
    """Bounded memory: a long prompt's cached K/V is cut to `max_entry_tokens`, and reusing
    that cut prefix still gives the same output as a cold prefill."""
    expected = reference(engine)
    engine.prefixes.clear()
    engine.prefixes.max_entry_tokens = 6
    for _ in range(2):  # the second pass reuses the stored (cut) prefixes
        got = [engine.generate([[{"role": "user", "content": p}]], parse_spec(r), Sampling(max_tokens=8))[0].text
               for p, r in zip(PROMPTS, ROUTES)]
        assert got == expected
    assert engine.prefixes.entries and all(len(e.ids) <= 6 and e.k[0].shape[1] <= 6 for e in engine.prefixes.entries.values())
    assert engine.prefixes.hits > 0


def test_a_routed_request_whose_adapter_vanished_is_routed_again(engine, monkeypatch):
    expected = reference(engine)
    real = engine.bank.slots_for
    from lorastack.errors import NotFoundError

    def gone(route):
        if route == parse_spec("b"):
            raise NotFoundError("unknown adapter 'b'")
        return real(route)

    monkeypatch.setattr(engine.bank, "slots_for", gone)
    req = engine.submit(PROMPTS[1], parse_spec("b"), Sampling(max_tokens=8), reroute=lambda: parse_spec("a"))
    while not req.done:
        engine.step()
    assert req.error is None and str(req.route) == "a" and req.result().text == expected[1]
    named = engine.submit(PROMPTS[1], parse_spec("b"), Sampling(max_tokens=8))  # asked for by name: no second guess
    while not named.done:
        engine.step()
    assert isinstance(named.error, NotFoundError)
