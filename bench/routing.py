"""Routing latency vs library size, and its overhead on a 32-token generation.

    python bench/routing.py [--sizes 10,100,1000] [--examples 64] [--out out/bench]

kNN costs one short forward through the base's first 6 layers (the embedding; independent
of the library, never served from the embedding cache here) plus a similarity search over
every stored example (64 per adapter by default) and the generic prompts. The learned gate
(the default `auto`) costs the base's first layer and a MiniLM-L6 forward in the base's dtype
when that encoder is installed (`lorastack.routing.sentence`; the base's 6 layers without
it), one after the other, and one [d, adapters+1] matrix product.
Latency uses synthetic signatures (random unit vectors; the cost depends on their number,
not their values). The overhead is measured against the same engine generating 32 tokens
for the same single request.
Writes routing_latency.json and routing_latency.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from lorastack.base import Base  # noqa: E402
from lorastack.engine.sampling import Sampling  # noqa: E402
from lorastack.library import Library  # noqa: E402
from lorastack.route import BASE_ROUTE  # noqa: E402
from lorastack.routing import knn as knn_module  # noqa: E402
from lorastack.routing.calibration import Calibration  # noqa: E402
from lorastack.routing.knn import KnnIndex, KnnRouter, _unit  # noqa: E402
from lorastack.routing.learned import LearnedRouter  # noqa: E402
from lorastack.runtime import Runtime  # noqa: E402

PROMPT = "Rewrite the date 2031-04-09 in words"


def timed(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10,100,1000")
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("out/bench"))
    args = ap.parse_args()
    rt = Runtime(Base.load("embedded"), Library(Path(tempfile.mkdtemp()) / "lib"))
    router = KnnRouter(rt)
    dim = rt.base.model.config.hidden_size
    rng = np.random.default_rng(0)

    def uncached(fn):
        def run():
            knn_module._EMBED_CACHE.clear()
            for gate_router in gates:
                if gate_router.features.encoder is not None:
                    gate_router.features.encoder.clear_cache()
            return fn()
        return run

    gates: list[LearnedRouter] = []
    embed_s = timed(uncached(lambda: router.embed([PROMPT])), args.repeat)
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    generic = _unit(rng.normal(size=(223, dim)).astype(np.float32))
    for n in sizes:
        bank = _unit(rng.normal(size=(n * args.examples, dim)).astype(np.float32))
        owners = np.repeat(np.arange(n), args.examples)
        names = [f"a{i}" for i in range(n)]
        idx = KnnIndex(names, bank, owners, np.zeros(dim, np.float32), generic, np.arange(len(generic)),
                       Calibration(np.array([0.05]), 1000))
        router.index = lambda idx=idx: idx  # synthetic library of n adapters
        total = timed(uncached(lambda: router.route([PROMPT])), args.repeat)
        gate = LearnedRouter(rt)
        gates.append(gate)
        gate.knn.index = lambda idx=idx: idx
        fdim = gate.features.embed([PROMPT]).shape[1]  # base layers, plus MiniLM's when installed
        W = rng.normal(size=(fdim, n + 1)).astype(np.float32)
        state = (names, W, np.zeros(n + 1, np.float32), np.zeros(fdim, np.float32), Calibration(np.array([0.5]), 1000))
        gate._current, gate._load = (lambda: names), (lambda state=state: state)
        learned = timed(uncached(lambda: gate.route([PROMPT])), args.repeat)
        rows.append({"adapters": n, "stored_examples": n * args.examples, "route_ms": total * 1000,
                     "search_ms": (total - embed_s) * 1000, "learned_ms": learned * 1000})
        print(f"{n:>5} adapters ({n * args.examples:>6} examples): knn {total * 1000:7.2f} ms "
              f"(embedding {embed_s * 1000:.2f} ms + search {max(0.0, total - embed_s) * 1000:.2f} ms), "
              f"learned {learned * 1000:7.2f} ms", flush=True)

    engine = rt.generator
    gen = lambda: engine.generate([[{"role": "user", "content": PROMPT}]], BASE_ROUTE, Sampling(max_tokens=32, ignore_eos=True))  # noqa: E731
    gen_s = timed(gen, 3)
    print(f"generating 32 tokens (batch 1, same engine): {gen_s * 1000:.0f} ms")
    for r in rows:
        r["overhead_vs_32_tokens"] = r["route_ms"] / (gen_s * 1000)
        r["learned_overhead_vs_32_tokens"] = r["learned_ms"] / (gen_s * 1000)
        print(f"{r['adapters']:>5} adapters: routing adds {r['overhead_vs_32_tokens']:.1%} (knn), "
              f"{r['learned_overhead_vs_32_tokens']:.1%} (learned) to a 32-token generation")
    growth = rows[-1]["search_ms"] / max(rows[0]["search_ms"], 1e-6)
    print(f"search time x{growth:.1f} for x{sizes[-1] / sizes[0]:.0f} adapters")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "routing_latency.json").write_text(json.dumps({"embed_ms": embed_s * 1000, "generate_32_ms": gen_s * 1000,
                                                                "rows": rows}, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["adapters"] for r in rows], [r["route_ms"] for r in rows], marker="o", label="kNN route (total)")
    ax.plot([r["adapters"] for r in rows], [r["learned_ms"] for r in rows], marker="s", label="learned gate (total)")
    ax.axhline(gen_s * 1000 * 0.05, color="red", ls="--", label="5% of a 32-token generation")
    ax.set_xscale("log")
    ax.set_xlabel("adapters in library")
    ax.set_ylabel("ms per request")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "routing_latency.png", dpi=120)
    print(f"wrote {args.out}/routing_latency.json and routing_latency.png")


if __name__ == "__main__":
    main()
