"""Cost of constrained decoding (structured output) on the embedded base, side by side with
unconstrained decoding of the same prompts in the same run.

    OMP_NUM_THREADS=1 python bench/structured.py [--rows 1,8] [--tokens 48] [--repeats 2]

For each batch size: decode tokens/s unconstrained, with a JSON schema on every row, with JSON
mode on every row, and a mixed batch (half schema, half unconstrained), and the ratio of each
to the unconstrained run (rows stop at different lengths, so end-to-end tok/s is noisy); then
the mask's own cost per constrained row per token (grammar bitmask over the 49k vocabulary +
applying it, timed inside the engine step) and that cost as a share of the unconstrained
decode time per token at the same batch size — the overhead a constrained row adds. The first
constrained request also pays the one-off tokenizer/grammar setup, reported separately.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lorastack.base import Base  # noqa: E402
from lorastack.engine import engine as engine_module  # noqa: E402
from lorastack.engine.constrain import Constraint  # noqa: E402
from lorastack.engine.engine import Engine  # noqa: E402
from lorastack.engine.sampling import Sampling  # noqa: E402
from lorastack.route import BASE_ROUTE  # noqa: E402

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "city": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "age", "city", "tags"]}
PROMPTS = ["Describe a fictional person as JSON with name, age, city and tags.",
           "Give me a JSON record for a customer: name, age, city, tags.",
           "Invent a character and answer in JSON (name, age, city, tags)."]


class MaskTimer:
    """Wraps the engine's mask hook to time it and count the rows it masked."""

    def __init__(self) -> None:
        self.inner = engine_module.mask_logits
        self.seconds, self.rows = 0.0, 0

    def __call__(self, logits, grammars) -> None:
        t = time.perf_counter()
        self.inner(logits, grammars)
        self.seconds += time.perf_counter() - t
        self.rows += sum(g is not None for g in grammars)


def run(engine: Engine, rows: int, tokens: int, constraints: list[Constraint | None], timer: MaskTimer) -> dict:
    convs = [[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}] for i in range(rows)]
    timer.seconds, timer.rows = 0.0, 0
    reqs = [engine.submit(c, BASE_ROUTE, Sampling(max_tokens=tokens, constraint=constraints[i % len(constraints)]))
            for i, c in enumerate(convs)]
    while any(not r.done for r in reqs) and not all(r.first_token_at for r in reqs):
        engine.step()  # prefill (not timed: the same for every variant)
    t0, n0 = time.perf_counter(), sum(len(r.tokens) for r in reqs)
    while not all(r.done for r in reqs):
        engine.step()
    seconds = time.perf_counter() - t0
    generated = sum(len(r.tokens) for r in reqs) - n0
    return {"tok_s": generated / seconds if seconds else 0.0, "tokens": generated,
            "mask_ms_per_row_token": 1000 * timer.seconds / timer.rows if timer.rows else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,8")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    base = Base.load()
    engine = Engine(base)
    timer = MaskTimer()
    engine_module.mask_logits = timer
    t = time.perf_counter()
    engine.grammars().compiled(Constraint.json_schema(SCHEMA))
    print(f"one-off setup (tokenizer info + first schema compile, vocab {base.model.config.vocab_size}): "
          f"{time.perf_counter() - t:.2f}s")
    schema, obj = Constraint.json_schema(SCHEMA), Constraint.json_object()
    variants = {"unconstrained": [None], "json_schema": [schema], "json_object": [obj], "mixed (half schema)": [schema, None]}
    print(f"{'rows':>4}  {'variant':<20} {'tok/s':>8} {'ratio':>6} {'mask ms/row/token':>18} {'vs decode ms/token':>19}")
    for rows in [int(x) for x in args.rows.split(",")]:
        ref = None
        for name, cs in variants.items():
            best = max((run(engine, rows, args.tokens, cs, timer) for _ in range(args.repeats)), key=lambda r: r["tok_s"])
            ref = ref or best["tok_s"]
            mask = f"{best['mask_ms_per_row_token']:.3f}" if cs != [None] else "-"
            share = f"{best['mask_ms_per_row_token'] / (1000 / ref):.1%}" if cs != [None] else f"{1000 / ref:.2f} ms"
            print(f"{rows:>4}  {name:<20} {best['tok_s']:>8.1f} {best['tok_s'] / ref:>6.2f} {mask:>18} {share:>19}")


if __name__ == "__main__":
    main()
