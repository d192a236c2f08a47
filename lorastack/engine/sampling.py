"""Decoding settings and per-row token selection (greedy, temperature, top-k, top-p)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import math

import torch

from ..errors import EngineError, LorastackError
from .constrain import Constraint

Messages = list[dict[str, str]]

# Below these a temperature or top_p leaves one candidate token (or, in float32, none:
# 1e-300 rounds to 0 and the division or the nucleus mask then produces NaN/empty rows), so
# they mean greedy decoding.
MIN_TEMPERATURE = 1e-4
MIN_TOP_P = 1e-6
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts
MAX_TOP_LOGPROBS = 20  # alternatives per token a request may ask for (vLLM's default cap)


@dataclass(frozen=True)
class Sampling:
    """Decoding settings; temperature 0 means greedy."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # benchmarks: always generate max_tokens
    constraint: Constraint | None = None  # structured output (engine/constrain.py)
    # None: no logprobs recorded (the default costs nothing); 0: each generated token's own
    # logprob; N: also the N most likely alternatives (see `token_logprobs`).
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise LorastackError(f"logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {self.logprobs}")
        for field_name in ("temperature", "top_p"):
            if not math.isfinite(getattr(self, field_name)):
                raise LorastackError(f"{field_name} must be a finite number, got {getattr(self, field_name)}")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            raise LorastackError(f"seed must fit in 64 bits ({SEED_MIN} to {SEED_MAX}), got {self.seed}")
        if self.max_tokens < 1:
            raise LorastackError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise LorastackError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise LorastackError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise LorastackError(f"top_k must be >= 0, got {self.top_k}")
        self._check_constraint()
        if self.temperature < MIN_TEMPERATURE or self.top_p < MIN_TOP_P or self.top_k == 1:
            object.__setattr__(self, "temperature", 0.0)  # degenerate settings are greedy decoding

    def _check_constraint(self) -> None:
        """A constrained output ends only where its grammar allows EOS; a stop string could
        cut it mid-value and ignore_eos could run past its end, so neither combines with it."""
        if self.constraint is not None and self.stop:
            raise LorastackError("stop cannot be combined with structured output (a stop string could cut the JSON); remove 'stop'")
        if self.constraint is not None and self.ignore_eos:
            raise LorastackError("ignore_eos cannot be combined with structured output (the JSON ends with EOS); remove 'ignore_eos'")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS or stop string) or "length"


class SamplingError(EngineError):
    """One row's logits cannot be decoded (NaN: a broken adapter); a server fault, not the client's."""


def pick_tokens(logits: torch.Tensor, samplings: list[Sampling],
                generators: list[torch.Generator | None]) -> list[int | Exception]:
    """Next token per row; greedy rows share one argmax, sampled rows use their own RNG.

    A row that cannot be sampled gets its exception in place of a token, so the caller
    fails that request alone and every other row of the batch goes on.
    """
    picks: list[int | Exception] = list(logits.argmax(-1).tolist())
    broken = torch.isnan(logits).any(-1).tolist()  # argmax would silently pick a NaN
    for i, s in enumerate(samplings):
        if broken[i]:
            picks[i] = SamplingError("the model produced NaN logits for this request (does an adapter on its route hold NaN weights?)")
        elif s.temperature > 0:
            try:
                picks[i] = _sample(logits[i].float(), s, generators[i])
            except Exception as e:  # noqa: BLE001 - isolated to this row by design
                picks[i] = e
    return picks


def _sample(logits: torch.Tensor, s: Sampling, gen: torch.Generator | None) -> int:
    if not bool(torch.isfinite(logits).any()):
        raise SamplingError("the model produced no finite logits for this request (is an adapter's weight NaN/Inf?)")
    logits = torch.nan_to_num(logits, nan=float("-inf")).clamp(max=1e30) / s.temperature
    if s.top_k and s.top_k < logits.shape[-1]:
        kth = torch.topk(logits, s.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    if s.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, -1) - sorted_p < s.top_p
        keep[0] = True  # the top token always stays, whatever rounding did to top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=gen))


# ------------------------------------------------------------------ logprobs
@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability and the `top` most likely alternatives at its position."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int], top: int) -> list[TokenLogprob]:
    """Log-probabilities of `tokens` (one per row of `logits [rows, vocab]`) and each row's top alternatives.

    The distribution is the model's raw one, `log_softmax(logits)`, before temperature, top-k
    and top-p, as vLLM reports by default: the numbers then mean the same thing whatever
    sampling settings a request used, and a greedy or scoring request (lm-eval) gets exactly
    the model's log-likelihoods.
    """
    if not tokens:
        return []
    lp = torch.log_softmax(logits.float(), -1)
    chosen = lp.gather(-1, torch.tensor(list(tokens)).view(-1, 1)).squeeze(-1).tolist()
    if top <= 0:
        return [TokenLogprob(t, v) for t, v in zip(tokens, chosen)]
    values, ids = lp.topk(min(top, lp.shape[-1]), -1)
    return [TokenLogprob(t, v, tuple(zip(i, w))) for t, v, i, w in zip(tokens, chosen, ids.tolist(), values.tolist())]
