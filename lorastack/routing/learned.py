"""Learned routing (mixture-of-LoRA gating, MoLE/DLP-LoRA style): a small gate over sentence features.

The gate is a multinomial logistic regression on centred sentence features (the base
embeddings the kNN router uses, next to MiniLM's when installed: `routing.gate_features`),
fitted on the library's stored examples and their instruction views (`routing.views`: the
same requests re-framed, so an adapter trained on one or two phrasings is not learned as
one sentence) plus one extra class, "none", made of the generic chat prompts the kNN
router calibrates on and their wrapped views (so the gate learns to say "no expert"
instead of always naming one). Fitting takes 1-2 s from the stored rows (0.5 s before views
and MiniLM), so the gate refits itself whenever the library's routable adapters, or their
stored examples (`lorastack adapters examples NAME --add`), differ from the ones it was
fitted on (`lorastack router fit` does the same explicitly). It keeps the adapters whose
probabilities make up `top_p` of the mass (at most `top_k`) as a weighted mixture.

Abstention: route only when the best adapter is more probable than "no expert" and its
probability reaches a threshold fitted on negatives at the router's false-route rate (a
decision reports the higher of the two as the threshold it had to reach). The shared
threshold is lowered for an adapter whose own negatives (those the gate would send to it)
sit lower, fitted on them at the same rate (`Calibration.adapter_threshold`): a narrow
adapter no longer has to clear the bar set by two easily confused neighbours (measured: a
two-phrasing adapter lost 10 of its 100 held-out paraphrases to the shared bar, 0.54, with
every negative that reached it at probability 0). Thresholds fitted on each adapter's
negatives alone lost: with under 100 negatives each, 1% allows none, so they were stricter
than the shared one for the confusable pair (reverse_words in-template top-1 fell to 92%).
The negatives' probabilities come from two-fold cross-fitting (each half scored by a gate
fitted on the other half; views train with their source's half), since a gate scored on
its own training data would look falsely certain. Saved as safetensors next to
the library index (never pickle).
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..atomic import TMP_PREFIX
from ..errors import LorastackError
from ..route import BASE_ROUTE, Route
from .calibration import DEFAULT_FALSE_ROUTE, Calibration, load_override, twins
from .gate_features import GateFeatures
from .knn import KnnRouter, _unit
from .router import RouteDecision, register
from .sentence import default_encoder

if TYPE_CHECKING:
    from ..runtime import Runtime

GATE_FILE = "router-learned.safetensors"


def fit_gate(x: np.ndarray, y: np.ndarray, n_classes: int, l2: float = 1e-5, steps: int = 300, lr: float = 0.5,
             seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression (weights [d, C], bias [C]) by full-batch L-BFGS."""
    torch.manual_seed(seed)
    X = torch.tensor(x, dtype=torch.float32)
    Y = torch.tensor(y, dtype=torch.long)
    W = torch.zeros(X.shape[1], n_classes, requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=lr, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(X @ W + b, Y) + l2 * (W * W).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach().numpy(), b.detach().numpy()


def softmax(logits: np.ndarray) -> np.ndarray:
    p = np.exp(logits - logits.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


def gate_confidence(p: np.ndarray, groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the best adapter (the last class is "none") and its confidence — its probability
    summed with its twins' (`groups`: a group id per adapter; twins share one), or 0 when "none"
    is more probable (then the gate itself says no expert)."""
    pa = p[:, :-1]
    best = pa.argmax(1)
    groups = np.arange(pa.shape[1]) if groups is None else groups
    pb = np.where(groups[None, :] == groups[best][:, None], pa, 0.0).sum(1)  # the best and its twins
    return best, np.where(pb > p[:, -1], pb, 0.0)


def twin_groups(best: np.ndarray, y: np.ndarray, n_adapters: int) -> np.ndarray:
    """A group id per adapter from out-of-fold predictions `best` of adapter rows labelled `y`."""
    twin = twins(y, best, n_adapters)  # the gate splits its probability between twins: they add up
    groups = np.arange(n_adapters)
    for a, b in zip(*np.nonzero(np.triu(twin, 1))):  # union: twins of twins share a group
        groups[groups == groups[b]] = groups[a]
    return groups


def gate_calibration(x: np.ndarray, y: np.ndarray, n_classes: int, folds: np.ndarray,
                     extra: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> tuple[Calibration, np.ndarray]:
    """Out-of-fold confidences: negatives are "none" rows and rows whose best adapter is wrong
    (not the row's own adapter nor its twin); positives are rows whose best adapter is right.
    `folds` (0/1) keep each generic template on one side, so negatives are scored by a gate that
    never saw their phrasing. `extra` (rows, labels, folds) are views: trained on with their
    source's fold, never scored (a view scored by a gate that saw its source would look falsely
    certain). Returns the calibration and the adapters' twin groups."""
    probs = np.zeros((len(y), n_classes))
    xa, ya, fa = extra if extra is not None else (x[:0], y[:0], folds[:0])
    for f in (0, 1):
        if (folds == f).all() or not (folds == f).any():
            continue
        W, b = fit_gate(np.concatenate([x[folds != f], xa[fa != f]]), np.concatenate([y[folds != f], ya[fa != f]]), n_classes)
        probs[folds == f] = softmax(x[folds == f] @ W + b)
    n = n_classes - 1
    adapter_rows = y < n
    groups = twin_groups(probs[adapter_rows, :-1].argmax(1), y[adapter_rows], n)
    best, conf = gate_confidence(probs, groups)
    wrong = ~adapter_rows | (groups[best] != groups[np.minimum(y, n - 1)])
    return Calibration.fit(conf[wrong], np.ones(int(wrong.sum()), dtype=bool), conf[~wrong], best[wrong]), groups


class LearnedRouter:
    name = "learned"

    def __init__(self, runtime: "Runtime", top_k: int = 1, top_p: float = 0.9, false_route: float = DEFAULT_FALSE_ROUTE,
                 sentence: bool = True) -> None:
        self.runtime = runtime
        self.top_k, self.top_p, self.false_route = int(top_k), float(top_p), float(false_route)
        self.knn = KnnRouter(runtime, false_route=false_route)  # same embeddings, signatures and description fallback
        self.features = GateFeatures(self.knn, default_encoder(_encoder_dtype(runtime)) if sentence else None)
        self._gate: tuple[list[str], np.ndarray, np.ndarray, np.ndarray, Calibration, np.ndarray] | None = None
        self._stamp = ""  # the stored examples the loaded gate was fitted on (Library.examples_stamp)
        self.override: float | None = None  # a threshold fitted on the user's data (router calibrate)

    @property
    def path(self):
        return self.runtime.library.root / GATE_FILE

    def fit(self) -> dict:
        """Train the gate on every routable adapter's stored examples and their views plus the
        generic "none" class, calibrate its threshold, and save it atomically."""
        from safetensors.numpy import save_file

        t0 = time.perf_counter()
        idx = self.knn.index()
        n = idx.n_with_examples
        if n < 1:
            raise LorastackError("the learned router needs at least 1 adapter with stored examples")
        stored = self.features.stored()
        rows = [self.features.adapter_rows(name, stored) for name in idx.names[:n]]
        generic, groups = self.features.generic_rows()
        present = [(a, r) for a, r in enumerate(rows) if r is not None]
        mean = np.concatenate([*(r.real for _, r in present), generic.real]).mean(0)
        owners = np.concatenate([np.full(len(r.real), a) for a, r in present])
        bank = _unit(np.concatenate([r.real for _, r in present]) - mean)
        x = np.concatenate([bank, _unit(generic.real - mean)])
        y = np.concatenate([owners, np.full(len(generic.real), n)])
        # Views train the gate; each takes its source's fold in the calibration's cross-fitting.
        ex_folds = np.random.default_rng(0).permutation(len(owners)) % 2
        folds = np.concatenate([ex_folds, groups % 2])
        starts = np.cumsum([0] + [len(r.real) for _, r in present])
        views = [(_unit(r.views - mean), np.full(len(r.views), a), ex_folds[start + r.sources])
                 for (a, r), start in zip(present, starts)]
        views.append((_unit(generic.views - mean), np.full(len(generic.views), n), groups[generic.sources] % 2))
        xa, ya, fa = (np.concatenate([v[i] for v in views]) for i in range(3))
        W, b = fit_gate(np.concatenate([x, xa]), np.concatenate([y, ya]), n + 1)
        cal, groups = gate_calibration(x, y, n + 1, folds, (xa, ya, fa))
        acc = float(((bank @ W + b).argmax(1) == owners).mean())
        tmp = self.path.with_name(TMP_PREFIX + GATE_FILE)
        save_file({"W": W.astype(np.float32), "b": b.astype(np.float32), "mean": mean.astype(np.float32),
                   "neg": cal.false_margins.astype(np.float32), "neg_owner": cal.false_owners.astype(np.int64),
                   "pos": cal.positive_margins.astype(np.float32)}, str(tmp),
                  metadata={"names": json.dumps(idx.names[:n]), "base": self.runtime.base.fingerprint, "n_neg": str(cal.n_neg),
                           "groups": json.dumps([int(g) for g in groups]),
                           "features": self.features.kind, "examples": self.runtime.library.examples_stamp(idx.names[:n])})
        tmp.replace(self.path)
        self._gate = None
        twins = [[idx.names[a] for a in np.nonzero(groups == g)[0]] for g in np.unique(groups) if (groups == g).sum() > 1]
        return {"adapters": n, "examples": int(len(owners)), "views": int(len(ya)), "generic": int(len(generic.real)), "twins": twins,
                "features": self.features.kind, "train_accuracy": acc,
                "seconds": round(time.perf_counter() - t0, 2), "path": str(self.path)}

    def _current(self) -> list[str]:
        idx = self.knn.index()
        return idx.names[: idx.n_with_examples]

    def _load(self) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray, Calibration, np.ndarray]:
        """The saved gate, refitted first if it is missing, for another base, or for another set of adapters."""
        from safetensors import safe_open

        current = self._current()
        stamp = self.runtime.library.examples_stamp(current)  # examples added to an adapter refit the gate too
        if self._gate is not None and self._gate[0] == current and self._stamp == stamp:
            return self._gate
        for attempt in range(2):
            if self.path.exists():
                with safe_open(str(self.path), framework="numpy") as f:
                    meta = f.metadata()
                    if (meta.get("base") == self.runtime.base.fingerprint and json.loads(meta["names"]) == current
                            and meta.get("features") == self.features.kind and meta.get("examples") == stamp
                            and "groups" in meta):  # gates saved before twin groups existed refit once
                        cal = Calibration(f.get_tensor("neg").astype(np.float64), int(meta["n_neg"]), f.get_tensor("pos"),
                                          f.get_tensor("neg_owner") if "neg_owner" in f.keys() else None)
                        groups = np.array(json.loads(meta["groups"]), dtype=np.int64)
                        self._gate = (current, f.get_tensor("W"), f.get_tensor("b"), f.get_tensor("mean"), cal, groups)
                        self._stamp = stamp
                        self.override = load_override(self.runtime.library.root, self.name, self.runtime.base.fingerprint, current)
                        return self._gate
            if attempt == 0:
                self.fit()
        raise LorastackError(f"could not fit the learned router for this library ({self.path})")

    def routable(self) -> list[str]:
        return self._current()

    def threshold(self, false_route: float | None = None, adapter: int | None = None) -> float:
        """The probability the best adapter must reach: user-calibrated, else fitted at the
        operating point — the shared threshold, or `adapter`'s when one is named (the shared
        one, lowered where the negatives that would reach that adapter sit lower)."""
        cal = self._load()[4]
        if false_route is None and self.override is not None:
            return self.override
        rate = self.false_route if false_route is None else false_route
        return cal.threshold(rate) if adapter is None else cal.adapter_threshold(adapter, rate)

    def route(self, texts: list[str], false_route: float | None = None) -> list[RouteDecision]:
        t0 = time.perf_counter()
        rate = self.false_route if false_route is None else false_route
        if not self._current():  # no adapter has examples: only the description fallback can route
            return self.knn.route(texts, false_route=rate)
        names, W, b, mean, _, groups = self._load()
        probs = softmax(_unit(self.features.embed(texts) - mean) @ W + b)
        per = (time.perf_counter() - t0) / len(texts)
        fallback = bool(self.knn.index().fallback)
        q = generic_best = None
        out = []
        _, confs = gate_confidence(probs, groups)
        for p, conf in zip(probs, confs):
            p_none = float(p[-1])
            pa = p[:-1]
            order = np.argsort(-pa)[: self.top_k]
            keep, mass = [], 0.0
            for i in order:
                keep.append(int(i))
                mass += pa[i]
                if mass >= self.top_p * (1 - p_none):
                    break
            # Route when the best adapter beats "no expert" and reaches the calibrated threshold;
            # the threshold shown is whichever of the two it had to clear.
            best_p = float(pa[groups == groups[order[0]]].sum())  # with its twins
            threshold = self.threshold(false_route, int(order[0]))
            confident = bool(conf > 0 and conf >= threshold)
            shown = max(threshold, p_none)
            total = sum(pa[i] for i in keep)
            route = Route(tuple((names[i], round(float(pa[i] / total), 4)) for i in keep)) if confident else BASE_ROUTE
            if confident and len(keep) == 1:
                route = Route(((names[keep[0]], 1.0),))
            scores = {n: round(float(v), 4) for n, v in zip(names, pa) if v >= 1e-4}
            decision = RouteDecision(route, scores, not confident, per, signal="gate", candidate=names[int(order[0])],
                                     confidence=round(best_p, 4), threshold=round(shown, 4))
            if decision.abstained and fallback:
                if q is None:  # kNN's embedding only when an example-less adapter may take an abstained input
                    q = self.knn.query(texts)
                    generic_best = self.knn.generic_best(q)
                self.knn.apply_fallback(decision, q[len(out)], float(generic_best[len(out)]), rate)
            out.append(decision)
        self.knn.apply_arrow(out, texts, rate)
        return out


def _encoder_dtype(runtime: "Runtime") -> torch.dtype:
    """MiniLM runs in the base's dtype when that is bfloat16 (see `routing.sentence`), else float32."""
    dtype = getattr(runtime.base, "dtype", torch.float32)
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


@register("learned")
def _make(runtime: "Runtime", **options: float) -> LearnedRouter:
    return LearnedRouter(runtime, **options)
