"""What the learned gate is fitted on and sees: features of texts, stored with the library.

A feature is MiniLM's sentence embedding (`routing.sentence`) concatenated with the mean of
the base's hidden states after its first layer, or the base's layer-6 embedding (the one kNN
uses) alone when MiniLM is not installed. With MiniLM, one base layer beat six on the
held-out paraphrases of the 8-adapter library (98.5% vs 97.5% top-1 in an offline check on
the same views and thresholds; in-template 100% vs 99.9%, unrelated abstained 99.75% vs
99.5%), and it costs ~2 ms per request instead of ~12: the early layers' surface features
only have to complement MiniLM's, and deeper ones pull requests towards whichever adapter's
templates share their shape. The token embeddings alone (no layer) lost on narrow adapters.
A request's features are the two forwards run one after the other: run at the same time on
two threads they shared torch's intra-op pool and were slower than in turn (MiniLM 16 ms
alone, 47 ms next to the base's six layers on a 2-core machine). MiniLM still runs on its own
worker thread, only waited for: run on the caller's thread, it made the 32-token generation
that followed it on that thread ~3x slower (1.2-1.4 s instead of 0.36-0.53 s, interleaved
measurements on the same loaded machine), which the routing overhead must not cost. The gate's training
rows are every routable adapter's stored examples plus their instruction views
(`routing.views`), and the generic "no expert" prompts plus their wrapped views. Embedding
the views costs a few seconds per adapter, so each adapter's rows are stored once as a
routing signature (kind = base, encoder and views version) and the generic rows in one file
next to the library: refitting the gate after a library change reads them (1-2 s on 8
adapters, mostly the fit itself), and a cold `auto` embeds only its request.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..atomic import TMP_PREFIX
from ..tasks.generic import calibration_set
from .knn import EMBED_LAYERS
from .sentence import SentenceEncoder
from .views import VIEWS_VERSION, example_views, generic_views

if TYPE_CHECKING:
    from .knn import KnnRouter

GENERIC_FILE = "router-gate-generic-{digest}.safetensors"
LAYERS_WITH_SENTENCE = 1  # base layers next to MiniLM; without it the gate uses kNN's EMBED_LAYERS
# One worker, so the encoder (and its cache) is only used from that thread (see the docstring).
_SENTENCE_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorastack-sentence")


@dataclass
class Rows:
    """Raw (uncentred) features of some real texts and of their views; `sources[j]` is the
    index of the real text view j was made from."""

    real: np.ndarray
    views: np.ndarray
    sources: np.ndarray


class GateFeatures:
    """Features for the gate over `knn`'s embedding, plus `encoder`'s when given."""

    def __init__(self, knn: "KnnRouter", encoder: SentenceEncoder | None) -> None:
        self.knn, self.encoder = knn, encoder

    @property
    def layers(self) -> int:
        return LAYERS_WITH_SENTENCE if self.encoder is not None else EMBED_LAYERS

    @property
    def kind(self) -> str:
        """Names everything the stored rows depend on, so a change recomputes them."""
        return (f"gate:{self.knn.runtime.base.fingerprint}:L{self.layers}:{self.encoder.name if self.encoder else 'base'}"
                f":views{VIEWS_VERSION}")

    def embed(self, texts: list[str]) -> np.ndarray:
        """[n, d] raw features; with the encoder, both unit embeddings side by side, scaled
        so each keeps an equal share of the norm."""
        base = self.knn.embed(texts, self.layers)
        if self.encoder is None:
            return base
        sentence = _SENTENCE_THREAD.submit(self.encoder, texts).result()  # after the base's layer, not beside it
        return np.concatenate([base, sentence], axis=1) / np.sqrt(2.0)

    def adapter_rows(self, name: str, stored: dict) -> Rows | None:
        """An adapter's example and view rows, computed and stored on first use."""
        if name in stored:
            meta, blob = stored[name]
            m = np.frombuffer(blob, dtype=np.float16).reshape(meta["shape"]).astype(np.float32)
            n = int(meta["n_examples"])
            return Rows(m[:n], m[n:], np.array(meta["sources"], dtype=np.int64))
        lib = self.knn.runtime.library
        examples = lib.get(name).examples()
        if not examples:
            return None
        views = example_views(examples)
        emb = self.embed(examples + [v for _, v in views]).astype(np.float16)
        sources = [i for i, _ in views]
        lib.put_signature(name, self.kind, emb.tobytes(), {"shape": list(emb.shape), "n_examples": len(examples),
                                                           "sources": sources})
        emb = emb.astype(np.float32)
        return Rows(emb[: len(examples)], emb[len(examples):], np.array(sources, dtype=np.int64))

    def stored(self) -> dict:
        return self.knn.runtime.library.signatures(self.kind)

    def generic_rows(self) -> tuple[Rows, np.ndarray]:
        """The generic prompts' rows (and their views'), with each prompt's template group."""
        from safetensors import safe_open
        from safetensors.numpy import save_file

        pairs = calibration_set()
        prompts, groups = [p for p, _ in pairs], np.array([g for _, g in pairs], dtype=np.int64)
        views = generic_views(prompts)
        sources = np.array([i for i, _ in views], dtype=np.int64)
        digest = hashlib.sha256(json.dumps([self.kind, prompts]).encode()).hexdigest()[:16]
        path = self.knn.runtime.library.root / GENERIC_FILE.format(digest=digest)
        emb = None
        if path.exists():
            with safe_open(str(path), framework="numpy") as f:
                if f.metadata().get("digest") == digest:
                    emb = f.get_tensor("emb").astype(np.float32)
        if emb is None:
            emb16 = self.embed(prompts + [v for _, v in views]).astype(np.float16)
            tmp = path.with_name(TMP_PREFIX + path.name)
            save_file({"emb": emb16}, str(tmp), metadata={"digest": digest})
            tmp.replace(path)
            emb = emb16.astype(np.float32)
        return Rows(emb[: len(prompts)], emb[len(prompts):], sources), groups
