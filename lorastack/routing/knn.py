"""kNN routing (LoraRetriever; "when simple kNN beats complex learned routers").

Each adapter's signature is the embeddings of a sample of its training inputs (stored with
the adapter at training time; an imported adapter without examples is not kNN-routable).
An input is embedded the same way; its k nearest stored examples vote, weighted by
cosine similarity. The winner is used if its vote share reaches `min_share` and the input
is about as close to the winner's examples as they are to each other; otherwise the
router abstains (bare base).

Hidden states are anisotropic (every mean-pooled state shares a large common component:
raw cosines were 0.92-0.999 for everything, in-library or not), so embeddings are centred
on the library's mean before comparing. Abstention is calibrated per adapter: the
threshold is a fraction (`calibration`) of the 2nd percentile of its examples'
leave-one-out nearest-neighbour similarity, so a tight task (ISO dates) gets a strict
threshold and a varied one (free word lists) a loose one.

Embeddings are the base's own mean-pooled hidden states after its first few layers: no
second model to ship, and the signatures live in the library (SQLite) keyed by the base
fingerprint and layer, computed once per adapter and reused.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..route import BASE_ROUTE, Route
from .router import RouteDecision, register

if TYPE_CHECKING:
    from ..runtime import Runtime

EMBED_LAYERS = 6


def knn_scores(query: np.ndarray, bank: np.ndarray, owners: np.ndarray, n_adapters: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Similarity-weighted votes per adapter for each query row, and each row's best similarity.

    `query [q, d]` and `bank [m, d]` are L2-normalised; `owners[m]` is the adapter index of
    each stored example.
    """
    sims = query @ bank.T  # [q, m]
    k = min(k, bank.shape[0])
    top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    votes = np.zeros((query.shape[0], n_adapters), dtype=np.float64)
    for row in range(query.shape[0]):
        for j in top[row]:
            votes[row, owners[j]] += max(float(sims[row, j]), 0.0)
    return votes, sims.max(axis=1)


@dataclass
class KnnIndex:
    names: list[str]
    bank: np.ndarray  # [m, d], centred and normalised
    owners: np.ndarray  # [m]
    mean: np.ndarray  # [d], the centre
    thresholds: np.ndarray  # [adapters]: minimum similarity to route to each adapter


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-8)


def self_similarity(bank: np.ndarray, owners: np.ndarray, n_adapters: int, quantile: float = 2.0) -> np.ndarray:
    """Per adapter: a low percentile of its examples' nearest-neighbour similarity to each other."""
    out = np.zeros(n_adapters)
    for a in range(n_adapters):
        b = bank[owners == a]
        if len(b) < 2:
            continue
        s = b @ b.T
        np.fill_diagonal(s, -1.0)
        out[a] = np.percentile(s.max(1), quantile)
    return out


class KnnRouter:
    name = "knn"

    def __init__(self, runtime: "Runtime", k: int = 8, min_share: float = 0.5, calibration: float = 0.92) -> None:
        self.runtime = runtime
        self.k, self.min_share, self.calibration = k, min_share, calibration
        self._index: KnnIndex | None = None
        self._index_key: tuple | None = None

    # ------------------------------------------------------------ embeddings
    def embed(self, texts: list[str]) -> np.ndarray:
        base = self.runtime.base
        ids = [base.tokenizer(t, add_special_tokens=False)["input_ids"][:256] or [base.eos_token_id] for t in texts]
        runner = getattr(self.runtime.generator, "runner", None)
        if runner is None:
            raise NotImplementedError("kNN routing needs the engine (a Llama-family base)")
        e = runner.embed(ids, EMBED_LAYERS).numpy()
        return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-8)

    def _kind(self) -> str:
        return f"knn:{self.runtime.base.fingerprint}:L{EMBED_LAYERS}"

    def index(self) -> KnnIndex:
        """Signatures of every routable adapter; missing ones are computed and stored once."""
        lib = self.runtime.library
        names = [n for n in lib.names() if self.runtime.fits(n)]
        key = (tuple(names), lib.root)
        stored = lib.signatures(self._kind())
        if self._index is not None and self._index_key == key and all(n in stored or not lib.get(n).examples() for n in names):
            return self._index
        vecs, owners, kept = [], [], []
        for name in names:
            if name in stored:
                meta, blob = stored[name]
                emb = np.frombuffer(blob, dtype=np.float16).reshape(meta["shape"]).astype(np.float32)
            else:
                examples = lib.get(name).examples()
                if not examples:
                    continue
                emb = self.embed(examples)
                lib.put_signature(name, self._kind(), emb.astype(np.float16).tobytes(), {"shape": list(emb.shape)})
            owners += [len(kept)] * emb.shape[0]
            vecs.append(emb)
            kept.append(name)
        raw = np.concatenate(vecs) if vecs else np.zeros((0, 1), dtype=np.float32)
        mean = raw.mean(0) if len(raw) else np.zeros(raw.shape[1], dtype=np.float32)
        bank = _unit(raw - mean)
        owners_a = np.array(owners, dtype=np.int64)
        thresholds = self.calibration * self_similarity(bank, owners_a, len(kept))
        self._index = KnnIndex(kept, bank, owners_a, mean, thresholds)
        self._index_key = key
        return self._index

    # ------------------------------------------------------------ routing
    def route(self, texts: list[str]) -> list[RouteDecision]:
        t0 = time.perf_counter()
        idx = self.index()
        if not idx.names:
            return [RouteDecision(BASE_ROUTE, {}, True, time.perf_counter() - t0) for _ in texts]
        q = _unit(self.embed(texts) - idx.mean)
        votes, _ = knn_scores(q, idx.bank, idx.owners, len(idx.names), self.k)
        sims = q @ idx.bank.T
        out = []
        per = (time.perf_counter() - t0) / len(texts)
        for row in range(len(texts)):
            total = votes[row].sum()
            share = votes[row] / total if total > 0 else votes[row]
            top = int(np.argmax(share))
            scores = {n: round(float(s), 4) for n, s in zip(idx.names, share) if s > 0}
            closest = float(sims[row, idx.owners == top].max())
            confident = share[top] >= self.min_share and closest >= idx.thresholds[top]
            route = Route(((idx.names[top], 1.0),)) if confident else BASE_ROUTE
            out.append(RouteDecision(route, scores, not confident, per))
        return out


@register("knn")
def _make(runtime: "Runtime", **options: float) -> KnnRouter:
    return KnnRouter(runtime, **options)


__all__ = ["KnnRouter", "knn_scores", "torch"]
