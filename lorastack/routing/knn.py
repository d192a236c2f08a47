"""kNN routing (LoraRetriever; "when simple kNN beats complex learned routers"), with abstention
calibrated on negatives and a fallback for adapters that stored no examples.

Signatures. Each adapter's signature is the embeddings of a sample of its training inputs
(stored with the adapter at training time, embedded once and kept in the library index).
Embeddings are the base's own mean-pooled hidden states after its first few layers: no
second model to ship. Hidden states are anisotropic (raw cosines were 0.92-0.999 for
everything), so embeddings are centred on the mean of the library's examples and the
generic prompts before comparing.

Decision. An input's `k` nearest stored examples vote (weighted by cosine similarity) for
an adapter. Whether to route there is a separate question, answered by a margin: the
input's best similarity to the winner's examples minus its best similarity to a fixed set
of generic chat requests (`lorastack.tasks.generic`). The threshold on that margin is
fitted on negatives — generic prompts and other adapters' examples that would land on the
wrong adapter — at a target false-route rate (`routing.calibration`). The earlier rule
(a fraction of each adapter's self-similarity) abstained on every paraphrase: its
examples, all from one template, were closer to each other than any rewording.

Adapters without examples (imported from elsewhere) are routed by a fallback signal —
their card's description, embedded the same way, with its own margin threshold fitted on
the same negatives — when no adapter with examples is a confident match.

The index is rebuilt only when the library changes; everything it needs (example
embeddings, description embeddings, generic-prompt embeddings) is read from storage, so a
cold `generate --model auto` embeds just the request.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..atomic import TMP_PREFIX
from ..route import BASE_ROUTE, Route
from ..tasks.generic import calibration_prompts, calibration_set
from .calibration import DEFAULT_FALSE_ROUTE, Calibration, load_override, margins, twins
from .router import RouteDecision, register

if TYPE_CHECKING:
    from ..runtime import Runtime

EMBED_LAYERS = 6
GENERIC_FILE = "router-generic-{digest}.safetensors"  # per embedding kind and prompt set
ARROW_NEG_FILE = "router-arrow-negatives-{digest}.safetensors"
ARROW_NEG_GENERIC, ARROW_NEG_PER_ADAPTER = 48, 6  # negatives for example-less adapters' Arrow thresholds
EMBED_CACHE_SIZE = 20_000  # texts (~45 MB); keyed by the base's fingerprint, dtype and layer count
_EMBED_CACHE: dict[tuple[str, str, int], dict[str, np.ndarray]] = {}


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


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-8)


@dataclass
class KnnIndex:
    names: list[str]  # adapters with examples first (owners index them), then fallback-only ones
    bank: np.ndarray  # [m, d] stored examples, centred and normalised
    owners: np.ndarray  # [m]
    mean: np.ndarray  # [d], the centre
    generic: np.ndarray  # [g, d] generic calibration prompts, centred and normalised
    generic_groups: np.ndarray  # [g] each generic prompt's template (calibration leaves a whole phrasing out)
    calibration: Calibration  # margins of negatives for the example-based decision
    fallback: dict[int, tuple[np.ndarray, Calibration]] = field(default_factory=dict)  # adapter -> (description vecs, calibration)
    arrow: dict[str, Calibration] = field(default_factory=dict)  # example-less adapter -> calibration of its Arrow probability

    @property
    def n_with_examples(self) -> int:
        return int(self.owners.max()) + 1 if len(self.owners) else 0


def calibrate(bank: np.ndarray, owners: np.ndarray, n_adapters: int, generic: np.ndarray, k: int,
              generic_groups: np.ndarray | None = None) -> Calibration:
    """Fit the margin threshold's negatives: generic prompts and every stored example (leave-one-out
    against its own adapter) that would be routed to the wrong adapter. Own examples that land
    right are the positives reported back.

    A generic prompt is compared with the generic prompts of *other* templates only
    (`generic_groups`): leave-one-out alone would find the same sentence with another filler
    and make every negative look safely generic, which unrelated requests in new words are not
    (measured: 72-82% abstention on held-out unrelated prompts with leave-one-out, 99% with
    leave-one-template-out, at the same 1% rate)."""
    neg_m, neg_wrong, pos = [], [], []
    if len(generic) and len(bank):  # no adapter has examples (plain PEFT imports): nothing to vote for
        gs = generic @ generic.T
        groups = generic_groups if generic_groups is not None else np.arange(len(generic))
        gs[groups[:, None] == groups[None, :]] = -np.inf
        win, z = _decide(generic @ bank.T, owners, n_adapters, gs, k)
        neg_m += list(z)
        neg_wrong += [True] * len(z)
    if len(bank):
        s = bank @ bank.T
        np.fill_diagonal(s, -np.inf)
        gsim = bank @ generic.T if len(generic) else np.zeros((len(bank), 0))
        win, z = _decide(s, owners, n_adapters, gsim, k)
        wrong = (win != owners) & ~twins(owners, win, n_adapters)[owners, win]
        neg_m += list(z[wrong])  # an example routed to its own adapter (or its twin) is not a negative
        neg_wrong += [True] * int(wrong.sum())
        pos = z[~wrong]
    return Calibration.fit(np.array(neg_m), np.array(neg_wrong, dtype=bool), np.array(pos))


def _decide(sims: np.ndarray, owners: np.ndarray, n_adapters: int, generic_sims: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per query: the adapter its `k` nearest examples vote for, and its margin for that adapter."""
    kk = min(k, sims.shape[1])
    top = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
    votes = np.zeros((sims.shape[0], n_adapters))
    rows = np.repeat(np.arange(sims.shape[0]), kk)
    np.add.at(votes, (rows, owners[top].ravel()), np.maximum(np.take_along_axis(sims, top, 1), 0).ravel())
    win = votes.argmax(1)
    per, generic = margins(sims, owners, n_adapters, generic_sims)
    return win, per[np.arange(len(win)), win] - generic


class KnnRouter:
    name = "knn"

    def __init__(self, runtime: "Runtime", k: int = 8, false_route: float = DEFAULT_FALSE_ROUTE, fallback: bool = True,
                 arrow: bool = True) -> None:
        self.runtime = runtime
        self.k, self.false_route, self.use_fallback, self.use_arrow = int(k), float(false_route), bool(fallback), bool(arrow)
        self._arrow = None
        Calibration.fit(np.zeros(0), np.zeros(0), None).threshold(self.false_route)  # a bad rate fails here, once
        self._index: KnnIndex | None = None
        self._index_key: tuple | None = None
        self.override: float | None = None  # a threshold fitted on the user's data (router calibrate)

    # ------------------------------------------------------------ embeddings
    def embed(self, texts: list[str], layers: int = EMBED_LAYERS) -> np.ndarray:
        """Unit-norm embeddings after the base's first `layers` layers; recent ones are cached
        per base, so routers sharing inputs (kNN, an evaluation of several) embed each text once."""
        base = self.runtime.base
        cache = _EMBED_CACHE.setdefault((base.fingerprint, str(base.dtype), layers), {})
        todo = list(dict.fromkeys(t for t in texts if t not in cache))
        if todo:
            ids = [base.tokenizer(t, add_special_tokens=False)["input_ids"][:256] or [base.eos_token_id] for t in todo]
            runner = getattr(self.runtime.generator, "runner", None)
            if runner is None:
                raise NotImplementedError("kNN routing needs the engine (a Llama-family base)")
            e = runner.embed(ids, layers).float().numpy()
            e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-8)
            if len(cache) + len(todo) > EMBED_CACHE_SIZE:
                cache.clear()
            cache.update(zip(todo, e))
            if len(todo) > EMBED_CACHE_SIZE:
                return np.stack([e[todo.index(t)] for t in texts])
        return np.stack([cache[t] for t in texts])

    def _kind(self) -> str:
        return f"knn:{self.runtime.base.fingerprint}:L{EMBED_LAYERS}"

    def _desc_kind(self) -> str:
        return f"desc:{self.runtime.base.fingerprint}:L{EMBED_LAYERS}"

    def generic_embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        """The generic prompts' raw embeddings and template groups, computed once per base and
        stored next to the library."""
        from safetensors import safe_open
        from safetensors.numpy import save_file

        pairs = calibration_set()
        prompts, groups = [p for p, _ in pairs], np.array([g for _, g in pairs], dtype=np.int64)
        digest = hashlib.sha256(json.dumps([self._kind(), prompts]).encode()).hexdigest()[:16]
        path = self.runtime.library.root / GENERIC_FILE.format(digest=digest)
        if path.exists():
            with safe_open(str(path), framework="numpy") as f:
                if f.metadata().get("digest") == digest:
                    return f.get_tensor("emb").astype(np.float32), groups
        emb = self.embed(prompts)
        tmp = path.with_name(TMP_PREFIX + path.name)
        save_file({"emb": emb.astype(np.float16)}, str(tmp), metadata={"digest": digest})
        tmp.replace(path)
        return emb.astype(np.float16).astype(np.float32), groups

    def _stored(self, name: str, stored: dict, kind: str, texts: list[str]) -> np.ndarray | None:
        """An adapter's stored embeddings of `texts` under `kind`, computed and stored if missing."""
        if name in stored:
            meta, blob = stored[name]
            return np.frombuffer(blob, dtype=np.float16).reshape(meta["shape"]).astype(np.float32)
        if not texts:
            return None
        emb = self.embed(texts)
        self.runtime.library.put_signature(name, kind, emb.astype(np.float16).tobytes(), {"shape": list(emb.shape)})
        return emb.astype(np.float16).astype(np.float32)

    def index(self) -> KnnIndex:
        """Signatures of every routable adapter; missing ones are computed and stored once."""
        lib = self.runtime.library
        names = [n for n in lib.names() if self.runtime.fits(n)]
        stored = lib.signatures(self._kind())
        descs = lib.signatures(self._desc_kind()) if self.use_fallback else {}
        key = (tuple(names), lib.root, tuple(sorted(stored)), tuple(sorted(descs)))
        if self._index is not None and self._index_key == key:
            return self._index
        vecs, owners, kept, rest = [], [], [], []
        for name in names:
            emb = self._stored(name, stored, self._kind(), lib.get(name).examples())
            if emb is None:
                rest.append(name)
                continue
            owners += [len(kept)] * emb.shape[0]
            vecs.append(emb)
            kept.append(name)
        generic_raw, groups = self.generic_embeddings()
        raw = np.concatenate(vecs) if vecs else np.zeros((0, generic_raw.shape[1]), dtype=np.float32)
        mean = np.concatenate([raw, generic_raw]).mean(0)
        bank, generic = _unit(raw - mean), _unit(generic_raw - mean)
        owners_a = np.array(owners, dtype=np.int64)
        cal = calibrate(bank, owners_a, len(kept), generic, self.k, groups)
        fallback: dict[int, tuple[np.ndarray, Calibration]] = {}
        if self.use_fallback:
            for name in rest:
                desc = lib.get(name).card.description.strip()
                emb = self._stored(name, descs, self._desc_kind(), [desc] if desc else [])
                if emb is None:
                    continue
                d = _unit(emb - mean)
                fallback[len(kept) + len(fallback)] = (d, _fallback_calibration(d, bank, generic, groups))
                kept.append(name)
        arrow_cal = self._arrow_calibration(rest, kept[: len(vecs)]) if self.use_arrow and rest else {}
        for name in arrow_cal:
            if name not in kept:
                kept.append(name)
        self._index = KnnIndex(kept, bank, owners_a, mean, generic, groups, cal, fallback, arrow_cal)
        self.override = load_override(lib.root, self.name, self.runtime.base.fingerprint, kept)
        self._index_key = (tuple(names), lib.root, tuple(sorted(lib.signatures(self._kind()))),
                           tuple(sorted(lib.signatures(self._desc_kind()))) if self.use_fallback else ())
        return self._index

    def arrow_router(self):
        """The Arrow router scoring example-less adapters from their weights (made on first use)."""
        if self._arrow is None:
            from .arrow import ArrowRouter

            self._arrow = ArrowRouter(self.runtime)
        return self._arrow

    def _arrow_calibration(self, rest: list[str], with_examples: list[str]) -> dict[str, Calibration]:
        """Per example-less adapter: Arrow probabilities of negatives that are not its job —
        generic prompts and a few stored examples of every other adapter — so its threshold
        means the same false-route rate as everyone else's. Computed once per library state
        (one full forward per negative) and stored next to the library."""
        from safetensors import safe_open
        from safetensors.numpy import save_file

        lib = self.runtime.library
        arrow = self.arrow_router()
        names, _ = arrow.index()
        negatives = calibration_prompts()[:ARROW_NEG_GENERIC] + [
            t for n in with_examples for t in lib.get(n).examples()[:ARROW_NEG_PER_ADAPTER]]
        digest = hashlib.sha256(json.dumps([arrow._kind(), names, negatives, arrow.temperature, arrow.centre]).encode()).hexdigest()[:16]
        path = lib.root / ARROW_NEG_FILE.format(digest=digest)
        probs = None
        if path.exists():
            with safe_open(str(path), framework="numpy") as f:
                probs = f.get_tensor("p")
        if probs is None or probs.shape != (len(negatives), len(names)):
            _, probs = arrow.probabilities(negatives)
            tmp = path.with_name(TMP_PREFIX + path.name)
            save_file({"p": probs.astype(np.float32)}, str(tmp))
            tmp.replace(path)
        return {n: Calibration.fit(probs[:, names.index(n)], np.ones(len(probs), dtype=bool)) for n in rest if n in names}

    def apply_arrow(self, decisions: list[RouteDecision], texts: list[str], rate: float) -> None:
        """Send an input to an example-less adapter when Arrow's probability for it reaches that
        adapter's calibrated threshold (it then overrides the example-based choice: the other
        adapters' own examples rarely pass it, by construction)."""
        idx = self.index()
        if not idx.arrow:
            return
        names, probs = self.arrow_router().probabilities(texts)
        for d, p in zip(decisions, probs):
            best = None
            for name, cal in idx.arrow.items():
                if name not in names:  # the library changed between the two indexes: no Arrow signal this time
                    continue
                prob, t = float(p[names.index(name)]), cal.threshold(rate)
                # Arrow itself must name this adapter first, and clear its calibrated threshold.
                if prob >= p.max() and prob >= t and (best is None or prob - t > best[0]):
                    best = (prob - t, name, prob, t)
            if best is not None:
                _, name, prob, t = best
                d.route, d.abstained, d.signal, d.candidate = Route(((name, 1.0),)), False, "arrow", name
                d.confidence, d.threshold = round(prob, 4), round(t, 4)

    def routable(self) -> list[str]:
        """The adapters this router can send inputs to (by examples or by the fallback)."""
        return list(self.index().names)

    def threshold(self, false_route: float | None = None) -> float:
        """The margin an input must reach: the user-calibrated one, else the one fitted at the
        operating point (`false_route`, default the router's)."""
        idx = self.index()
        if false_route is None and self.override is not None:
            return self.override
        return idx.calibration.threshold(self.false_route if false_route is None else false_route)

    def query(self, texts: list[str]) -> np.ndarray:
        """Inputs embedded and centred like the index (rows L2-normalised)."""
        return _unit(self.embed(texts) - self.index().mean)

    def apply_fallback(self, decision: RouteDecision, q: np.ndarray, generic_best: float, rate: float) -> None:
        """Route an abstained `decision` to an example-less adapter whose description margin
        reaches that adapter's own threshold (the largest excess wins); leave it otherwise."""
        idx = self.index()
        best = None
        for a, (d, cal) in idx.fallback.items():
            margin = float((q @ d.T).max() - generic_best)
            t = cal.threshold(rate)
            if margin >= t and (best is None or margin - t > best[0]):
                best = (margin - t, a, margin, t)
        if best is not None:
            _, a, margin, t = best
            decision.route, decision.abstained = Route(((idx.names[a], 1.0),)), False
            decision.signal, decision.confidence, decision.threshold = "description", round(margin, 4), round(t, 4)
            decision.candidate = idx.names[a]

    def generic_best(self, q: np.ndarray) -> np.ndarray:
        """Each query row's best similarity to a generic prompt."""
        gs = q @ self.index().generic.T
        return np.maximum(gs.max(1), -1.0) if gs.shape[1] else np.full(len(q), -1.0)

    # ------------------------------------------------------------ routing
    def route(self, texts: list[str], false_route: float | None = None) -> list[RouteDecision]:
        t0 = time.perf_counter()
        idx = self.index()
        if not idx.names:
            return [RouteDecision(BASE_ROUTE, {}, True, time.perf_counter() - t0) for _ in texts]
        q = self.query(texts)
        n_ex = idx.n_with_examples
        gsims = q @ idx.generic.T
        if n_ex:
            sims = q @ idx.bank.T
            win, z = _decide(sims, idx.owners, n_ex, gsims, self.k)
            votes, _ = knn_scores(q, idx.bank, idx.owners, n_ex, self.k)
        threshold = self.threshold(false_route)
        rate = self.false_route if false_route is None else false_route
        generic_best = self.generic_best(q)
        out = []
        per = (time.perf_counter() - t0) / len(texts)
        for row in range(len(texts)):
            scores: dict[str, float] = {}
            decision = RouteDecision(BASE_ROUTE, scores, True, per, signal="examples", threshold=round(threshold, 4))
            if n_ex:
                total = votes[row].sum()
                share = votes[row] / total if total > 0 else votes[row]
                scores.update({n: round(float(s), 4) for n, s in zip(idx.names, share) if s > 0})
                decision.confidence = round(float(z[row]), 4)
                decision.candidate = idx.names[int(win[row])]
                if z[row] >= threshold:
                    decision.route, decision.abstained = Route(((idx.names[int(win[row])], 1.0),)), False
            if decision.abstained:
                self.apply_fallback(decision, q[row], float(generic_best[row]), rate)
            out.append(decision)
        self.apply_arrow(out, texts, rate)
        return out


def _fallback_calibration(desc: np.ndarray, bank: np.ndarray, generic: np.ndarray, groups: np.ndarray) -> Calibration:
    """Negatives for a description-routed adapter: every generic prompt (leave-one-template-out)
    and every other adapter's example; none of them is its job."""
    gs = generic @ generic.T
    gs[groups[:, None] == groups[None, :]] = -np.inf
    g_best = np.maximum(gs.max(1), -1.0) if len(generic) else np.zeros(0)
    neg = [(generic @ desc.T).max(1) - g_best]
    if len(bank):
        neg.append((bank @ desc.T).max(1) - ((bank @ generic.T).max(1) if len(generic) else -1.0))
    m = np.concatenate(neg)
    return Calibration.fit(m, np.ones(len(m), dtype=bool))


@register("knn")
def _make(runtime: "Runtime", **options: float) -> KnnRouter:
    return KnnRouter(runtime, **options)


__all__ = ["KnnRouter", "calibrate", "knn_scores", "torch"]
