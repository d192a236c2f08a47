"""Why Arrow routes worse than kNN on this library: per-adapter baselines swamp the task signal.

    python bench/arrow_diagnose.py --library DIR [--n 20]

Prints the mean Arrow score (|cos| between layer inputs and each adapter's prototypes) for
inputs of every task (rows) against every adapter (columns), the row-level top-1 accuracy,
how aligned token inputs are with the mean input direction (anisotropy), and the same
accuracy after centring inputs on that mean.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from lorastack.routing.arrow import arrow_scores  # noqa: E402
from lorastack.runtime import Runtime  # noqa: E402
from lorastack.tasks import get_task  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--library", required=True)
    ap.add_argument("--n", type=int, default=20)
    args = ap.parse_args()
    rt = Runtime.open("embedded", args.library)
    every_name, protos = rt.router("arrow").index()
    keep = [i for i, n in enumerate(every_name) if _is_task(n)]
    names, protos = [every_name[i] for i in keep], protos[keep]
    runner = rt.generator.runner
    inputs = {t: [runner.layer_inputs(rt.base.chat_ids([{"role": "user", "content": r["prompt"]}])).float().numpy()
                  for r in get_task(t).generate(args.n, "test", seed=1)] for t in names}

    def matrix(center: np.ndarray | None = None) -> np.ndarray:
        m = np.zeros((len(names), len(names)))
        for i, t in enumerate(names):
            for x in inputs[t]:
                m[i] += arrow_scores(x if center is None else x - center[:, :, None, :], protos) / len(inputs[t])
        return m

    np.set_printoptions(precision=3, suppress=True, linewidth=200)
    raw = matrix()
    print("adapters:", names)
    print("mean Arrow score, rows = input task, columns = adapter:\n", raw)
    print(f"column means (per-adapter baseline): {raw.mean(0)}  range {np.ptp(raw.mean(0)):.3f}")
    print(f"within-column spread (the task signal): {np.ptp(raw, 0)}")
    every = np.concatenate([x for t in names for x in inputs[t]], axis=2)  # [layers, 2, tokens, d]
    mu = every.mean(2)
    unit = every / np.linalg.norm(every, axis=-1, keepdims=True)
    align = np.abs(np.einsum("lktd,lkd->lkt", unit, mu / np.linalg.norm(mu, axis=-1, keepdims=True))).mean()
    print(f"mean |cos(token input, mean input)| = {align:.3f} (anisotropy)")
    print(f"row-level top-1: raw {np.mean(raw.argmax(1) == np.arange(len(names))):.1%}, "
          f"inputs centred on the mean {np.mean(matrix(mu).argmax(1) == np.arange(len(names))):.1%}")


def _is_task(name: str) -> bool:
    try:
        get_task(name)
        return True
    except Exception:  # noqa: BLE001 - adapters not named after a built-in task are skipped
        return False


if __name__ == "__main__":
    main()
