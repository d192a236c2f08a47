"""KV cache for continuous batching: one slot per running request, compacted.

Every running request owns a row; rows grow independently to the right (no left padding,
no recomputation of the prompt), and a per-row length masks the unused tail. Rows are
kept dense in `[0, n)`: when a request finishes, the last row is moved into its place (one
row copy), so decode attention always reads a contiguous view `[:n, :, :T]` and never a
gathered copy. Capacity doubles on demand (time and batch), so memory tracks the load.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, rows: int = 4, length: int = 256) -> None:
        self.n_layers, self.kv_heads, self.head_dim, self.dtype = n_layers, kv_heads, head_dim, dtype
        self.k = [torch.zeros(rows, kv_heads, length, head_dim, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(rows, kv_heads, length, head_dim, dtype=dtype) for _ in range(n_layers)]
        self.lengths = torch.zeros(rows, dtype=torch.long)
        self.n = 0  # rows in use: [0, n)

    @property
    def capacity(self) -> tuple[int, int]:
        return self.k[0].shape[0], self.k[0].shape[2]

    def reserve(self, rows: int, length: int) -> None:
        """Grow (by doubling) so that `rows` rows of `length` positions fit."""
        cap_rows, cap_len = self.capacity
        if rows <= cap_rows and length <= cap_len:
            return
        new_rows, new_len = cap_rows, cap_len
        while new_rows < rows:
            new_rows *= 2
        while new_len < length:
            new_len *= 2
        for store in (self.k, self.v):
            for i, t in enumerate(store):
                grown = torch.zeros(new_rows, self.kv_heads, new_len, self.head_dim, dtype=self.dtype)
                grown[: self.n, :, :cap_len] = t[: self.n]
                store[i] = grown
        lengths = torch.zeros(new_rows, dtype=torch.long)
        lengths[: self.n] = self.lengths[: self.n]
        self.lengths = lengths

    def add_rows(self, count: int, max_length: int) -> int:
        """Claim `count` new rows at the end; returns the first new row index."""
        self.reserve(self.n + count, max_length)
        first = self.n
        self.lengths[first : first + count] = 0
        self.n += count
        return first

    def remove_row(self, row: int) -> int | None:
        """Free `row`; the last row moves into it. Returns the moved row's old index, if any."""
        last = self.n - 1
        moved = None
        if row != last:
            ln = int(self.lengths[last])
            for store in (self.k, self.v):
                for t in store:
                    t[row, :, :ln] = t[last, :, :ln]
            self.lengths[row] = self.lengths[last]
            moved = last
        self.lengths[last] = 0
        self.n -= 1
        return moved

    def truncate(self, n: int) -> None:
        """Drop rows `[n, self.n)` (rows just added for a prefill that failed)."""
        self.lengths[n : self.n] = 0
        self.n = min(self.n, n)

    def trim(self) -> None:
        """Release memory when idle (all rows gone) by shrinking to the initial size."""
        if self.n == 0 and self.capacity[1] > 1024:
            self.__init__(self.n_layers, self.kv_heads, self.head_dim, self.dtype)
