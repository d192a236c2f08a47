"""Stacks vs one adapter trained end to end, on the composite tasks, with a longer-input column.

    python bench/stacks.py [--tasks record_date,sort_desc,caesar_title,word_problem]
                           [--n-train 400] [--steps 60] [--n-test 200] [--seed 0] [--import-from LIBRARY] [--out out/stacks]

Per composite task, every row on the same test inputs (held out by prompt hash) and on the
`long` split (more words / fields / digits than any training record):
  base             the bare base, the composite prompt as is
  auto             the default router's choice per input
  e2e adapter      one LoRA trained on the composite records, --steps x (trained adapters) steps:
                   the same records and the same total steps as the trained stack
  library stack    the stack over existing library adapters, no training (skipped, with the
                   reason, when a sub-task adapter is missing: train them with `make demo
                   --tasks ...` or pass --import-from a library that has them)
  trained stack    the library stack's decomposition with one adapter per model stage, trained
                   from the same records, --steps steps each (teacher-forced: each stage learns
                   from the reference intermediate outputs); model-free stages (regex, JSON
                   field, splitting a phrase into letters, joining) are transforms; caesar_title's
                   model decodes one letter per map item; sort_desc's writes the first letters
                   present from z to a, then per letter (a map item) that letter's words, last first
Prints exact match, completion tokens and wall time per answer; writes stacks.json and stacks.png.
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

from lorastack.eval import evaluate  # noqa: E402
from lorastack.library import Library  # noqa: E402
from lorastack.runtime import Runtime  # noqa: E402
from lorastack.stacks import StackRunner, parse_stack  # noqa: E402
from lorastack.stacks.composite import COMPOSITE, get_composite  # noqa: E402
from lorastack.stacks.evaluate import evaluate_stack  # noqa: E402
from lorastack.stacks.train import train_stack  # noqa: E402
from lorastack.train import TrainConfig, train_to_library  # noqa: E402


def row(label: str, res, seconds: float) -> dict:
    return {"model": label, "accuracy": round(res.accuracy, 4), "n": res.n,
            "tokens_per_answer": round(res.completion_tokens / max(res.n, 1), 1),
            "ms_per_answer": round(1000 * seconds / max(res.n, 1), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default=",".join(COMPOSITE))
    ap.add_argument("--n-train", type=int, default=400)
    ap.add_argument("--steps", type=int, default=60,
                    help="training steps per trained stage; the e2e adapter gets steps x trained stages")
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--library", default=None, help="library to train into and read sub-task adapters from")
    ap.add_argument("--import-from", default=None, help="copy missing sub-task adapters from this library first")
    ap.add_argument("--seed", type=int, default=0, help="training seed and training-data seed (test inputs stay fixed), "
                    "to see run-to-run spread")
    ap.add_argument("--out", default="out/stacks")
    args = ap.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rt = Runtime.open(library=args.library)
    lib: Library = rt.library
    runner = StackRunner(rt)
    cfg = TrainConfig(rank=16, alpha=32, steps=args.steps, seed=args.seed, eval_generate=0)
    results: dict[str, dict] = {}
    for name in [t.strip() for t in args.tasks.split(",") if t.strip()]:
        task = get_composite(name)
        train = task.generate(args.n_train, "train", seed=args.seed)
        splits = {"test": task.generate(args.n_test, "test", seed=0), "long": task.generate(args.n_test, "long", seed=0)}
        rows: dict[str, dict[str, dict]] = {s: {} for s in splits}

        def measure(label: str, fn) -> None:
            for split, recs in splits.items():
                t0 = time.perf_counter()
                res = fn(recs)
                rows[split][label] = row(label, res, time.perf_counter() - t0)
                print(f"{name:<13} {split:<5} {label:<15} {res.accuracy:6.1%}  "
                      f"{rows[split][label]['tokens_per_answer']:6.1f} tok  {rows[split][label]['ms_per_answer']:7.1f} ms/answer", flush=True)

        measure("base", lambda recs: evaluate(rt, "base", recs,
                                              progress=False, label="base", stop_early=False))
        measure("auto", lambda recs: evaluate(rt, "auto", recs,
                                              progress=False, label="auto", stop_early=False))
        e2e = f"{name.replace('_', '-')}-e2e"
        t0 = time.perf_counter()
        trained_spec = parse_stack(task.trained_stack())
        n_trained = len({s.model for s in trained_spec.stages if s.train})  # adapters: stages may share one
        e2e_cfg = TrainConfig(**{**cfg.__dict__, "steps": args.steps * n_trained})
        if e2e not in lib.names():
            train_to_library(rt.base, lib, train, e2e, e2e_cfg, progress=False,
                             description=f"{name} end to end ({e2e_cfg.steps} steps)")
            rt.refresh(e2e)
        print(f"{name:<13} trained {e2e} ({e2e_cfg.steps} steps) in {time.perf_counter() - t0:.0f}s", flush=True)
        measure("e2e adapter", lambda recs: evaluate(rt, e2e, recs,
                                                     progress=False, label=e2e, stop_early=False))
        library_spec = parse_stack(task.library_stack())
        needed = [m for m in library_spec.models() if m not in lib.names()]
        if needed and args.import_from:
            src = Library(args.import_from)
            for m in needed:
                if m in src.names():
                    lib.import_dir(src.get(m).path, m, base=rt.base)
                    rt.refresh(m)
            needed = [m for m in library_spec.models() if m not in lib.names()]
        if needed:
            print(f"{name:<13} library stack skipped: sub-task adapters missing from the library: {', '.join(needed)}", flush=True)
            for split in splits:
                rows[split]["library stack"] = {"model": "library stack", "skipped": f"missing {', '.join(needed)}"}
        else:
            measure("library stack", lambda recs: evaluate_stack(runner, library_spec, recs, progress=False))
        t0 = time.perf_counter()
        if not all(m in lib.names() for m in trained_spec.models()):
            train_stack(rt.base, lib, trained_spec, train, cfg, overwrite=True, progress=False)
            for m in trained_spec.models():
                rt.refresh(m)
        print(f"{name:<13} trained stack {list(dict.fromkeys(trained_spec.models()))} ({args.steps} steps each) in {time.perf_counter() - t0:.0f}s",
              flush=True)
        measure("trained stack", lambda recs: evaluate_stack(runner, trained_spec, recs, progress=False))
        results[name] = rows
        (out_dir / "stacks.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    summary(results, out_dir)


def summary(results: dict, out_dir: Path) -> None:
    labels = ["base", "auto", "e2e adapter", "library stack", "trained stack"]
    print("\nexact match (test / long):")
    print(f"{'task':<14}" + "".join(f"{lab:>22}" for lab in labels))
    for name, rows in results.items():
        cells = []
        for lab in labels:
            t, lg = rows["test"].get(lab, {}), rows["long"].get(lab, {})
            cells.append("skipped" if "skipped" in t else f"{t.get('accuracy', 0):.1%} / {lg.get('accuracy', 0):.1%}")
        print(f"{name:<14}" + "".join(f"{c:>22}" for c in cells))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    for ax, split in zip(axes, ("test", "long")):
        names = list(results)
        width = 0.16
        for i, lab in enumerate(labels):
            vals = [results[n][split].get(lab, {}).get("accuracy", 0) for n in names]
            ax.bar([j + i * width for j in range(len(names))], vals, width, label=lab)
        ax.set_xticks([j + 2 * width for j in range(len(names))], names, rotation=15)
        ax.set_title(f"{split} inputs")
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("exact match")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "stacks.png", dpi=120)
    print(f"wrote {out_dir / 'stacks.json'} and {out_dir / 'stacks.png'}")


if __name__ == "__main__":
    main()
