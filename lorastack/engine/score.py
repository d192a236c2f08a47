"""Scoring: the log-likelihood of a completion under each row's route, many rows per forward.

Why a scoring call next to generation: a few-shot weight search (LoraHub) needs the loss
of many candidate weightings on the same handful of examples. Through PEFT that is one
model forward per weighting (and a re-merge of the adapters each time); here every
(example, weighting) pair is a row of one packed forward, each row with its own LoRA
mixture, exactly like the engine's prefill. Nothing is cached: a scored sequence is read
once, so there is no KV cache and no decode.

Two kinds of per-row LoRA plug into the same forward (`completion_logprobs`):
- `LoraBatch` (the engine's own): rows carry Routes over resident library adapters;
  `score(engine, ...)` wires it up.
- `MixtureLora`: K fixed candidate adapters and a per-row weight vector `[rows, K]` that
  may require grad, so the same forward gives gradients with respect to mixture weights
  (few-shot gradient descent on K scalars) and accepts negative weights (GenKnowSub).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..adapter import LoraPairs
from ..errors import LorastackError
from ..route import Route
from .llama import LlamaRunner
from .lora import LoraBatch


class MixtureLora:
    """Per-row weighted sums of K candidate adapters' deltas, differentiable in the weights.

    Duck-types `LoraBatch.add_delta` for `LlamaRunner`. For each fused projection the
    candidates' A factors (all parts, ranks zero-padded to the largest) are stacked once,
    so a forward costs two GEMMs per projection whatever the rows' weights are.
    """

    def __init__(self, groups: dict[str, list[tuple[str, int, int]]], candidates: Sequence[LoraPairs],
                 dtype: torch.dtype) -> None:
        if not candidates:
            raise LorastackError("a mixture needs at least one candidate adapter")
        self.k = len(candidates)
        self.rank = max(c.rank for c in candidates)
        self.A: dict[str, torch.Tensor] = {}  # group -> [parts*K*R, in]
        self.B: dict[str, list[torch.Tensor]] = {}  # group -> per part [K*R, out_part]
        known = {m for parts in groups.values() for m, _, _ in parts}
        for c in candidates:
            unknown = [m for m in c.modules if m not in known]
            if unknown:
                raise LorastackError(f"adapter {c.name!r} targets {unknown[0]!r}, which the base does not have")
        R = self.rank
        for group, parts in groups.items():
            if not any(m in c.modules for c in candidates for m, _, _ in parts):
                continue
            fin = parts[0][1]
            a = torch.zeros(len(parts), self.k, R, fin)
            bs = []
            for i, (module, _, out) in enumerate(parts):
                b = torch.zeros(self.k, R, out)
                for j, c in enumerate(candidates):
                    if module in c.modules:
                        ca, cb = c.modules[module]
                        a[i, j, : ca.shape[0]] = ca.float()
                        b[j, : ca.shape[0]] = cb.float().t()
                bs.append(b.reshape(self.k * R, out).to(dtype))
            self.A[group] = a.reshape(-1, fin).to(dtype)
            self.B[group] = bs
        self.weights: torch.Tensor | None = None  # per token [T, K]

    def set_rows(self, weights: torch.Tensor, tokens: list[int]) -> None:
        """`weights [rows, K]` (may require grad); `tokens[i]` packed tokens of row i."""
        if weights.shape[-1] != self.k:
            raise LorastackError(f"expected {self.k} weights per row, got {weights.shape[-1]}")
        self.weights = weights.repeat_interleave(torch.tensor(tokens), dim=0)

    def add_delta(self, group: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if group not in self.A:
            return y
        x2 = x.reshape(-1, x.shape[-1])
        t = x2 @ self.A[group].t()  # [T, parts*K*R]
        parts = len(self.B[group])
        w = self.weights.to(t.dtype)[:, None, :, None].expand(-1, parts, -1, self.rank).reshape(t.shape[0], -1)
        t = t * w
        width = self.k * self.rank
        delta = torch.cat([t[:, i * width : (i + 1) * width] @ b for i, b in enumerate(self.B[group])], -1)
        return y + delta.view(y.shape).to(y.dtype)


def completion_logprobs(runner: LlamaRunner, seqs: Sequence[tuple[list[int], list[int]]], lora) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log p(completion | prompt) per row and the completion's token count per row.

    `seqs` is `[(prompt_ids, completion_ids)]`; `lora` a `LoraBatch` or `MixtureLora` set up
    for these rows with `tokens = len(prompt) + len(completion)` each. Runs without
    `inference_mode`, so gradients flow into a MixtureLora's weights when they require grad
    (wrap calls in `torch.no_grad()` otherwise).
    """
    if not seqs:
        return torch.zeros(0), torch.zeros(0)
    for p, c in seqs:
        if not p or not c:
            raise LorastackError("every scored row needs a non-empty prompt and completion")
    lengths = [len(p) + len(c) for p, c in seqs]
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    total = offsets[-1]
    ids = torch.tensor([t for p, c in seqs for t in p + c]).view(1, -1)
    positions = torch.cat([torch.arange(n) for n in lengths]).view(1, -1)
    inner, hd = runner.inner, runner.head_dim
    h = inner.embed_tokens(ids)
    cos, sin = inner.rotary_emb(h, positions)
    for li, layer in enumerate(runner.layers):
        x = layer.input_layernorm(h)
        q, k, v = runner._qkv(li, x, lora)
        q = q.view(1, total, -1, hd).transpose(1, 2)
        k = k.view(1, total, -1, hd).transpose(1, 2)
        v = v.view(1, total, -1, hd).transpose(1, 2)
        q, k = runner.rope(q, k, cos, sin)
        out = torch.cat([
            F.scaled_dot_product_attention(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], is_causal=True,
                                           scale=layer.self_attn.scaling, enable_gqa=True)
            for lo, hi in zip(offsets[:-1], offsets[1:])
        ], dim=2)
        h = h + runner._linear(li, "o_proj", out.transpose(1, 2).reshape(1, total, -1), lora)
        h = h + runner._mlp(li, layer, layer.post_attention_layernorm(h), lora)
    # Only positions that predict a completion token go through the LM head.
    pick, targets, row_of = [], [], []
    for i, (p, c) in enumerate(seqs):
        start = offsets[i] + len(p) - 1
        pick += range(start, start + len(c))
        targets += c
        row_of += [i] * len(c)
    hidden = inner.norm(h[0, torch.tensor(pick)])
    logits = runner.model.lm_head(hidden).float()
    tok_lp = -F.cross_entropy(logits, torch.tensor(targets), reduction="none")
    sums = torch.zeros(len(seqs), dtype=tok_lp.dtype).index_add(0, torch.tensor(row_of), tok_lp)
    counts = torch.tensor([float(len(c)) for _, c in seqs])
    return sums, counts


def score(engine, seqs: Sequence[tuple[list[int], list[int]]], routes: Sequence[Route]) -> list[float]:
    """The engine's scoring call: log p(completion | prompt) of each row under its own Route.

    Adapters are loaded into the engine's bank like for generation (pinned while scored).
    Call it while the engine's background loop is stopped: the loop and a scoring pass
    would share the bank's slots.
    """
    if len(seqs) != len(routes):
        raise LorastackError(f"{len(seqs)} sequences but {len(routes)} routes")
    if getattr(engine, "_thread", None) is not None:
        raise LorastackError("stop the engine's background loop before scoring (they share the adapter bank)")
    bank = engine.bank
    rows = []
    try:
        for route in routes:
            slots = bank.slots_for(route)
            bank.pin(slots)  # so a later row's adapter cannot evict this row's
            rows.append(slots)
        lora = LoraBatch(bank, rows, tokens=[len(p) + len(c) for p, c in seqs])
        with torch.inference_mode():
            sums, _ = completion_logprobs(engine.runner, seqs, lora)
        return sums.tolist()
    finally:
        for slots in rows:
            bank.unpin(slots)
