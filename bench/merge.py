"""Merge speed: lorastack's dense merges vs PEFT's `merge_utils` on the same library adapters.

    python bench/merge.py [--adapters a,b,c,d] [--methods ties,dare_linear,dare_ties,magnitude_prune]
                          [--svd-rank R] [--density D] [--repeat 3] [--out out/bench]

Needs a library with the named adapters (default: the four `make demo` trains). Per method,
best of --repeat, on every module of the parents:
  peft      PEFT's `merge_utils.<method>` on each module's dense updates `B @ A`, then an exact
            SVD truncated to --svd-rank (what `compose merge` did before it had its own trim)
  lorastack `lorastack.compose.merge.merge_pairs` (kthvalue trim, randomized low-rank SVD)
and how far apart the two results are: the relative Frobenius gap between the merged updates,
over all modules. For the DARE methods the random drops differ between the two (each draws
its own mask), so their gap is that of two independent draws, shown next to the gap between
two lorastack draws with different seeds for scale. Writes merge_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lorastack.adapter import LoraPairs  # noqa: E402
from lorastack.compose.merge import DENSE_METHODS, load_parents, merge_pairs  # noqa: E402
from lorastack.library import Library  # noqa: E402


def peft_merge(parents: list[LoraPairs], weights: list[float], method: str, density: float, rank: int) -> LoraPairs:
    """The reference: PEFT's functions on dense updates, exact SVD."""
    from peft.utils import merge_utils

    out = {}
    for module in sorted(parents[0].modules):
        deltas = [p.delta(module) for p in parents]
        merged = getattr(merge_utils, method)(deltas, torch.tensor(weights), density)
        U, S, Vh = torch.linalg.svd(merged, full_matrices=False)
        out[module] = (Vh[:rank].contiguous(), (U[:, :rank] * S[:rank]).contiguous())
    return LoraPairs("peft", out)


def gap(x: LoraPairs, y: LoraPairs) -> float:
    num = sum(float((x.delta(m) - y.delta(m)).pow(2).sum()) for m in x.modules)
    den = sum(float(y.delta(m).pow(2).sum()) for m in x.modules)
    return (num / den) ** 0.5


def best_of(repeat: int, fn):
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", default="reverse_words,title_case,json_field,date_format")
    ap.add_argument("--methods", default=",".join(DENSE_METHODS))
    ap.add_argument("--svd-rank", type=int, default=None, help="default: the parents' largest rank")
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--library", default=None, help="library directory (default: the configured one)")
    ap.add_argument("--out", default="out/bench")
    args = ap.parse_args()

    lib = Library(args.library)  # None: the configured library
    _, parents = load_parents(lib, args.adapters.split(","))
    rank = args.svd_rank or max(p.rank for p in parents)
    weights = [1.0] * len(parents)
    n_params = sum(p.delta(m).numel() for p in parents[:1] for m in p.modules)
    print(f"{len(parents)} adapters, {len(parents[0].modules)} modules, {n_params / 1e6:.1f} M entries per dense update set, "
          f"rank {rank}, density {args.density}, torch threads {torch.get_num_threads()}")
    rows = []
    for method in args.methods.split(","):
        t_peft, ref = best_of(args.repeat, lambda: peft_merge(parents, weights, method, args.density, rank))
        t_ours, ours = best_of(args.repeat, lambda: merge_pairs(parents, weights, method, density=args.density,
                                                                svd_rank=rank, seed=0))
        row = {"method": method, "peft_s": round(t_peft, 2), "lorastack_s": round(t_ours, 2),
               "speedup": round(t_peft / t_ours, 1), "gap_vs_peft": round(gap(ours, ref), 5)}
        if method.startswith("dare"):
            other = merge_pairs(parents, weights, method, density=args.density, svd_rank=rank, seed=1)
            row["gap_between_seeds"] = round(gap(other, ours), 5)
        rows.append(row)
        extra = f"  (two lorastack seeds: {row['gap_between_seeds']:.4f})" if "gap_between_seeds" in row else ""
        print(f"{method:16s} peft {t_peft:6.2f} s   lorastack {t_ours:6.2f} s   {row['speedup']:5.1f}x   "
              f"relative gap to peft {row['gap_vs_peft']:.5f}{extra}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "merge_speed.json").write_text(json.dumps({"adapters": args.adapters.split(","), "rank": rank,
                                                       "density": args.density, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
