"""Arrow routing ("Towards Modular LLMs by Building and Reusing a Library of LoRAs"): zero-shot.

No data at all: each adapter's prototype for a LoRA'd module is the top right singular
vector of its update `dW = B A` (the input direction the adapter changes most). An input
is scored per adapter by `|<x, v>| / |x|` at that module's input, averaged over tokens
and over the modules both exist for; a softmax over adapters picks the route.

This implementation routes per sequence (pooled), with prototypes from the modules whose
inputs are the layer norms' outputs (q/k/v and gate/up); per-token routing inside the
model is not implemented.

Centring (on by default; `[routing.arrow] centre = false` gives the paper's plain score):
this base's layer inputs share one large mean direction (mean |cos(token, mean)| = 0.65,
bench/arrow_diagnose.py), so `|<x, v>|` mostly measures each prototype's overlap with that
direction, the same for every input, and a few adapters win everything. Subtracting the
base's mean layer input — estimated from a fixed set of generic chat prompts (GENERIC
below: no task data, no adapter data, so routing stays zero-shot) — before scoring took
top-1 routing over 8 task adapters from 50% to 79% (`lorastack eval-routing`, single-phrasing
tasks; on the varied phrasings with 8 adapters, several trained for only 15-30 steps: 53%
in-template, 43% on held-out paraphrases, and it never abstains).

The top singular vector of `B A` comes from a QR of B (`B = Q R`): `B A = Q (R A)`, so it
is the top right singular vector of the small `r x in` matrix `R A` — no `out x in` SVD.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..adapter import LoraPairs
from ..route import BASE_ROUTE, Route
from .router import RouteDecision, register

if TYPE_CHECKING:
    from ..runtime import Runtime

# Generic requests (no task or benchmark data) whose layer inputs estimate the base's mean.
GENERIC = (
    "Write a short poem about the sea.", "What is the capital of France?", "Explain how photosynthesis works.",
    "Give me three tips for better sleep.", "Translate 'good morning' into Spanish.", "Summarize the plot of a fairy tale.",
    "How do I boil an egg?", "Tell me a joke about computers.", "What are the benefits of exercise?",
    "Describe a sunset in one sentence.", "List some fruits that are red.", "Why is the sky blue?",
    "Write a thank-you note to a friend.", "What does a bee do?", "Name a famous painter.", "How many days are in a week?",
)
ROUTED = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "gate_proj": "mlp", "up_proj": "mlp"}


def top_right_singular_vector(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Unit top right singular vector of `B @ A` (A: [r, in], B: [out, r])."""
    _, R = torch.linalg.qr(B.double())
    _, _, vh = torch.linalg.svd(R @ A.double(), full_matrices=False)
    return vh[0].float()


def prototypes(weights: LoraPairs, n_layers: int, dim: int) -> np.ndarray:
    """[n_layers, 2, 3, dim]: per layer and input (attention, MLP) the prototypes of up to
    three modules reading it (q/k/v, gate/up); zeros where the adapter has no such module."""
    out: dict[tuple[int, str], list[torch.Tensor]] = {}
    for module, (a, b) in weights.modules.items():
        parts = module.split(".")
        leaf = parts[-1]
        if leaf not in ROUTED or "layers" not in parts:
            continue
        layer = int(parts[parts.index("layers") + 1])
        out.setdefault((layer, ROUTED[leaf]), []).append(top_right_singular_vector(a.float(), b.float()))
    protos = np.zeros((n_layers, 2, 3, dim), dtype=np.float32)  # up to 3 modules per input
    for (layer, kind), vecs in out.items():
        for i, v in enumerate(vecs[:3]):
            protos[layer, 0 if kind == "attn" else 1, i] = v.numpy()
    return protos


def arrow_scores(inputs: np.ndarray, protos: np.ndarray, mean: np.ndarray | None = None) -> np.ndarray:
    """Mean over tokens, layers and present modules of |<x, v>| / |x|, per adapter.

    `inputs [layers, 2, T, d]` are one sequence's layer-norm outputs; `protos [A, layers, 2, m, d]`;
    `mean [layers, 2, d]`, if given, is subtracted from every token's input first.
    """
    if mean is not None:
        inputs = inputs - mean[:, :, None, :]
    x = inputs / np.maximum(np.linalg.norm(inputs, axis=-1, keepdims=True), 1e-8)
    dots = np.abs(np.einsum("lktd,alkmd->alkmt", x, protos)).mean(-1)  # [A, layers, 2, m]
    present = (np.abs(protos).sum(-1) > 0)  # [A, layers, 2, m]
    return (dots * present).sum((1, 2, 3)) / np.maximum(present.sum((1, 2, 3)), 1)


class ArrowRouter:
    name = "arrow"

    def __init__(self, runtime: "Runtime", temperature: float = 0.01, min_prob: float = 0.0, centre: bool = True) -> None:
        self.runtime = runtime
        self.temperature, self.min_prob, self.centre = temperature, min_prob, bool(centre)
        self._mean: np.ndarray | None = None
        self._cache: tuple[tuple[str, ...], np.ndarray] | None = None

    def _kind(self) -> str:
        return f"arrow:{self.runtime.base.fingerprint}"

    def index(self) -> tuple[list[str], np.ndarray]:
        lib, rt = self.runtime.library, self.runtime
        names = [n for n in lib.names() if rt.fits(n)]
        if self._cache is not None and self._cache[0] == tuple(names):
            return names, self._cache[1]
        stored = lib.signatures(self._kind())
        n_layers = rt.base.model.config.num_hidden_layers
        protos = []
        for name in names:
            if name in stored:
                meta, blob = stored[name]
                p = np.frombuffer(blob, dtype=np.float16).reshape(meta["shape"]).astype(np.float32)
            else:
                p = prototypes(lib.pairs(name, torch.float32), n_layers, rt.base.model.config.hidden_size)
                lib.put_signature(name, self._kind(), p.astype(np.float16).tobytes(), {"shape": list(p.shape)})
            protos.append(p)
        stacked = np.stack(protos) if protos else np.zeros((0,))
        self._cache = (tuple(names), stacked)
        return names, stacked

    def probabilities(self, texts: list[str]) -> tuple[list[str], np.ndarray]:
        """The routable adapters and, per text, Arrow's softmax over them ([texts, adapters]);
        one full forward per text (layer inputs at every layer)."""
        names, protos = self.index()
        runner = getattr(self.runtime.generator, "runner", None)
        if not names or runner is None:
            return names, np.zeros((len(texts), len(names)))
        base = self.runtime.base
        if self.centre and self._mean is None:  # once per router: 16 short forwards
            self._mean = np.mean([runner.layer_inputs(base.chat_ids([{"role": "user", "content": g}])).numpy().mean(2)
                                  for g in GENERIC], 0)
        out = np.zeros((len(texts), len(names)))
        for i, text in enumerate(texts):
            inputs = runner.layer_inputs(base.chat_ids([{"role": "user", "content": text}])).numpy()
            s = arrow_scores(inputs, protos, self._mean if self.centre else None)
            p = np.exp((s - s.max()) / self.temperature)
            out[i] = p / p.sum()
        return names, out

    def route(self, texts: list[str], false_route: float | None = None) -> list[RouteDecision]:
        """Arrow has no calibrated abstention (`false_route` is accepted and unused): it abstains
        only below `min_prob`, so it names an adapter for unrelated inputs too."""
        t0 = time.perf_counter()
        names, probs = self.probabilities(texts)
        if not names or not probs.size:
            return [RouteDecision(BASE_ROUTE, {}, True, time.perf_counter() - t0) for _ in texts]
        per = (time.perf_counter() - t0) / len(texts)
        out = []
        for p in probs:
            top = int(np.argmax(p))
            confident = p[top] >= self.min_prob
            route = Route(((names[top], 1.0),)) if confident else BASE_ROUTE
            out.append(RouteDecision(route, {n: round(float(v), 4) for n, v in zip(names, p)}, not confident, per,
                                     signal="arrow", candidate=names[top], confidence=round(float(p[top]), 4),
                                     threshold=self.min_prob))
        return out


@register("arrow")
def _make(runtime: "Runtime", **options: float) -> ArrowRouter:
    return ArrowRouter(runtime, **options)
