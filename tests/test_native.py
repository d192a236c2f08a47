"""The compiled bf16 decode kernels: same math as torch (to bf16 rounding), used by the engine."""

from __future__ import annotations

import copy
import os
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
DISABLED = os.environ.get("LORASTACK_NATIVE", "1") == "0"  # the torch fallback is then what tests/test_engine.py runs
pytestmark = pytest.mark.skipif(not CAN_BUILD or DISABLED,
                                reason="needs gcc and an AVX512-BF16 CPU, and LORASTACK_NATIVE not 0 (the engine then uses torch)")


@pytest.fixture(scope="module")
def kernels():
    k = native.kernels()
    assert k is not None, "gcc and AVX512-BF16 are present, so the kernels must build"
    return k


def record(eng: Engine, jobs: list) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Run `(messages, route spec, sampling)` jobs to the end: the logits of every emitted
    token, step by step, and each request's tokens."""
    seen: list[torch.Tensor] = []
    emit = eng._emit

    def spy(rs, lg, rows):
        seen.append(lg.clone())
        emit(rs, lg, rows)

    eng._emit = spy
    reqs = [eng.submit(p, parse_spec(s), samp) for p, s, samp in jobs]
    while not all(r.done for r in reqs):
        eng.step()
    return seen, [r.tokens for r in reqs]


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
    y_orig = y.clone()
    kernels.lora(x, y, a, bs, rank, slots, weights)
    assert (y.float() - ref).abs().max().item() <= _rounding(ref)
    assert torch.equal(y[1].float(), ref[1])  # the base row is left exactly as it was

    # int8 banks (int8 matmuls): a scale per rank row of A and of each B. The delta stays within
    # a few percent of its size (more than rounding: it is not the bf16 path), the base row untouched.
    def q8(w):
        sc = w.float().abs().amax(-1) / 127
        return torch.round(w.float() / sc[..., None]).clamp(-127, 127).to(torch.int8), sc

    (a8, a_s), b8 = q8(a), [q8(b) for b in bs]
    y8 = y_orig.clone()
    kernels.lora_raw(x, y8, kernels.group_args_i8(a8, a_s, [b for b, _ in b8], [sc for _, sc in b8]), rank,
                     kernels.rows_args(slots, weights))
    assert torch.equal(y8[1], y_orig[1])
    err, delta = (y8.float() - ref).abs().max().item(), (ref - y_orig.float()).abs().max().item()
    assert _rounding(ref) < err <= 0.03 * delta

    # Batch-invariant: a row gets the same bits alone and inside a run of rows on the same
    # adapters (the kernel computes up to 8 such rows together; 11 rows make runs of 8 and 3),
    # whatever the other rows' inputs.
    def run(xs, ys, s, w, i8):
        if i8:
            kernels.lora_raw(xs, ys, kernels.group_args_i8(a8, a_s, [b for b, _ in b8], [sc for _, sc in b8]), rank,
                             kernels.rows_args(s, w))
        else:
            kernels.lora(xs, ys, a, bs, rank, s, w)
        return ys

    for i8 in (False, True):
        for row in (0, 2, 4):
            alone = run(x[row : row + 1].clone(), y_orig[row : row + 1].clone(), slots[row : row + 1], weights[row : row + 1], i8)
            xs = torch.randn(11, fin, dtype=torch.bfloat16)
            ys = torch.randn(11, sum(outs), dtype=torch.bfloat16)
            for at in (0, 5, 9):
                xs[at], ys[at] = x[row], y_orig[row]
            many = run(xs, ys, slots[row].expand(11, -1).contiguous(), weights[row].expand(11, -1).contiguous(), i8)
            for at in (0, 5, 9):
                assert torch.equal(many[at], alone[0])


def test_lora_kernel_rows_in_a_run_sum_in_a_lone_rows_order(kernels):
    """Rows on one adapter are computed together, and each must still sum its terms in the order a
    row alone does. Rank rows 0 and 2 cancel (the same A row, B rows of 1e7 and -1e7), so the small
    terms that survive depend on the order of the sum: a different order changes bf16 outputs."""
    torch.manual_seed(1)
    rank, fin, outs, rows = 8, 64, [48, 16], 11
    a = torch.randn(2, 2 * rank, fin, dtype=torch.bfloat16)
    bs = [torch.randn(2, rank, o, dtype=torch.bfloat16) for o in outs]
    for p, b in enumerate(bs):
        a[:, p * rank + 2] = a[:, p * rank]
        b[:, 0] = torch.randn(2, outs[p]).mul(1e7).to(torch.bfloat16)
        b[:, 2] = -b[:, 0]

    def q8(w):
        sc = w.float().abs().amax(-1) / 127
        return torch.round(w.float() / sc[..., None]).clamp(-127, 127).to(torch.int8), sc

    (a8, a_s), b8 = q8(a), [q8(b) for b in bs]
    x = torch.randn(rows, fin, dtype=torch.bfloat16)
    slots, weights = torch.ones(rows, 1, dtype=torch.int64), torch.ones(rows, 1)
    for i8 in (False, True):
        def delta(xs):
            ys = torch.zeros(xs.shape[0], sum(outs), dtype=torch.bfloat16)
            if i8:
                kernels.lora_raw(xs, ys, kernels.group_args_i8(a8, a_s, [b for b, _ in b8], [sc for _, sc in b8]), rank,
                                 kernels.rows_args(slots[: len(xs)], weights[: len(xs)]))
            else:
                kernels.lora(xs, ys, a, bs, rank, slots[: len(xs)], weights[: len(xs)])
            return ys

        together = delta(x)
        assert together.abs().max() < 1e6  # the large terms cancelled
        for i in range(rows):
            assert torch.equal(together[i], delta(x[i : i + 1])[0]), (i8, i)


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
        eng = Engine(base, resolve=lib_with_adapters.get, native=use, speculate=0)  # step by step: no drafts (torch has none in bf16)
        assert (eng.runner.native is not None) == use
        logits[use], tokens[use] = record(eng, [(p, s, Sampling(max_tokens=6, ignore_eos=True)) for p, s in zip(prompts, specs)])
    # Same first step (prefill runs through torch in both) and decode logits at bf16 rounding level.
    for got, ref in zip(logits[True], logits[False]):
        assert got.shape == ref.shape
        assert (got - ref).abs().max().item() <= 0.05 * ref.abs().max().item() + 0.05
    agree = sum(a == b for x, y in zip(tokens[True], tokens[False]) for a, b in zip(x, y))
    assert agree >= 0.9 * sum(len(t) for t in tokens[False])


# ---------------------------------------------------------------- GGUF blocks (Q4_1, Q8_0)
def _quantize(w: torch.Tensor, kind: str):
    """(blocks uint8 [out, bytes], the weights gguf-py dequantizes them to, fp32)."""
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    qt = GGMLQuantizationType[kind]
    blocks = quants.quantize(w.float().numpy(), qt)
    return blocks, torch.from_numpy(np.ascontiguousarray(quants.dequantize(blocks, qt)))


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("width", [32, 96, 128])  # 1, 3 and 4 blocks a row: Q4_1R pairs and an odd last block
def test_block_gemv_is_bit_identical_to_bf16_gemv_of_the_dequantized_weights(kernels, kind, m, width):
    from lorastack.engine.gguf_blocks import Blocks

    torch.manual_seed(m)
    blocks, deq = _quantize(torch.randn(37, width) * 0.1 + 0.02, kind)
    raw = Blocks(kind, torch.from_numpy(blocks))
    b = raw.for_kernels()
    assert b.kind == ("Q4_1R" if kind == "Q4_1" else kind) and b.data.shape == raw.data.shape
    assert b.shape == raw.shape == (37, width)
    assert torch.equal(raw.dequantize(), deq) and torch.equal(b.dequantize(), deq)  # our reading == gguf-py's
    x = torch.randn(m, width, dtype=torch.bfloat16)
    assert torch.equal(kernels.gemv_blocks(x, b.kind, b.data), kernels.gemv(x, deq.to(torch.bfloat16)))
    if kind == "Q4_1":
        with pytest.raises(ValueError, match="Blocks.for_kernels"):
            kernels.gemv_blocks(x, kind, raw.data)


def _permute(rows, heads: int):
    """llama.cpp's rotary row permutation of q/k weights (convert_hf_to_gguf.py)."""
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def write_tiny_gguf(model: torch.nn.Module, path: Path) -> None:
    """Quantize a tiny Llama into a GGUF as llama.cpp lays it out (Q4_1 layers with permuted
    q/k rows, Q8_0 tied embedding) and set the model's weights to what that file dequantizes to."""
    from gguf import GGMLQuantizationType, GGUFWriter

    cfg = model.config
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    writer = GGUFWriter(str(path), "llama")
    params = dict(model.named_parameters())
    todo = [(f"model.layers.{i}.{hf}.weight", f"blk.{i}.{gg}.weight", "Q4_1")
            for i in range(cfg.num_hidden_layers) for hf, gg in names.items()]
    todo.append(("model.embed_tokens.weight", "token_embd.weight", "Q8_0"))
    for hf, gg, kind in todo:
        blocks, deq = _quantize(params[hf].data, kind)
        params[hf].data.copy_(deq)
        if gg.endswith(("attn_q.weight", "attn_k.weight")):
            blocks = _permute(blocks, cfg.num_attention_heads if "attn_q" in gg else cfg.num_key_value_heads)
        writer.add_tensor(gg, blocks, raw_dtype=GGMLQuantizationType[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("kind,m", [("Q4_1", 9), ("Q8_0", 12), ("Q4_1", 16), ("Q4_1", 19), ("Q8_0", 32), ("Q4_1", 40), ("Q4_1", 64)])
def test_block_gemv_above_eight_rows_is_bit_identical_row_by_row(kernels, kind, m):
    """The tiled path for larger decode batches gives every row exactly the few-row kernel's
    output: a row's logits do not depend on what else is in the batch."""
    torch.manual_seed(m)
    w = torch.randn(48, 96) * 0.1  # 3 tiles of 16 outputs, an odd number of blocks a row
    from lorastack.engine.gguf_blocks import Blocks

    blocks, _ = _quantize(w, kind)
    b = Blocks(kind, torch.from_numpy(blocks)).for_kernels()
    x = torch.randn(m, 96, dtype=torch.bfloat16)
    rows = torch.cat([kernels.gemv_blocks(x[i : i + 1], b.kind, b.data) for i in range(m)])
    assert torch.equal(kernels.gemv_blocks(x, b.kind, b.data), rows)


@pytest.mark.parametrize("m", [9, 27, 64])
def test_bf16_gemv_above_eight_rows_is_bit_identical_row_by_row_and_to_the_blocks(kernels, m):
    """Prefills of up to 64 rows take the tiled path on bf16 weights too, with the few-row
    kernel's bits, so a GGUF base and its bf16 copy still prefill alike."""
    from lorastack.engine.gguf_blocks import Blocks

    torch.manual_seed(m)
    blocks, deq = _quantize(torch.randn(48, 96) * 0.1, "Q4_1")
    w = deq.to(torch.bfloat16).contiguous()
    x = torch.randn(m, 96, dtype=torch.bfloat16)
    tiled = kernels.gemv(x, w)
    assert torch.equal(tiled, torch.cat([kernels.gemv(x[i : i + 1], w) for i in range(m)]))
    b = Blocks("Q4_1", torch.from_numpy(blocks)).for_kernels()
    assert torch.equal(tiled, kernels.gemv_blocks(x, b.kind, b.data))
    assert (tiled.float() - x.float() @ w.float().t()).abs().max().item() <= _rounding(x.float() @ w.float().t())
    with pytest.raises(ValueError, match="in % 32 == 0 and out % 16 == 0"):
        kernels.gemv(torch.randn(m, 80, dtype=torch.bfloat16), torch.randn(48, 80, dtype=torch.bfloat16))


def tiny_gguf_base(tiny_base, tmp_path: Path):
    """The tiny model in bf16 as a GGUF base: its weights are exactly the file's blocks dequantized."""
    from lorastack.base import Base

    model = copy.deepcopy(tiny_base.model).to(torch.bfloat16)
    write_tiny_gguf(model, tmp_path / "tiny.gguf")
    base = Base.from_model(model, tiny_base.tokenizer, source="tiny-gguf")
    base.gguf = tmp_path / "tiny.gguf"
    return base


def test_engine_decodes_from_gguf_blocks_with_identical_logits(tiny_base, lib_with_adapters, tmp_path):  # noqa: F811
    """A GGUF base decodes from its blocks (every projection and the LM head) and produces
    exactly the logits and tokens of its dequantized bf16 weights, adapters included."""
    base = tiny_gguf_base(tiny_base, tmp_path)
    model = base.model
    specs = ["base", "a", "b", "a:0.5+b:0.5"]
    prompts = [[{"role": "user", "content": f"Reverse the order of these words: w{i} v{i}"}] for i in range(len(specs))]
    runs = {}
    for use in (True, False):
        eng = Engine(base, resolve=lib_with_adapters.get, gguf_blocks=use, speculate=0)
        assert len(eng.runner.blocks) == (4 * model.config.num_hidden_layers + 1 if use else 0)
        runs[use] = record(eng, [(p, s, Sampling(max_tokens=8, ignore_eos=True)) for p, s in zip(prompts, specs)])
    assert all(torch.equal(a, b) for a, b in zip(runs[True][0], runs[False][0]))
    assert runs[True][1] == runs[False][1]


@pytest.mark.parametrize("blocks,speculate,rows,int8", [(True, 0, 4, False), (False, 0, 4, False), (True, 7, 4, False),
                                                        (True, 0, 12, False), (True, 0, 20, False), (False, 0, 12, True),
                                                        (True, 7, 20, True)])
def test_compiled_layer_loop_gives_the_python_glue_loops_logits_bit_for_bit(tiny_base, lib_with_adapters, tmp_path,
                                                                            blocks, speculate, rows, int8):  # noqa: F811
    """The whole decode step in one compiled call (LlamaRunner._layer_table) runs the same
    kernels in the same order as the per-layer Python loop: identical logits at every step, for
    a mixed batch with a base row, adapters and a mixture, from GGUF blocks or bf16 weights,
    with and without speculative verify passes, with and without int8 matmuls (which also let
    a bf16 base's passes above 8 rows into the loop)."""
    base = tiny_gguf_base(tiny_base, tmp_path)
    specs = (["base", "a", "b", "a:0.5+b:0.5"] * 5)[:rows]  # 12, 20 rows: the blocks' tiled path, still in the loop
    prompts = [[{"role": "user", "content": f"Repeat: w{i} v{i} w{i} v{i} w{i}"}] for i in range(len(specs))]
    runs, tables = {}, {}
    for loop in (True, False):
        eng = Engine(base, resolve=lib_with_adapters.get, gguf_blocks=blocks, speculate=speculate, int8_matmuls=int8)
        assert bool(eng.runner.i8) == int8
        if not loop:
            eng.runner.layer_loop = False
        runs[loop] = record(eng, [(p, s, Sampling(max_tokens=8)) for p, s in zip(prompts, specs)])
        tables[loop] = eng.runner._table is not None
    assert tables == {True: True, False: False}  # the loop really ran in one run and not in the other
    assert len(runs[True][0]) == len(runs[False][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[True][0], runs[False][0]))
    assert runs[True][1] == runs[False][1]


def _int8_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """What kernels.c's int8 matmuls compute, in torch: weights symmetric int8 per output
    channel, rows per 64-value block, integer products, fp32 sums."""
    wf, xf = w.float(), x.float()
    sw = wf.abs().amax(1) / 127
    wq = torch.round(wf * torch.where(sw > 0, 1 / sw, 0)[:, None]).clamp(-127, 127)
    blocks = xf.view(x.shape[0], -1, 64)
    amax = blocks.abs().amax(-1, keepdim=True)
    xq = torch.round(blocks * torch.where(amax > 0, 127 / amax, 0)).view_as(xf)
    da = (amax / 127).squeeze(-1)  # [m, blocks]
    isum = torch.einsum("mbk,nbk->mnb", xq.view(*blocks.shape).double(), wq.view(w.shape[0], -1, 64).double())
    return ((isum * da[:, None, :].double()).sum(-1) * sw[None, :].double()).float()


@pytest.mark.parametrize("m,k,n", [(1, 64, 16), (3, 576, 600), (9, 64, 21), (16, 576, 960), (37, 1536, 576), (64, 128, 48)])
def test_int8_gemm_computes_the_int8_math_and_stays_near_fp32(kernels, m, k, n):
    """The int8 matmuls' GEMM (kernels.c, "int8 matmuls") is exactly its quantized math up to
    bf16 output rounding, and that math stays within a few percent of fp32: not the bf16
    kernel (its error is larger than bf16 rounding), not something else."""
    torch.manual_seed(m)
    x, w = torch.randn(m, k, dtype=torch.bfloat16), torch.randn(n, k, dtype=torch.bfloat16)
    if k > 64:
        x[0, 5] = 40.0  # an outlier only spoils its own 64-value block's scale
    assert native.i8_fits(w) and not native.i8_fits(w[:, :48].contiguous()) and not native.i8_fits(w.float())
    y = kernels.gemm_i8(x, *kernels.i8_pack(w)).float()
    ref, fp32 = _int8_reference(x, w), x.float() @ w.float().t()
    assert (y - ref).abs().max().item() <= _rounding(ref) + 1e-4 * ref.abs().max().item()
    scale = fp32.abs().max().item()
    assert 0 < (y - fp32).abs().max().item() <= 0.03 * scale
    assert (y - fp32).abs().max().item() > _rounding(fp32)


def test_int8_matmuls_are_batch_invariant_close_to_exact_and_keep_speculation_exact(tiny_base, lib_with_adapters, tmp_path):  # noqa: F811
    """With int8 matmuls a row's projection is the same bits alone or inside a batch (each row is
    quantized and summed on its own) and a request's greedy tokens too; its logits stay close to
    the exact path's, and greedy speculative decoding still gives the tokens of one-at-a-time
    decoding."""
    base = tiny_gguf_base(tiny_base, tmp_path)
    int8 = Engine(base, resolve=lib_with_adapters.get, speculate=0, int8_matmuls=True)
    assert len(int8.runner.i8) == 4 * base.model.config.num_hidden_layers + 1  # and the LM head (600 outputs)
    specs = ["a", "base", "b", "a:0.5+b:0.5", "b", "a"]
    jobs = [([{"role": "user", "content": f"w{i} v{i} w{i}"}], s, Sampling(max_tokens=6, ignore_eos=True)) for i, s in enumerate(specs)]
    alone = record(int8, jobs[:1])
    assert record(int8, jobs)[1][0] == alone[1][0]
    assert int8.bank.int8 and int8.bank.native_args and all(len(a) > 7 for a in int8.bank.native_args.values())
    w, packed = int8.runner.fused[0]["gate_up_proj"][0], int8.runner.i8[id(int8.runner.fused[0]["gate_up_proj"][0])]
    x = torch.randn(13, w.shape[1], dtype=torch.bfloat16)
    rows = int8.runner.native.gemm_i8(x, *packed)
    assert all(torch.equal(int8.runner.native.gemm_i8(x[i : i + 1], *packed), rows[i : i + 1]) for i in range(13))
    exact = record(Engine(base, resolve=lib_with_adapters.get, speculate=0), jobs[:1])
    gap = (exact[0][0] - alone[0][0]).abs().max().item()
    assert 0 < gap <= 0.1 * exact[0][0].std().item()
    repeat = [([{"role": "user", "content": f"Repeat: w{i} v{i} w{i} v{i} w{i} v{i}"}], s, Sampling(max_tokens=12))
              for i, s in enumerate(specs[:3])]
    plain = record(int8, repeat)[1]
    drafted = record(Engine(base, resolve=lib_with_adapters.get, speculate=7, int8_matmuls=True), repeat)[1]
    assert plain == drafted


def test_blocks_that_do_not_match_the_weights_are_not_used(tiny_base, tmp_path):
    from lorastack.base import Base

    model = copy.deepcopy(tiny_base.model).to(torch.bfloat16)
    write_tiny_gguf(model, tmp_path / "tiny.gguf")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] += 1.0  # no longer what the file holds
    base = Base.from_model(model, tiny_base.tokenizer, source="tiny-gguf")
    base.gguf = tmp_path / "tiny.gguf"
    eng = Engine(base, gguf_blocks=True)
    down = eng.runner.fused[0]["down_proj"][0]
    assert id(down) not in eng.runner.blocks and len(eng.runner.blocks) == 4 * model.config.num_hidden_layers


@pytest.mark.integration
def test_embedded_base_decodes_from_gguf_blocks_exactly():
    """The accuracy guard on the real base: logit gap 0 and greedy agreement 100% against the
    bf16 weights, at every decode step of a mixed batch (the kernels round alike by design)."""
    from lorastack.base import Base

    base = Base.load("embedded", dtype="bfloat16")
    prompts = [[{"role": "user", "content": p}] for p in
               ["Name three colors.", "What is the capital of France?", "Write a haiku about rain."]]
    runs = {}
    for use in (True, False):
        eng = Engine(base, gguf_blocks=use, speculate=0)
        assert len(eng.runner.blocks) == (121 if use else 0)  # 30 layers x 4 projections + the LM head
        runs[use] = record(eng, [(p, "base", Sampling(max_tokens=16)) for p in prompts])
    gap = max((a - b).abs().max().item() for a, b in zip(runs[True][0], runs[False][0]))
    print(f"GGUF blocks vs bf16 weights: max logit gap {gap}; tokens identical: {runs[True][1] == runs[False][1]}")
    assert gap == 0.0 and runs[True][1] == runs[False][1]


def test_attention_kernel_matches_math_and_is_batch_invariant(kernels):
    """GQA decode attention against the cache (rows, lengths of their own); a query's result
    does not depend on what else is in the call (what keeps speculative decoding exact)."""
    torch.manual_seed(0)
    rows_n, kv, cap, d, heads = 3, 3, 40, 64, 9
    k = torch.randn(rows_n, kv, cap, d).bfloat16()
    v = torch.randn(rows_n, kv, cap, d).bfloat16()
    q = torch.randn(5, heads, d).bfloat16()
    rows, pos = torch.tensor([0, 2, 2, 1, 0]), torch.tensor([5, 10, 11, 39, 0])
    out = kernels.attention(q, k, v, rows, pos, 0.125)
    for i in range(5):
        keys = k[rows[i], :, : pos[i] + 1].float().repeat_interleave(heads // kv, 0)
        vals = v[rows[i], :, : pos[i] + 1].float().repeat_interleave(heads // kv, 0)
        ref = (torch.softmax((q[i].float()[:, None] @ keys.transpose(-1, -2)) * 0.125, -1) @ vals)[:, 0]
        assert (out[i].float() - ref).abs().max().item() <= _rounding(ref)
    assert torch.equal(kernels.attention(q[1:3].contiguous(), k, v, rows[1:3].contiguous(), pos[1:3].contiguous(), 0.125), out[1:3])


def test_gguf_blocks_are_cached_and_a_damaged_cache_entry_is_rebuilt(tiny_base, tmp_path, monkeypatch):
    from lorastack.engine import gguf_blocks

    monkeypatch.setenv("LORASTACK_CACHE", str(tmp_path / "cache"))
    model = copy.deepcopy(tiny_base.model).to(torch.bfloat16)
    write_tiny_gguf(model, tmp_path / "tiny.gguf")
    cfg = model.config
    args = (tmp_path / "tiny.gguf", cfg.num_attention_heads, cfg.num_key_value_heads)
    gguf_blocks.read_blocks.cache_clear()
    first = gguf_blocks.read_blocks(*args)
    [entry] = (tmp_path / "cache" / "gguf_blocks").glob("*.safetensors")
    for damage in (False, True):
        if damage:
            entry.write_bytes(b"not a safetensors file")
        gguf_blocks.read_blocks.cache_clear()
        again = gguf_blocks.read_blocks(*args)
        assert again.keys() == first.keys()
        assert all(again[k].kind == first[k].kind and torch.equal(again[k].data, first[k].data) for k in first)
    assert entry.stat().st_size > 100  # rewritten
    assert {b.kind for b in first.values()} == {"Q4_1R", "Q8_0"}  # stored and returned in the kernels' layout
    # An entry from before the repack (the GGUF's own Q4_1 layout) still reads, repacked.
    from safetensors.torch import save_file

    raw = gguf_blocks._parse(*args)
    save_file({n: b.data for n, b in raw.items()}, str(entry), metadata={n: b.kind for n, b in raw.items()})
    gguf_blocks.read_blocks.cache_clear()
    old = gguf_blocks.read_blocks(*args)
    assert all(old[k].kind == first[k].kind and torch.equal(old[k].data, first[k].data) for k in first)
    from safetensors import safe_open

    with safe_open(str(entry), "pt") as fh:  # and the entry was rewritten in the kernels' layout
        assert set((fh.metadata() or {}).values()) == {"Q4_1R", "Q8_0"}
    gguf_blocks.read_blocks.cache_clear()


def test_peak_rate_counts_the_multiply_adds_it_runs(kernels):
    """bench/engine.py's compute roofline divides these counts by the time they took."""
    assert kernels._peak(0, 10, 1) == 10 * 12 * 32  # vdpbf16ps: 32 multiply-adds each
    assert kernels._peak(1, 10, 2) == 2 * 10 * 12 * 64  # vpdpbusd: 64, on each of 2 threads
    rate = kernels.peak_macs(seconds=0.02)
    assert 1e8 < rate < 1e14
