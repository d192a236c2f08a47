"""The compiled bf16 decode kernels: same math as torch (to bf16 rounding), used by the engine."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch

from lorastack.engine import native
from lorastack.engine.engine import Engine
from lorastack.engine.sampling import Sampling
from lorastack.route import parse_spec
from test_engine import lib_with_adapters  # noqa: F401 - fixture

_flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
CAN_BUILD = all(f in _flags.split() for f in native._NEEDED) and shutil.which("gcc") is not None
pytestmark = pytest.mark.skipif(not CAN_BUILD, reason="needs gcc and an AVX512-BF16 CPU (the engine then uses torch)")


@pytest.fixture(scope="module")
def kernels():
    k = native.kernels()
    assert k is not None, "gcc and AVX512-BF16 are present, so the kernels must build"
    return k


def _rounding(ref: torch.Tensor) -> float:
    """Largest error bf16 output rounding alone makes on `ref` (plus accumulation-order slack)."""
    return 2 * (ref.bfloat16().float() - ref).abs().max().item() + 1e-3


@pytest.mark.parametrize("m,k,n", [(1, 576, 960), (3, 100, 37), (8, 64, 129)])
def test_gemv_matches_fp32_math(kernels, m, k, n):
    torch.manual_seed(m)
    x, w = torch.randn(m, k, dtype=torch.bfloat16), torch.randn(n, k, dtype=torch.bfloat16)
    ref = x.float() @ w.float().t()
    assert (kernels.gemv(x, w).float() - ref).abs().max().item() <= _rounding(ref)


def test_lora_kernel_matches_reference(kernels):
    """Rows on different slots, a weighted mixture, a base row; three parts of odd widths."""
    torch.manual_seed(0)
    slots_n, rank, fin, outs = 5, 8, 100, [40, 17, 530]
    a = torch.randn(slots_n, 3 * rank, fin, dtype=torch.bfloat16)
    bs = [torch.randn(slots_n, rank, o, dtype=torch.bfloat16) * 0.1 for o in outs]
    rows = [[(1, 1.0)], [], [(2, 0.7), (4, 0.3)], [(1, 1.0)], [(3, 2.0)]]
    x = torch.randn(len(rows), fin, dtype=torch.bfloat16)
    y = torch.randn(len(rows), sum(outs), dtype=torch.bfloat16)
    ref = y.float().clone()
    for i, entries in enumerate(rows):
        for s, w in entries:
            t = (a[s].float() @ x[i].float()) * w
            col = 0
            for p, o in enumerate(outs):
                ref[i, col : col + o] += t[p * rank : (p + 1) * rank] @ bs[p][s].float()
                col += o
    slots = torch.zeros(len(rows), 2, dtype=torch.int64)
    weights = torch.zeros(len(rows), 2)
    for i, entries in enumerate(rows):
        for j, (s, w) in enumerate(entries):
            slots[i, j], weights[i, j] = s, w
    kernels.lora(x, y, a, bs, rank, slots, weights)
    assert (y.float() - ref).abs().max().item() <= _rounding(ref)
    assert torch.equal(y[1].float(), ref[1])  # the base row is left exactly as it was


def test_engine_bf16_native_matches_torch_path(tiny_base, lib_with_adapters):  # noqa: F811
    """A mixed bf16 batch (base, adapters, a mixture) through the kernels and through torch."""
    from lorastack.base import Base

    model = copy.deepcopy(tiny_base.model).to(torch.bfloat16)
    base = Base.from_model(model, tiny_base.tokenizer, source="tiny-bf16")
    specs = ["base", "a", "b", "c", "d", "a:0.5+b:0.5"]
    prompts = [[{"role": "user", "content": f"question number {i}"}] for i in range(len(specs))]
    logits: dict[bool, list[torch.Tensor]] = {}
    tokens: dict[bool, list[list[int]]] = {}
    for use in (True, False):
        eng = Engine(base, resolve=lib_with_adapters.get, native=use)
        assert (eng.runner.native is not None) == use
        seen: list[torch.Tensor] = []
        emit = eng._emit

        def spy(rs, lg, rows, emit=emit, seen=seen):
            seen.append(lg.clone())
            emit(rs, lg, rows)

        eng._emit = spy
        reqs = [eng.submit(p, parse_spec(s), Sampling(max_tokens=6, ignore_eos=True)) for p, s in zip(prompts, specs)]
        while not all(r.done for r in reqs):
            eng.step()
        logits[use], tokens[use] = seen, [r.tokens for r in reqs]
    # Same first step (prefill runs through torch in both) and decode logits at bf16 rounding level.
    for got, ref in zip(logits[True], logits[False]):
        assert got.shape == ref.shape
        assert (got - ref).abs().max().item() <= 0.05 * ref.abs().max().item() + 0.05
    agree = sum(a == b for x, y in zip(tokens[True], tokens[False]) for a, b in zip(x, y))
    assert agree >= 0.9 * sum(len(t) for t in tokens[False])
