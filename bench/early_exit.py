"""Would self-speculation pay? Early-exit draft agreement on the embedded base with trained adapters.

    python bench/early_exit.py --task-library LIB [--tasks reverse_words,json_field,date_format,title_case,add_numbers]
                               [--n 20] [--split paraphrase] [--layers 4,8,12,16,20,24,27]

Self-speculative decoding (LayerSkip, SWIFT, Kangaroo) drafts the next tokens from the first L
layers of the model itself: the hidden state after layer L goes through the final norm and the
LM head, and the full model verifies. It pays only if those early guesses agree with the full
model often enough to cover their own cost. This measures the agreement: each task's inputs are
answered greedily by the engine on the task's own trained adapter (the adapter is active in
every layer, draft and verifier alike), then one forward pass over prompt + answer reads the
argmax of every layer L's early exit at each answer position and compares it with the full
model's (which must equal the engine's tokens: printed as a check).

It also prints the best speed-up a draft of k tokens from layer L could give under a cost
model that favours the draft: a draft token costs L/num_layers of a decode step (the LM head
and everything else free) and verifying k + 1 tokens costs one step. With per-token agreement
a, a cycle yields (1 - a^(k+1)) / (1 - a) tokens for k * L / num_layers + 1 steps.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lorastack.base import Base  # noqa: E402
from lorastack.engine.engine import Engine  # noqa: E402
from lorastack.engine.sampling import Sampling  # noqa: E402
from lorastack.library import Library  # noqa: E402
from lorastack.route import parse_spec  # noqa: E402
from lorastack.tasks import get_task  # noqa: E402


def best_speedup(agree: float, frac: float, max_k: int = 8) -> tuple[float, int]:
    """Best (speed-up, k) over draft lengths 1..max_k under the favourable cost model above."""
    best = (1.0, 0)
    for k in range(1, max_k + 1):
        tokens = k + 1 if agree >= 1.0 else (1 - agree ** (k + 1)) / (1 - agree)
        best = max(best, (tokens / (k * frac + 1), k))
    return best


def agreement(base: Base, lib: Library, engine: Engine, task: str, n: int, split: str, layers: list[int]) -> dict:
    """Per-layer share of answer positions where the early exit's argmax equals the full model's."""
    from peft import PeftModel

    prompts = [r["prompt"] for r in get_task(task).generate(n, split, seed=1)]
    model = PeftModel.from_pretrained(base.model, str(lib.get(task).path)).eval()
    inner, head = model.base_model.model.model, model.base_model.model.lm_head
    hits, total, same = dict.fromkeys(layers, 0), 0, 0
    try:
        for p in prompts:
            ids = base.chat_ids([{"role": "user", "content": p}])
            req = engine.submit_ids(ids, parse_spec(task), Sampling(max_tokens=64))
            while not req.done:
                engine.step()
            out = list(req.tokens)
            at = slice(len(ids) - 1, len(ids) + len(out) - 1)  # positions that predict the answer's tokens
            with torch.no_grad():
                o = model(torch.tensor([ids + out]), output_hidden_states=True)
                final = o.logits[0, at].argmax(-1)
                for L in layers:
                    hits[L] += (head(inner.norm(o.hidden_states[L][0, at])).argmax(-1) == final).sum().item()
            same += (final == torch.tensor(out)).sum().item()
            total += len(out)
    finally:
        model.unload()  # leaves base.model as it was
    return {"tokens": total, "full_model_matches_engine": same / max(total, 1),
            "agreement": {L: hits[L] / max(total, 1) for L in layers}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task-library", required=True, help="a library with adapters named after the tasks")
    ap.add_argument("--tasks", default="reverse_words,json_field,date_format,title_case,add_numbers")
    ap.add_argument("--n", type=int, default=20, help="inputs per task")
    ap.add_argument("--split", default="paraphrase", help="task split the inputs come from")
    ap.add_argument("--layers", default="4,8,12,16,20,24,27")
    ap.add_argument("--out", default="out/bench")
    args = ap.parse_args()

    base = Base.load("embedded", dtype="bfloat16")
    lib = Library(args.task_library)
    num_layers = base.model.config.num_hidden_layers
    layers = [int(x) for x in args.layers.split(",") if 0 < int(x) < num_layers]
    engine = Engine(base, resolve=lib.get, prefix_cache=0, speculate=0)
    results = {}
    print(f"early exit after layer L of {num_layers}: share of answer tokens whose argmax equals the full model's")
    print(f"{'task':14} {'tokens':>6} " + " ".join(f"{'L=' + str(L):>6}" for L in layers) + "   best speed-up bound (L, k)")
    for task in args.tasks.split(","):
        r = agreement(base, lib, engine, task, args.n, args.split, layers)
        bound = max((best_speedup(a, L / num_layers) + (L,) for L, a in r["agreement"].items()), default=(1.0, 0, 0))
        r["best_speedup_bound"] = {"speedup": bound[0], "k": bound[1], "layer": bound[2]}
        results[task] = r
        print(f"{task:14} {r['tokens']:6d} " + " ".join(f"{a:6.2f}" for a in r["agreement"].values())
              + (f"   {bound[0]:.2f}x (L={bound[2]}, k={bound[1]})" if bound[0] > 1.0 else "   none (no L, k beats plain decoding)")
              + ("" if r["full_model_matches_engine"] == 1.0 else f"  [full model vs engine: {r['full_model_matches_engine']:.2f}]"),
              flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "early_exit.json").write_text(json.dumps({"num_layers": num_layers, "split": args.split, "tasks": results}, indent=1))
    print(f"wrote {out / 'early_exit.json'}")


if __name__ == "__main__":
    main()
