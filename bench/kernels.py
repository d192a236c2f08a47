"""Decode matrix-vector speed: torch's bf16 GEMM vs the compiled kernel (engine/native.py)
vs the compiled kernel reading Q4_1 GGUF blocks (the embedded base's linear layers; output
bit-identical to the bf16 kernel on the dequantized weights) vs aten's int8 GEMV vs the
compiled int8 matmul of `--int8` (per-channel int8 weights, rows quantized per 64 values:
kernels.c "int8 matmuls", the rows' quantization included), on the embedded base's layer
shapes with weights out of cache.

    python bench/kernels.py [--layers 30] [--rows 1,2,4,8,16,64]

30 layers of q|k|v, o, gate|up and down projections (576 hidden, 1536 MLP: SmolLM2-135M)
are cycled so no weight stays in cache, as in a real decode step. Prints ms per pass,
effective GB/s of weights streamed, and the kernel's speed-up over torch, all in one run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lorastack.engine.gguf_blocks import Blocks  # noqa: E402
from lorastack.engine.llama import quantize_int8  # noqa: E402
from lorastack.engine.native import kernels  # noqa: E402

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # (out, in) per fused projection


def timed(fn, weights: list[list], rows: int, reps: int = 7) -> float:
    """Best-of-`reps` ms for one pass over every layer's projections (`fn(x, weight)`)."""
    xs = {i: torch.randn(rows, i, dtype=torch.bfloat16) for _, i in SHAPES}
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for layer in weights:
            for (_, fin), w in zip(SHAPES, layer):
                fn(xs[fin], w)
        best = min(best, time.perf_counter() - t0)
    return best * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--rows", default="1,2,4,8,16,64")
    args = ap.parse_args()
    torch.manual_seed(0)
    weights = [[torch.randn(o, i, dtype=torch.bfloat16) * 0.02 for o, i in SHAPES] for _ in range(args.layers)]
    q8 = [[quantize_int8(w) for w in layer] for layer in weights]
    from gguf import GGMLQuantizationType, quants

    q41 = [[Blocks("Q4_1", torch.from_numpy(quants.quantize(w.float().numpy(), GGMLQuantizationType.Q4_1))).for_kernels() for w in layer]
           for layer in weights]
    block_mb = sum(b.data.numel() for layer in q41 for b in layer) / 1e6
    megabytes = sum(w.numel() * 2 for layer in weights for w in layer) / 1e6
    k = kernels()
    i8 = [[k.i8_pack(w) for w in layer] for layer in weights] if k else None
    warn_if_loaded()
    print(f"{args.layers} layers, {megabytes:.0f} MB of bf16 weights per pass, {torch.get_num_threads()} threads; "
          f"kernel: {'compiled' if k else 'unavailable here (needs gcc and AVX512-BF16)'}")
    print(f"{'rows':>4} {'torch bf16':>18} {'kernel bf16':>18} {'kernel Q4_1':>18} {'aten int8':>18} {'kernel int8':>18} "
          f"{'speed-ups:':>11} {'kernel vs torch':>15} {'Q4_1 vs bf16 kernel':>19} {'int8 vs Q4_1':>12}")
    for rows in [int(r) for r in args.rows.split(",")]:
        t_torch = timed(lambda x, w: F.linear(x, w), weights, rows)
        t_k = timed(lambda x, w: k.gemv(x, w), weights, rows) if k else float("nan")
        t_8 = timed(lambda x, w: torch.ops.aten._weight_int8pack_mm(x, w[0], w[1]), q8, rows)
        t_q = timed(lambda x, b: k.gemv_blocks(x, b.kind, b.data), q41, rows) if k else float("nan")
        t_i = timed(lambda x, p: k.gemm_i8(x, *p), i8, rows) if k else float("nan")
        cell = lambda t, mb: f"{t:7.2f} ms {mb / t:5.1f} GB/s"  # noqa: E731 - MB/ms = GB/s
        print(f"{rows:>4} {cell(t_torch, megabytes):>18} {cell(t_k, megabytes):>18} {cell(t_q, block_mb):>18} "
              f"{cell(t_8, megabytes / 2):>18} {cell(t_i, megabytes / 2):>18} {'':>11} {t_torch / t_k:>14.2f}x "
              f"{t_k / t_q:>18.2f}x {t_q / t_i:>11.2f}x")


def machine_load() -> tuple[float, int, bool]:
    """(1-minute load average, cores, whether other work already keeps the cores busy): then each
    parallel region waits for a descheduled thread, and a timing can come out hundreds of times
    too slow. bench/engine.py reports it too."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    return load, cores, load >= cores * 0.75


def warn_if_loaded() -> None:
    load, cores, loaded = machine_load()
    if loaded:
        print(f"warning: load average {load:.1f} on {cores} cores: other work is running, so timings with "
              f"{torch.get_num_threads()} threads can be far off (try again on an idle machine or with OMP_NUM_THREADS=1)")


if __name__ == "__main__":
    main()
