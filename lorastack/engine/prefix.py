"""Prefix cache: reuse the KV of a shared prompt start (template + instruction) per route.

Prompts to one expert mostly share their opening tokens (the chat template and the task's
instruction), and prefill is compute-bound on a CPU, so recomputing that prefix for every
request wastes most of the prefill time. Entries are whole prompts' K/V keyed by route;
a new prompt reuses the longest common token prefix with any entry of its route (at token
granularity, unlike vLLM's fixed blocks, because the shared part is often under 16 tokens).
The K/V depend on the route because LoRA changes the k/v projections.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass
class PrefixEntry:
    ids: tuple[int, ...]
    k: list[torch.Tensor]  # per layer [kv_heads, len, head_dim]
    v: list[torch.Tensor]


def common_prefix(a: tuple[int, ...], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixCache:
    """LRU of prompt K/V per route. Only a prompt's first `max_entry_tokens` are kept: the
    shared part (template + instruction) is at the start, and without this bound 64 long
    prompts from one client would pin gigabytes of K/V (SmolLM2-135M: ~23 KB a token)."""

    def __init__(self, max_entries: int = 64, per_route: int = 8, min_tokens: int = 4, max_entry_tokens: int = 512) -> None:
        self.max_entries = max_entries
        self.max_entry_tokens = max_entry_tokens
        self.per_route = per_route
        self.min_tokens = min_tokens
        self.entries: OrderedDict[tuple[str, tuple[int, ...]], PrefixEntry] = OrderedDict()
        self.hits = 0
        self.reused_tokens = 0
        self.lookups = 0

    def lookup(self, route: str, ids: list[int]) -> tuple[PrefixEntry | None, int]:
        """The entry sharing the longest prefix with `ids` (at most len-1 tokens, so at least
        one token is left to compute the next-token logits), and that length."""
        self.lookups += 1
        best, best_len = None, 0
        for (r, _), entry in reversed(self.entries.items()):
            if r != route:
                continue
            n = min(common_prefix(entry.ids, ids), len(ids) - 1)
            if n > best_len:
                best, best_len = entry, n
        if best is None or best_len < self.min_tokens:
            return None, 0
        self.entries.move_to_end((route, best.ids))
        self.hits += 1
        self.reused_tokens += best_len
        return best, best_len

    def store(self, route: str, ids: list[int], k: list[torch.Tensor], v: list[torch.Tensor]) -> None:
        key = (route, tuple(ids))
        if key in self.entries:
            self.entries.move_to_end(key)
            return
        same = [e for e in self.entries if e[0] == route]
        if len(same) >= self.per_route:
            del self.entries[same[0]]
        self.entries[key] = PrefixEntry(tuple(ids), k, v)
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)

    def forget(self, adapter: str) -> None:
        """Drop entries of routes that use `adapter` (it was replaced or removed)."""
        for key in [k for k in self.entries if adapter in {p.split(":")[0] for p in k[0].split("+")}]:
            del self.entries[key]

    def clear(self) -> None:
        self.entries.clear()
