"""Prompt-lookup speculative decoding: the drafts, and outputs token-identical to plain decoding."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from lorastack.engine import native
from lorastack.engine.engine import Engine
from lorastack.engine.speculative import PromptLookup
from lorastack.engine.sampling import Sampling
from lorastack.route import parse_spec
from lorastack.tasks import get_task
from test_engine import lib_with_adapters  # noqa: F401 - fixture


def test_lookup_proposes_what_followed_the_latest_occurrence_of_the_longest_suffix():
    look = PromptLookup([5, 6, 7, 8, 9, 1, 6, 7, 2, 3])
    look.extend([6, 7])
    # Suffix (6, 7) occurred twice; the latest occurrence was followed by 2, 3, 6, 7.
    assert look.propose(3) == [2, 3, 6]
    look.extend([8])  # suffix (6, 7, 8) only matches the first occurrence: longest n-gram wins
    assert look.propose(4) == [9, 1, 6, 7]
    assert look.propose(0) == []
    assert PromptLookup([1, 2, 3]).propose(4) == []  # 3 never occurred before the end
    assert PromptLookup([4, 4]).propose(5) == [4]  # a draft stops where the context ends


def test_lookup_rejects_bad_ngram_bounds():
    with pytest.raises(ValueError, match="min_ngram"):
        PromptLookup([1], max_ngram=1, min_ngram=2)


def _run(base, lib, jobs, speculate: int, max_batch: int = 8):
    eng = Engine(base, resolve=lib.get, max_batch=max_batch, speculate=speculate)
    reqs = [eng.submit(p, parse_spec(spec), s) for p, spec, s in jobs]
    while not all(r.done for r in reqs):
        eng.step()
    return [(r.tokens, r.text, r.finish_reason) for r in reqs], eng.stats


def _jobs(n: int, seed: int):
    """Copy-heavy task prompts on mixed routes, some sampled rows, mixed lengths and stops."""
    rng = random.Random(seed)
    prompts = [r["prompt"] for name in ("reverse_words", "json_field", "date_format")
               for r in get_task(name).generate(n, "test", seed=seed)]
    specs = ["base", "a", "b", "c", "d", "a:0.5+b:0.5"]
    jobs = []
    for i, p in enumerate(prompts):
        sampled = i % 4 == 3
        s = Sampling(max_tokens=rng.choice([5, 12, 24]), temperature=0.8 if sampled else 0.0, seed=i if sampled else None,
                     stop=("}",) if i % 5 == 0 else (), ignore_eos=i % 3 == 0)
        jobs.append((p, specs[i % len(specs)], s))
    return jobs


def test_speculative_outputs_are_token_identical_in_mixed_batches(tiny_base, lib_with_adapters):  # noqa: F811
    jobs = _jobs(6, seed=1)
    plain, plain_stats = _run(tiny_base, lib_with_adapters, jobs, speculate=0)
    spec, stats = _run(tiny_base, lib_with_adapters, jobs, speculate=5)
    assert plain_stats["drafted"] == 0
    assert stats["accepted"] > 0 and stats["drafted"] > stats["accepted"]  # both accept and reject ran
    assert stats["steps"] < plain_stats["steps"]  # it saved forward passes
    for i, ((p, _, ps), (q, _, qs)) in enumerate(zip(plain, spec)):
        assert (p, ps) == (q, qs), f"request {i} ({jobs[i][1]}, {jobs[i][2]}) differs"


def test_speculative_matches_in_bf16_with_native_kernels(tiny_base, lib_with_adapters):  # noqa: F811
    """bf16 (the compiled kernels where they build): greedy rows still identical."""
    from lorastack.base import Base

    base = Base.from_model(copy.deepcopy(tiny_base.model).to(torch.bfloat16), tiny_base.tokenizer, source="tiny-bf16")
    jobs = [(p, spec, Sampling(max_tokens=s.max_tokens, ignore_eos=True)) for p, spec, s in _jobs(4, seed=2)]
    plain, _ = _run(base, lib_with_adapters, jobs, speculate=0, max_batch=4)
    spec, stats = _run(base, lib_with_adapters, jobs, speculate=7, max_batch=4)
    # Without the kernels (LORASTACK_NATIVE=0) bf16 verify passes are not batch-invariant: the engine drafts nothing.
    assert stats["accepted"] > 0 if native.kernels() is not None else stats["drafted"] == 0
    assert [t for t, _, _ in plain] == [t for t, _, _ in spec]


def test_speculative_batch_one_alone_and_cache_reuse_after_rejections(tiny_base, lib_with_adapters):  # noqa: F811
    """One row at a time on the same engine: rejected K/V from one request never leaks into the next."""
    jobs = [(p, spec, Sampling(max_tokens=20, ignore_eos=True)) for p, spec, _ in _jobs(2, seed=3)]
    plain = [_run(tiny_base, lib_with_adapters, [j], speculate=0)[0][0] for j in jobs]
    eng = Engine(tiny_base, resolve=lib_with_adapters.get, speculate=7)
    for job, ref in zip(jobs, plain):
        req = eng.submit(job[0], parse_spec(job[1]), job[2])
        while not req.done:
            eng.step()
        assert (req.tokens, req.text, req.finish_reason) == ref
    assert eng.stats["accepted"] > 0


def test_a_row_whose_drafts_miss_keeps_drafting_shorter_and_recovers(tiny_base, lib_with_adapters, monkeypatch):  # noqa: F811
    """Rejected drafts shrink a row's draft length (to one token) without stopping it: a row that
    departs from its input and then copies again drafts long again; outputs stay identical."""
    from lorastack.engine import engine as engine_mod

    job = (_jobs(1, seed=5)[0][0], "a", Sampling(max_tokens=40, ignore_eos=True))
    ref = _run(tiny_base, lib_with_adapters, [job], speculate=0)[0][0][0]  # the greedy tokens
    never = next(t for t in range(tiny_base.tokenizer.vocab_size - 1, 0, -1) if t not in ref)
    sizes: list[int] = []

    def propose(self, k):  # three drafts that miss outright, then the row's true continuation
        sizes.append(k)
        done = len(self.ctx) - self.prompt_len
        return [never] * k if len(sizes) <= 3 else ref[done : done + k]

    real_init = engine_mod.PromptLookup.__init__

    def init(self, ids, *a, **kw):
        real_init(self, ids, *a, **kw)
        self.prompt_len = len(ids)

    monkeypatch.setattr(engine_mod.PromptLookup, "__init__", init)
    monkeypatch.setattr(engine_mod.PromptLookup, "propose", propose)
    out, stats = _run(tiny_base, lib_with_adapters, [job], speculate=7)
    assert out[0][0] == ref
    assert sizes[:4] == [3, 2, 1, 1], sizes  # shorter after each miss, never stopped
    assert max(sizes) == 7 and stats["accepted"] >= 20, (sizes, stats)  # long drafts again once they hold


def test_a_route_whose_drafts_do_not_pay_stops_drafting_for_new_requests(tiny_base, lib_with_adapters, monkeypatch):  # noqa: F811
    """Across requests: once a route has drafted enough tokens with too few accepted, its new
    requests skip drafting except every SPECULATE_PROBE-th; other routes keep drafting, and the
    outputs stay identical."""
    from lorastack.engine import engine as engine_mod

    prompts = [p for p, _, _ in _jobs(2, seed=5)[:2]]
    jobs = {spec: (p, spec, Sampling(max_tokens=12, ignore_eos=True)) for spec, p in zip(("a", "b"), prompts)}
    refs = {spec: _run(tiny_base, lib_with_adapters, [job], speculate=0)[0][0][0] for spec, job in jobs.items()}
    never = next(t for t in range(tiny_base.tokenizer.vocab_size - 1, 0, -1) if all(t not in r for r in refs.values()))
    eng = Engine(tiny_base, resolve=lib_with_adapters.get, speculate=7)
    real = engine_mod.PromptLookup.propose

    def propose(self, k):  # route a's drafts (its prompt) always miss; route b's are the real ones
        return [never] * k if self.ctx[: len(marker)] == marker else real(self, k)

    monkeypatch.setattr(engine_mod.PromptLookup, "propose", propose)
    marker = eng.submit(prompts[0], parse_spec("a"), Sampling(max_tokens=1)).prompt_ids
    drafted_on_a = []
    for _ in range(2 * engine_mod.SPECULATE_PROBE + 8):
        before = eng.stats["drafted"]
        req = eng.submit(jobs["a"][0], parse_spec("a"), jobs["a"][2])
        while not req.done:
            eng.step()
        assert req.tokens == refs["a"]
        drafted_on_a.append(eng.stats["drafted"] - before)
    assert drafted_on_a[0] > 0
    learned = next(i for i, d in enumerate(drafted_on_a) if d == 0)
    later = drafted_on_a[learned:]
    probes = [d for d in later if d]
    assert 1 <= len(probes) <= 1 + len(later) // engine_mod.SPECULATE_PROBE, drafted_on_a  # only the probes draft
    before = eng.stats["drafted"]
    req = eng.submit(jobs["b"][0], parse_spec("b"), jobs["b"][2])
    while not req.done:
        eng.step()
    assert req.tokens == refs["b"] and eng.stats["drafted"] > before, drafted_on_a  # route b still drafts


def test_failed_verify_pass_fails_its_rows_and_the_engine_goes_on(tiny_base, lib_with_adapters):  # noqa: F811
    jobs = [(p, spec, Sampling(max_tokens=12, ignore_eos=True)) for p, spec, _ in _jobs(1, seed=4)]
    expected, _ = _run(tiny_base, lib_with_adapters, jobs, speculate=0)
    eng = Engine(tiny_base, resolve=lib_with_adapters.get, speculate=7)
    real = eng.runner.decode
    calls = {"n": 0}

    def flaky(cache, tokens, lora):
        if isinstance(tokens, list):  # a verify pass (per-row feeds), not a plain decode step
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("injected: verify blew up")
        return real(cache, tokens, lora)

    eng.runner.decode = flaky
    first = [eng.submit(p, parse_spec(s), samp) for p, s, samp in jobs]
    while not all(r.done for r in first):
        eng.step()
    assert calls["n"] >= 1 and all(r.error is not None and "decode" in str(r.error) for r in first)
    assert eng.cache.n == 0 and not eng.running and not eng.bank.pinned
    again = [eng.submit(p, parse_spec(s), samp) for p, s, samp in jobs]
    while not all(r.done for r in again):
        eng.step()
    assert [(r.tokens, r.text, r.finish_reason) for r in again] == expected


@pytest.mark.integration
def test_speculative_is_token_identical_on_the_embedded_base(tmp_path):
    """Copy-heavy task prompts, base and an adapter, batch of 4 and alone (bf16, as served)."""
    from lorastack.base import Base
    from lorastack.library import Library
    from test_library import make_peft_adapter

    base = Base.load("embedded", dtype="bfloat16")
    lib = Library(tmp_path / "lib")
    lib.add(make_peft_adapter(base, tmp_path / "x", rank=8, seed=0, targets=("q_proj", "v_proj", "up_proj")), "x", base=base)
    prompts = [r["prompt"] for name in ("reverse_words", "json_field", "date_format")
               for r in get_task(name).generate(2, "test", seed=5)]
    jobs = [(p, "x" if i % 2 else "base", Sampling(max_tokens=32)) for i, p in enumerate(prompts)]
    plain, _ = _run(base, lib, jobs, speculate=0, max_batch=4)
    spec, stats = _run(base, lib, jobs, speculate=7, max_batch=4)
    print(f"accepted {stats['accepted']} of {stats['drafted']} drafted tokens; steps {stats['steps']}")
    if native.kernels() is None:  # LORASTACK_NATIVE=0 or no AVX512-BF16: torch only, drafts are off (not exact)
        assert stats["drafted"] == 0
    else:
        assert stats["accepted"] > 0
    assert spec == plain
    for job in jobs[:2]:  # batch 1 (a prefill alone rounds differently from a packed one, so compare alone with alone)
        assert _run(base, lib, [job], speculate=7)[0] == _run(base, lib, [job], speculate=0)[0]
