"""Decoding settings and per-row token selection (greedy, temperature, top-k, top-p)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LorastackError

Messages = list[dict[str, str]]


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

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise LorastackError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise LorastackError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise LorastackError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise LorastackError(f"top_k must be >= 0, got {self.top_k}")


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS or stop string) or "length"


def pick_tokens(logits: torch.Tensor, samplings: list[Sampling], generators: list[torch.Generator | None]) -> list[int]:
    """Next token per row; greedy rows share one argmax, sampled rows use their own RNG."""
    greedy = logits.argmax(-1).tolist()
    for i, s in enumerate(samplings):
        if s.temperature > 0:
            greedy[i] = _sample(logits[i].float(), s, generators[i])
    return greedy


def _sample(logits: torch.Tensor, s: Sampling, gen: torch.Generator | None) -> int:
    logits = logits / s.temperature
    if s.top_k and s.top_k < logits.shape[-1]:
        kth = torch.topk(logits, s.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    if s.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, -1) - sorted_p < s.top_p  # always keeps the top token
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=gen))
