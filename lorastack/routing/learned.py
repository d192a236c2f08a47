"""Learned routing (mixture-of-LoRA gating, MoLE/DLP-LoRA style): a small gate over sentence features.

The gate is a multinomial logistic regression on the same centred base embeddings the
kNN router uses, fitted on the library's stored examples with `lorastack router fit`
(full-batch gradient descent with L2; a few hundred examples per adapter fit in well
under a second). It keeps the adapters whose probabilities make up `top_p` of the mass
(at most `top_k`), as a weighted mixture, and abstains when the best probability is
below `min_prob`. Saved as safetensors next to the library index (never pickle).
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
from .knn import KnnRouter, _unit
from .router import RouteDecision, register

if TYPE_CHECKING:
    from ..runtime import Runtime

GATE_FILE = "router-learned.safetensors"


def fit_gate(x: np.ndarray, y: np.ndarray, n_classes: int, l2: float = 1e-3, steps: int = 300, lr: float = 0.5,
             seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression (weights [d, C], bias [C]) by full-batch gradient descent."""
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


class LearnedRouter:
    name = "learned"

    def __init__(self, runtime: "Runtime", top_k: int = 1, top_p: float = 0.9, min_prob: float = 0.5) -> None:
        self.runtime = runtime
        self.top_k, self.top_p, self.min_prob = top_k, top_p, min_prob
        self.knn = KnnRouter(runtime)  # same embeddings and stored signatures
        self._gate: tuple[list[str], np.ndarray, np.ndarray, np.ndarray] | None = None

    @property
    def path(self):
        return self.runtime.library.root / GATE_FILE

    def fit(self) -> dict:
        """Train the gate on every routable adapter's stored examples and save it atomically."""
        from safetensors.numpy import save_file

        t0 = time.perf_counter()
        idx = self.knn.index()
        if len(idx.names) < 2:
            raise LorastackError("the learned router needs at least 2 adapters with stored examples")
        W, b = fit_gate(idx.bank, idx.owners, len(idx.names))
        acc = float(((idx.bank @ W + b).argmax(1) == idx.owners).mean())
        tmp = self.path.with_name(TMP_PREFIX + GATE_FILE)
        save_file({"W": W.astype(np.float32), "b": b.astype(np.float32), "mean": idx.mean.astype(np.float32)}, str(tmp),
                  metadata={"names": json.dumps(idx.names), "base": self.runtime.base.fingerprint})
        tmp.replace(self.path)
        self._gate = None
        return {"adapters": len(idx.names), "examples": int(len(idx.owners)), "train_accuracy": acc,
                "seconds": round(time.perf_counter() - t0, 2), "path": str(self.path)}

    def _load(self) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
        if self._gate is None:
            from safetensors import safe_open

            if not self.path.exists():
                raise LorastackError("the learned router is not fitted for this library; run `lorastack router fit`")
            with safe_open(str(self.path), framework="numpy") as f:
                meta = f.metadata()
                if meta.get("base") != self.runtime.base.fingerprint:
                    raise LorastackError("the learned router was fitted for another base; run `lorastack router fit`")
                self._gate = (json.loads(meta["names"]), f.get_tensor("W"), f.get_tensor("b"), f.get_tensor("mean"))
        return self._gate

    def route(self, texts: list[str]) -> list[RouteDecision]:
        t0 = time.perf_counter()
        names, W, b, mean = self._load()
        current = set(self.runtime.library.names())
        if not set(names) <= current:
            raise LorastackError("the learned router was fitted on adapters that are gone; run `lorastack router fit`")
        logits = _unit(self.knn.embed(texts) - mean) @ W + b
        probs = np.exp(logits - logits.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        per = (time.perf_counter() - t0) / len(texts)
        out = []
        for p in probs:
            order = np.argsort(-p)[: self.top_k]
            keep, mass = [], 0.0
            for i in order:
                keep.append(int(i))
                mass += p[i]
                if mass >= self.top_p:
                    break
            confident = p[order[0]] >= self.min_prob
            total = sum(p[i] for i in keep)
            route = Route(tuple((names[i], round(float(p[i] / total), 4)) for i in keep)) if confident else BASE_ROUTE
            if confident and len(keep) == 1:
                route = Route(((names[keep[0]], 1.0),))
            out.append(RouteDecision(route, {n: round(float(v), 4) for n, v in zip(names, p) if v >= 1e-4}, not confident, per))
        return out


@register("learned")
def _make(runtime: "Runtime", **options: float) -> LearnedRouter:
    return LearnedRouter(runtime, **options)
