"""Multi-adapter LoRA math for inference: the only place LoRA deltas are applied at serving time.

Each targeted Linear gets a *bank*: stacked `A [slots, r, in]` and `Bt [slots, r, out]`
tensors (PEFT's scaling folded into B). A batch row carries a slot index. The base
projection runs once for the whole batch; the LoRA part runs once per *distinct* adapter
set in the batch: the used slots' A and B are concatenated along the rank
(`[U*r, in]`, `[U*r, out]`), `x @ A_cat^T` is masked so each row keeps only its own slot's
rank block, and one more matmul adds the deltas. On a CPU this beats per-row gathered
`bmm` (Punica's BGMV) because it is two dense GEMMs with no per-row weight copies; the
concatenation is cached while the set of used slots does not change (measured in
bench/engine.py). Slot 0 is all zeros: the bare base.

A weighted mixture `a:0.7+b:0.3` needs no slot of its own: its row's mask holds 0.7 on
a's rank block and 0.3 on b's, which is exactly the weighted sum of the two deltas (PEFT's
`cat` combination) with no merge into the base and no extra memory.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..adapter import Adapter
from ..errors import LorastackError
from ..route import Route

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$")


@dataclass
class AdapterWeights:
    """One adapter in memory: `{module: (A [r, in], B_scaled [out, r])}`."""

    name: str
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def rank(self) -> int:
        return max(a.shape[0] for a, _ in self.modules.values())

    @classmethod
    def load(cls, adapter: Adapter, dtype: torch.dtype) -> "AdapterWeights":
        cfg = adapter.config()
        alpha = float(cfg.get("lora_alpha", cfg["r"]))
        alpha_pattern = cfg.get("alpha_pattern") or {}
        use_rslora = bool(cfg.get("use_rslora", False))
        if cfg.get("use_dora"):
            raise LorastackError(f"adapter {adapter.name!r} uses DoRA, which the engine does not support")
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in adapter.weights().items():
            m = _KEY.match(key)
            if not m:
                raise LorastackError(f"adapter {adapter.name!r}: unsupported tensor {key!r} (only Linear LoRA)")
            parts.setdefault(m["module"], {})[m["part"]] = t
        modules = {}
        for module, ab in parts.items():
            a, b = ab["A"], ab["B"]
            rank = a.shape[0]  # the tensor's own rank already reflects any rank_pattern
            mod_alpha = _pattern(alpha_pattern, module, alpha)
            scale = mod_alpha / (rank**0.5 if use_rslora else rank)
            modules[module] = (a.to(torch.float32).to(dtype).contiguous(), (b.to(torch.float32) * scale).to(dtype).contiguous())
        return cls(adapter.name, modules)


def _pattern(pattern: dict[str, float], module: str, default: float) -> float:
    for key, value in pattern.items():
        if module == key or module.endswith("." + key) or re.search(key, module):
            return value
    return default


class LoraBank:
    """Resident adapter slots for every targeted module, with LRU eviction.

    `resolve(name)` opens an adapter from the library; evicted adapters stay cached in CPU
    RAM (`max_cached`) so reloading them costs a copy, not a disk read.
    """

    def __init__(
        self,
        groups: dict[str, list[tuple[str, int, int]]],
        dtype: torch.dtype,
        resolve: Callable[[str], Adapter],
        max_resident: int = 16,
        max_cached: int = 64,
    ) -> None:
        if max_resident < 1:
            raise LorastackError("max_resident must be >= 1")
        # A group is one fused base projection (e.g. q|k|v) and the modules it is made of,
        # `[(module, in, out)]`; its bank holds each part's rank block side by side, with B
        # block-diagonal, so one matmul pair serves all parts (fewer ops per decode step).
        self.groups = groups
        self.part_of = {m: (g, i) for g, parts in groups.items() for i, (m, _, _) in enumerate(parts)}
        self.dtype = dtype
        self.resolve = resolve
        self.max_resident = max_resident
        self.max_cached = max(max_cached, max_resident)
        self.rank = 0
        self.A: dict[str, torch.Tensor] = {}
        self.Bt: dict[str, torch.Tensor] = {}
        self.version = 0  # bumped whenever slot contents change (invalidates concatenations)
        self._concat: dict[str, tuple[tuple, torch.Tensor, torch.Tensor]] = {}
        self._fp32: dict[tuple[str, int], tuple[int, torch.Tensor, torch.Tensor]] = {}
        self.slots: OrderedDict[str, int] = OrderedDict()  # route key -> slot, in LRU order
        self.cache: OrderedDict[str, AdapterWeights] = OrderedDict()
        # Pins are per slot, not per name: a request keeps the exact weights it started with
        # even if its adapter is replaced or removed meanwhile (the slot turns "stale" and is
        # freed when its last row finishes).
        self.pinned: dict[int, int] = {}  # slot -> number of in-flight rows using it
        self.stale: set[int] = set()
        self.load_seconds: list[float] = []

    # ------------------------------------------------------------ adapters
    def _weights(self, name: str) -> AdapterWeights:
        if name in self.cache:
            self.cache.move_to_end(name)
            return self.cache[name]
        import time

        t0 = time.perf_counter()
        w = AdapterWeights.load(self.resolve(name), self.dtype)
        unknown = [m for m in w.modules if m not in self.part_of]
        if unknown:
            raise LorastackError(f"adapter {name!r} targets {unknown[0]!r}, which the base does not have")
        self.load_seconds.append(time.perf_counter() - t0)
        self.cache[name] = w
        while len(self.cache) > self.max_cached:
            self.cache.popitem(last=False)
        return w

    def forget(self, name: str) -> None:
        """Drop an adapter (removed or replaced in the library) from RAM and from its slot."""
        self.cache.pop(name, None)
        if name in self.slots:
            self._free(name)

    # ------------------------------------------------------------ slots
    def _ensure_rank(self, rank: int) -> None:
        if rank <= self.rank and self.A:
            return
        new_rank, old = max(rank, self.rank, 8), self.rank
        n = self.max_resident + 1
        for group, parts in self.groups.items():
            fin, fout = parts[0][1], sum(o for _, _, o in parts)
            a = torch.zeros(n, len(parts) * new_rank, fin, dtype=self.dtype)
            b = torch.zeros(n, len(parts) * new_rank, fout, dtype=self.dtype)
            if group in self.A:
                for i in range(len(parts)):
                    a[:, i * new_rank : i * new_rank + old] = self.A[group][:, i * old : (i + 1) * old]
                    b[:, i * new_rank : i * new_rank + old] = self.Bt[group][:, i * old : (i + 1) * old]
            self.A[group], self.Bt[group] = a, b
        self.rank = new_rank
        self.version += 1

    def _free(self, key: str) -> None:
        slot = self.slots.pop(key)
        if self.pinned.get(slot):
            self.stale.add(slot)  # still in use: zeroed when its last row unpins it
        else:
            self._zero(slot)

    def _zero(self, slot: int) -> None:
        for module in self.A:
            self.A[module][slot].zero_()
            self.Bt[module][slot].zero_()
        self.version += 1

    def slots_for(self, route: Route) -> tuple[tuple[int, float], ...]:
        """`(slot, weight)` for each adapter of `route`, loading adapters as needed; () for base."""
        if len(route.entries) > self.max_resident:
            raise LorastackError(f"route {route} has {len(route.entries)} adapters; at most {self.max_resident} can be resident")
        return tuple((self.slot_for(name, keep=route.names), w) for name, w in route.entries)

    def slot_for(self, name: str, keep: list[str] = ()) -> int:
        """The slot holding adapter `name`, loading it (and evicting the least recently used
        adapter not in use) if needed."""
        if name in self.slots:
            self.slots.move_to_end(name)
            return self.slots[name]
        w = self._weights(name)
        self._ensure_rank(w.rank)
        used = set(self.slots.values()) | set(self.pinned) | self.stale
        free = [s for s in range(1, self.max_resident + 1) if s not in used]
        if not free:
            victim = next((k for k, s in self.slots.items() if not self.pinned.get(s) and k not in keep), None)
            if victim is None:
                raise LorastackError(f"all {self.max_resident} adapter slots are in use by running requests")
            free = [self.slots[victim]]
            self._free(victim)
        slot = free[0]
        R = self.rank
        for module, (a, b) in w.modules.items():
            group, i = self.part_of[module]
            r = a.shape[0]
            off = sum(o for _, _, o in self.groups[group][:i])
            self.A[group][slot, i * R : i * R + r] = a
            self.Bt[group][slot, i * R : i * R + r, off : off + b.shape[0]] = b.t()
        self.slots[name] = slot
        self.version += 1
        return slot

    def pin(self, slots: "RowSlots") -> None:
        for slot, _ in slots:
            self.pinned[slot] = self.pinned.get(slot, 0) + 1

    def unpin(self, slots: "RowSlots") -> None:
        for slot, _ in slots:
            if slot in self.pinned:
                self.pinned[slot] -= 1
                if self.pinned[slot] <= 0:
                    del self.pinned[slot]
                    if slot in self.stale:
                        self.stale.discard(slot)
                        self._zero(slot)

    def resident(self) -> list[str]:
        return list(self.slots)

    def fp32(self, module: str, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 copies of one slot's `A` and `Bt` for `module`, cached until slots change."""
        key = (module, slot)
        hit = self._fp32.get(key)
        if hit is not None and hit[0] == self.version:
            return hit[1], hit[2]
        a, b = self.A[module][slot].float(), self.Bt[module][slot].float()
        self._fp32[key] = (self.version, a, b)
        return a, b

    def concat(self, module: str, used: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """`A_cat [U*r, in]` and `Bt_cat [U*r, out]` for the used slots, cached per module."""
        key = (used, self.version)
        hit = self._concat.get(module)
        if hit is not None and hit[0] == key:
            return hit[1], hit[2]
        idx = torch.tensor(used)
        a = self.A[module].index_select(0, idx).reshape(-1, self.A[module].shape[-1])
        b = self.Bt[module].index_select(0, idx).reshape(-1, self.Bt[module].shape[-1])
        self._concat[module] = (key, a, b)
        return a, b


SMALL_ROWS = 2  # at most this many rows: LoRA deltas of a uniform batch run in fp32 (see delta)
RowSlots = tuple[tuple[int, float], ...]  # one row's adapters: (slot, weight); () is the base


class LoraBatch:
    """The per-row routing of one forward pass: which slots (and weights) each row uses."""

    def __init__(self, bank: LoraBank, rows: list[RowSlots], tokens: list[int] | None = None) -> None:
        """With `tokens` (tokens per row), x is a packed sequence `[1, sum(tokens), in]`
        (the engine's prefill, rows sorted by slots)."""
        self.bank = bank
        self.rows = rows
        self.tokens = tokens
        self.used = tuple(sorted({s for r in rows for s, _ in r}))
        self.uniform: int | None = None
        self.segments: list[tuple[int, int, int]] | None = None
        self._masks: dict[int, torch.Tensor] = {}
        plain = all(len(r) <= 1 and all(w == 1.0 for _, w in r) for r in rows)
        if self.used and plain and all(r == rows[0] for r in rows):
            self.uniform = self.used[0]
        elif self.used and plain and tokens is not None and rows == sorted(rows):
            # Packed tokens sorted by slot: each adapter covers one contiguous span, so its
            # delta is a plain matmul pair on a view (SGMV-style), with no wasted rank columns.
            self.segments = []
            pos = 0
            for r, t in zip(rows, tokens):
                s = r[0][0] if r else 0
                if s and self.segments and self.segments[-1][0] == s and self.segments[-1][2] == pos:
                    self.segments[-1] = (s, self.segments[-1][1], pos + t)
                elif s:
                    self.segments.append((s, pos, pos + t))
                pos += t

    def _mask(self, width: int) -> torch.Tensor:
        """Per row (or per packed token): the weight of each used slot on its rank block."""
        m = self._masks.get(width)
        if m is None:
            pos = {s: i for i, s in enumerate(self.used)}
            m = torch.zeros(len(self.rows), len(self.used) * width, dtype=self.bank.dtype)
            for row, entries in enumerate(self.rows):
                for s, w in entries:
                    m[row, pos[s] * width : (pos[s] + 1) * width] = w
            if self.tokens is not None:
                m = m.repeat_interleave(torch.tensor(self.tokens), dim=0)[None]  # [1, total, W]
            else:
                m = m[:, None, :]  # [n, 1, W]
            self._masks[width] = m
        return m

    def delta(self, module: str, x: torch.Tensor) -> torch.Tensor | None:
        """LoRA delta for `x [n, t, in]`, or None when no row uses an adapter on `module`."""
        if not self.used or module not in self.bank.A:
            return None
        if self.uniform is not None:
            rows = x.numel() // x.shape[-1]
            if rows <= SMALL_ROWS and x.dtype == torch.bfloat16:
                # One or two rows: bf16 GEMMs this small cost ~40 us a pair in fixed overhead
                # on the EPYC, fp32 ones ~12 us (measured), so tiny decodes use fp32 copies.
                a, b = self.bank.fp32(module, self.uniform)
                return ((x.float() @ a.t()) @ b).to(x.dtype)
            return (x @ self.bank.A[module][self.uniform].t()) @ self.bank.Bt[module][self.uniform]
        if self.segments is not None:
            out = torch.zeros(*x.shape[:-1], self.bank.Bt[module].shape[-1], dtype=x.dtype)
            for s, lo, hi in self.segments:
                out[:, lo:hi] = (x[:, lo:hi] @ self.bank.A[module][s].t()) @ self.bank.Bt[module][s]
            return out
        a, b = self.bank.concat(module, self.used)
        return ((x @ a.t()) * self._mask(self.bank.A[module].shape[1])) @ b
