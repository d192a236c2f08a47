"""Scoring: the log-likelihood of a completion under each row's route, many rows per forward.

Why a scoring call next to generation: a few-shot weight search (LoraHub) needs the loss
of many candidate weightings on the same handful of examples. Through PEFT that is one
model forward per weighting (and a re-merge of the adapters each time); here every
(example, weighting) pair is a row of one packed forward, each row with its own LoRA
mixture, exactly like the engine's prefill. Nothing is cached: a scored sequence is read
once, so there is no KV cache and no decode.

The same forward gives every token's logprob (`sequence_logprobs`): the server's `echo`
with `logprobs` (prompt tokens' logprobs, what lm-eval's loglikelihood tasks read) runs it
through `prompt_logprobs` on the engine's thread, each row under its own route.

Two kinds of per-row LoRA plug into the same forward (`completion_logprobs`):
- `LoraBatch` (the engine's own): rows carry Routes over resident library adapters;
  `score(engine, ...)` wires it up.
- `MixtureLora`: K fixed candidate adapters and a per-row weight vector `[rows, K]` that
  may require grad, so the same forward gives gradients with respect to mixture weights
  (few-shot gradient descent on K scalars) and accepts negative weights (GenKnowSub).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ..adapter import LoraPairs
from ..errors import LorastackError
from ..route import Route
from .llama import LlamaRunner
from .lora import LoraBatch
from .sampling import MAX_TOP_LOGPROBS, TokenLogprob, token_logprobs

HEAD_CHUNK = 256  # positions per LM-head product: [256, vocab] floats stay small for long prompts


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


def _hidden(runner: LlamaRunner, rows: Sequence[list[int]], lora) -> torch.Tensor:
    """Final hidden states (before the last norm) of `rows` packed into one sequence, [total, d];
    each row attends only to itself, under its own LoRA rows in `lora`."""
    lengths = [len(r) for r in rows]
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    total = offsets[-1]
    ids = torch.tensor([t for r in rows for t in r]).view(1, -1)
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
    return h[0]


def _logits(runner: LlamaRunner, hidden: torch.Tensor) -> torch.Tensor:
    return runner.model.lm_head(runner.inner.norm(hidden)).float()


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
    h = _hidden(runner, [p + c for p, c in seqs], lora)
    # Only positions that predict a completion token go through the LM head.
    pick, targets, row_of, start = [], [], [], 0
    for i, (p, c) in enumerate(seqs):
        first = start + len(p) - 1
        pick += range(first, first + len(c))
        targets += c
        row_of += [i] * len(c)
        start += len(p) + len(c)
    logits = _logits(runner, h[torch.tensor(pick)])
    tok_lp = -F.cross_entropy(logits, torch.tensor(targets), reduction="none")
    sums = torch.zeros(len(seqs), dtype=tok_lp.dtype).index_add(0, torch.tensor(row_of), tok_lp)
    counts = torch.tensor([float(len(c)) for _, c in seqs])
    return sums, counts


def sequence_logprobs(runner: LlamaRunner, rows: Sequence[list[int]], lora, top: int = 0) -> list[list[TokenLogprob | None]]:
    """Every token's logprob given the tokens before it, per row (the first token has none:
    nothing predicts it), with the `top` most likely alternatives at each position.

    The LM head runs over `HEAD_CHUNK` positions at a time, so a long prompt never holds a
    [tokens, vocab] matrix at once."""
    if any(not r for r in rows):
        raise LorastackError("every scored row needs at least one token")
    h = _hidden(runner, rows, lora)
    out: list[list[TokenLogprob | None]] = []
    start = 0
    for r in rows:
        entries: list[TokenLogprob | None] = [None]
        for lo in range(0, len(r) - 1, HEAD_CHUNK):
            hi = min(lo + HEAD_CHUNK, len(r) - 1)
            entries += token_logprobs(_logits(runner, h[start + lo : start + hi]), r[lo + 1 : hi + 1], top)
        out.append(entries)
        start += len(r)
    return out


@contextmanager
def _routed(engine, routes: Sequence[Route], tokens: list[int]):
    """A `LoraBatch` for rows under `routes` over the engine's bank, their slots pinned meanwhile.

    Only safe where no engine step runs at the same time: the loop stopped, or on its own
    thread (`Engine.run_between_steps`), since steps and this share the bank's slots."""
    thread = getattr(engine, "_thread", None)
    if thread is not None and threading.current_thread() is not thread:
        raise LorastackError("stop the engine's background loop before scoring, or score through "
                             "engine.run_between_steps (they share the adapter bank)")
    bank = engine.bank
    rows = []
    try:
        for route in routes:
            slots = bank.slots_for(route)
            bank.pin(slots)  # so a later row's adapter cannot evict this row's
            rows.append(slots)
        yield LoraBatch(bank, rows, tokens=tokens)
    finally:
        for slots in rows:
            bank.unpin(slots)


def prompt_logprobs(engine, rows: Sequence[list[int]], routes: Sequence[Route], top: int = 0) -> list[list[TokenLogprob | None]]:
    """`sequence_logprobs` of each row under its own Route, through the engine's adapter bank."""
    if len(rows) != len(routes):
        raise LorastackError(f"{len(rows)} sequences but {len(routes)} routes")
    if not 0 <= top <= MAX_TOP_LOGPROBS:
        raise LorastackError(f"top must be between 0 and {MAX_TOP_LOGPROBS}, got {top}")
    with _routed(engine, routes, [len(r) for r in rows]) as lora, torch.inference_mode():
        return sequence_logprobs(engine.runner, rows, lora, top)


def score(engine, seqs: Sequence[tuple[list[int], list[int]]], routes: Sequence[Route]) -> list[float]:
    """The engine's scoring call: log p(completion | prompt) of each row under its own Route.

    Adapters are loaded into the engine's bank like for generation (pinned while scored).
    Call it while the engine's background loop is stopped, or on its thread: the loop and a
    scoring pass share the bank's slots.
    """
    if len(seqs) != len(routes):
        raise LorastackError(f"{len(seqs)} sequences but {len(routes)} routes")
    with _routed(engine, routes, [len(p) + len(c) for p, c in seqs]) as lora, torch.inference_mode():
        sums, _ = completion_logprobs(engine.runner, seqs, lora)
    return sums.tolist()
