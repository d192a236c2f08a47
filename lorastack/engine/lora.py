"""Multi-adapter LoRA math for inference: the only place LoRA deltas are applied at serving time.

Each fused base projection (q|k|v, gate|up, o, down) gets a *bank*: stacked
`A [slots, parts*r, in]` (the parts' A side by side: they read the same input) and, per
part, `B [slots, r, out_part]` (PEFT's scaling folded in). A batch row carries its slots.
The base projection runs once for the whole batch; the deltas are added in place with
`addmm_` into each part's columns of the base output, so there is no separate add and no
block-diagonal B full of zeros (~50% extra LoRA bytes per step for rank-16 all-linear
adapters on SmolLM2-135M, by counting).

Rows of a batch on *different* adapters: the used slots' A are concatenated part-major
(`[parts*U*r, in]`), `x @ A_cat^T` is masked so each row keeps only its own slots' rank
blocks, and one `addmm_` per part adds the deltas. On a CPU this beats per-row gathered
`bmm` (Punica's BGMV): two dense GEMMs, no per-row weight copies, fewest ops (measured in
bench/engine.py; decode here is bound by per-op cost and bytes, not FLOPs). The
concatenation is cached while the set of used slots does not change. Slot 0 is all zeros.

In bfloat16, decode steps and prefills whose per-adapter token runs are short use the
compiled kernel of engine/native.py instead when it is available: one call per projection
in which each row reads only its own adapters (the masked concatenation multiplies every
row by every used adapter and costs 2-4 torch ops). Long prefills and float32 stay on the
torch path above.

A weighted mixture `a:0.7+b:0.3` needs no slot of its own: its row's mask holds 0.7 on
a's rank block and 0.3 on b's, which is exactly the weighted sum of the two deltas (PEFT's
`cat` combination) with no merge into the base and no extra memory.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

from ..adapter import Adapter, LoraPairs, read_while_replaced
from ..errors import LorastackError, NotFoundError
from ..route import Route
from .native import Kernels

# Adapter tensor I/O (PEFT's key pattern, alpha/rslora scaling) lives in lorastack.adapter;
# the engine keeps its historical name for the in-memory pairs.
AdapterWeights = LoraPairs


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
        native: "Kernels | None" = None,
        int8: bool = False,
    ) -> None:
        """`int8` (int8 matmuls, needs `native`): the compiled LoRA kernel reads int8 copies of
        the banks (a scale per rank row), half the bytes that rows on different adapters stream
        a step; the torch paths (long prefill runs) keep the bf16 banks."""
        if max_resident < 1:
            raise LorastackError("max_resident must be >= 1")
        # A group is one fused base projection (e.g. q|k|v) and the modules it is made of,
        # `[(module, in, out)]`; its A bank holds each part's rank block side by side, and
        # each part has its own B bank.
        self.groups = groups
        self.part_of = {m: (g, i) for g, parts in groups.items() for i, (m, _, _) in enumerate(parts)}
        self.dtype = dtype
        self.resolve = resolve
        self.max_resident = max_resident
        self.max_cached = max(max_cached, max_resident)
        self.rank = 0
        self.A: dict[str, torch.Tensor] = {}  # group -> [slots, parts*rank, in]
        self.B: dict[str, list[torch.Tensor]] = {}  # group -> per part [slots, rank, out_part]
        self.version = 0  # bumped whenever slot contents change (invalidates concatenations)
        self._concat: dict[str, tuple[tuple, torch.Tensor, list[torch.Tensor]]] = {}
        self._fp32: dict[tuple[str, int], tuple[int, torch.Tensor, list[torch.Tensor]]] = {}
        self.slots: OrderedDict[str, int] = OrderedDict()  # route key -> slot, in LRU order
        self.cache: OrderedDict[str, AdapterWeights] = OrderedDict()
        # Pins are per slot, not per name: a request keeps the exact weights it started with
        # even if its adapter is replaced or removed meanwhile (the slot turns "stale" and is
        # freed when its last row finishes).
        self.pinned: dict[int, int] = {}  # slot -> number of in-flight rows using it
        self.stale: set[int] = set()
        self.load_seconds: list[float] = []
        self.native = native  # compiled decode kernels (bf16), or None
        self.native_args: dict[str, tuple] = {}  # group -> pointers for the native kernel
        self.int8 = int8 and native is not None
        self.A8: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # group -> (int8 A, scales [slots, parts*rank])
        self.B8: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # group -> per part (int8 B, scales [slots, rank])

    # ------------------------------------------------------------ adapters
    def _weights(self, name: str) -> AdapterWeights:
        if name in self.cache:
            self.cache.move_to_end(name)
            return self.cache[name]
        import time

        t0 = time.perf_counter()
        w = read_while_replaced(lambda: self.resolve(name), lambda a: AdapterWeights.load(a, self.dtype),
                                lambda: NotFoundError(f"unknown adapter {name!r} (it was just removed)"))
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
            fin = parts[0][1]
            a = torch.zeros(n, len(parts) * new_rank, fin, dtype=self.dtype)
            bs = [torch.zeros(n, new_rank, o, dtype=self.dtype) for _, _, o in parts]
            if group in self.A:
                for i in range(len(parts)):
                    a[:, i * new_rank : i * new_rank + old] = self.A[group][:, i * old : (i + 1) * old]
                    bs[i][:, :old] = self.B[group][i]
            self.A[group], self.B[group] = a, bs
            if self.int8:
                self.A8[group] = (torch.zeros(a.shape, dtype=torch.int8), torch.zeros(a.shape[:2]))
                self.B8[group] = [(torch.zeros(b.shape, dtype=torch.int8), torch.zeros(b.shape[:2])) for b in bs]
                self._quantize(group, slice(None))
                self.native_args[group] = self.native.group_args_i8(self.A8[group][0], self.A8[group][1],
                                                                    [b for b, _ in self.B8[group]], [s for _, s in self.B8[group]])
            elif self.native is not None:
                self.native_args[group] = self.native.group_args(a, bs)
        self.rank = new_rank
        self.version += 1

    def _quantize(self, group: str, slot: int | slice) -> None:
        """The int8 copies of one slot's (or a slice of slots') A and B for `group`: symmetric, a
        scale per rank row."""
        for w, (q, scale) in [(self.A[group], self.A8[group])] + list(zip(self.B[group], self.B8[group])):
            v = w[slot].float()
            s = v.abs().amax(-1) / 127
            scale[slot] = s
            q[slot] = torch.round(v / s.clamp(min=1e-30)[..., None]).clamp(-127, 127).to(torch.int8)

    def _free(self, key: str) -> None:
        slot = self.slots.pop(key)
        if self.pinned.get(slot):
            self.stale.add(slot)  # still in use: zeroed when its last row unpins it
        else:
            self._zero(slot)

    def _zero(self, slot: int) -> None:
        for group in self.A:
            self.A[group][slot].zero_()
            for b in self.B[group]:
                b[slot].zero_()
            if self.int8:
                self._quantize(group, slot)
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
        written = set()
        for module, (a, b) in w.modules.items():
            group, i = self.part_of[module]
            r = a.shape[0]
            self.A[group][slot, i * R : i * R + r] = a
            self.B[group][i][slot, :r] = b.t()
            written.add(group)
        if self.int8:  # a free slot is all zeros in both copies (_zero), so only these groups change
            for group in written:
                self._quantize(group, slot)
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

    def fp32(self, group: str, slot: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """float32 copies of one slot's A and per-part B for `group`, cached until slots change."""
        key = (group, slot)
        hit = self._fp32.get(key)
        if hit is not None and hit[0] == self.version:
            return hit[1], hit[2]
        a, bs = self.A[group][slot].float(), [b[slot].float() for b in self.B[group]]
        self._fp32[key] = (self.version, a, bs)
        return a, bs

    def concat(self, group: str, used: tuple[int, ...]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`A_cat [parts*U*r, in]` (part-major: part, then slot, then rank) and per part
        `B_cat [U*r, out_part]` for the used slots, cached per group."""
        key = (used, self.version)
        hit = self._concat.get(group)
        if hit is not None and hit[0] == key:
            return hit[1], hit[2]
        idx = torch.tensor(used)
        parts = len(self.B[group])
        a = self.A[group].index_select(0, idx)  # [U, parts*r, in]
        a = a.view(len(used), parts, -1, a.shape[-1]).transpose(0, 1).reshape(-1, a.shape[-1])
        bs = [b.index_select(0, idx).reshape(-1, b.shape[-1]) for b in self.B[group]]
        self._concat[group] = (key, a, bs)
        return a, bs


# Picked by timing prefills (ad hoc): the kernel matched torch at 256 tokens on one adapter and
# beat it for 8 adapters x ~30 tokens, where torch's per-segment GEMMs are mostly fixed cost.
NATIVE_PREFILL_TOKENS_PER_RUN = 128
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
        self._masks: dict[tuple[int, int], torch.Tensor] = {}
        self._native_call: tuple | None = None  # the kernel's row tables, built on first use
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

    def _mask(self, rank: int, parts: int) -> torch.Tensor:
        """Per row (or per packed token): the weight of each used slot on its rank block,
        laid out like `LoraBank.concat`'s A (part, slot, rank)."""
        m = self._masks.get((rank, parts))
        if m is None:
            pos = {s: i for i, s in enumerate(self.used)}
            w = torch.zeros(len(self.rows), len(self.used))
            for row, entries in enumerate(self.rows):
                for s, wt in entries:
                    w[row, pos[s]] = wt
            m = w[:, None, :, None].expand(-1, parts, -1, rank).reshape(len(self.rows), -1).to(self.bank.dtype)
            if self.tokens is not None:
                m = m.repeat_interleave(torch.tensor(self.tokens), dim=0)
            self._masks[(rank, parts)] = m
        return m

    def _native_rows(self) -> tuple:
        """The kernel's row tables: per row its slots `[n, K]` and weights `[n, K]` (weight 0
        pads short rows), prepared once per batch."""
        if self._native_call is None:
            k = max(1, max(len(r) for r in self.rows))
            slots = torch.zeros(len(self.rows), k, dtype=torch.int64)
            weights = torch.zeros(len(self.rows), k, dtype=torch.float32)
            for i, entries in enumerate(self.rows):
                for j, (s, w) in enumerate(entries):
                    slots[i, j], weights[i, j] = s, w
            if self.tokens is not None:  # packed prefill: every token carries its row's slots
                counts = torch.tensor(self.tokens)
                slots, weights = slots.repeat_interleave(counts, 0), weights.repeat_interleave(counts, 0)
            self._native_call = self.bank.native.rows_args(slots, weights)
        return self._native_call

    def _use_native(self, x: torch.Tensor) -> bool:
        """Decode always; prefill while the adapters' token runs are short, where torch's
        per-segment GEMMs are mostly fixed cost (the kernel does not block for long runs)."""
        if self.bank.native is None or x.dtype != torch.bfloat16:
            return False
        if self.tokens is None:
            return True
        runs = max(1, len(self.segments) if self.segments is not None else len(self.used))
        return sum(self.tokens) <= NATIVE_PREFILL_TOKENS_PER_RUN * runs

    def add_delta(self, group: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Add every row's LoRA delta for `group` to the base output `y [..., out]` in place
        (x is `[..., in]`); returns y."""
        if not self.used or group not in self.bank.A:
            return y
        x2, y2 = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
        if self._use_native(x):
            # One compiled call per projection; each row reads only its own adapters.
            self.bank.native.lora_raw(x2.contiguous(), y2, self.bank.native_args[group], self.bank.rank, self._native_rows())
            return y
        if self.uniform is not None:
            a, bs = self.bank.A[group][self.uniform], [b[self.uniform] for b in self.bank.B[group]]
            if x2.shape[0] <= SMALL_ROWS and x.dtype == torch.bfloat16:
                # One or two rows: bf16 GEMMs this small cost ~40 us a pair in fixed overhead
                # on the EPYC, fp32 ones ~12 us (measured), so tiny decodes use fp32 copies.
                a, bs = self.bank.fp32(group, self.uniform)
                t = x2.float() @ a.t()
                out = y2.float()
                _add_parts(out, t, bs)
                y2.copy_(out)
                return y
            _add_parts(y2, x2 @ a.t(), bs)
            return y
        if self.segments is not None:
            for s, lo, hi in self.segments:
                a, bs = self.bank.A[group][s], [b[s] for b in self.bank.B[group]]
                _add_parts(y2[lo:hi], x2[lo:hi] @ a.t(), bs)
            return y
        a, bs = self.bank.concat(group, self.used)
        t = (x2 @ a.t()) * self._mask(bs[0].shape[0] // len(self.used), len(bs))
        _add_parts(y2, t, bs)
        return y


def _add_parts(y: torch.Tensor, t: torch.Tensor, bs: list[torch.Tensor]) -> None:
    """`y[:, part's columns] += t[:, part's rank block] @ B_part` for each part, in place."""
    col = 0
    width = t.shape[-1] // len(bs)
    for i, b in enumerate(bs):
        y[:, col : col + b.shape[-1]].addmm_(t[:, i * width : (i + 1) * width], b)
        col += b.shape[-1]
