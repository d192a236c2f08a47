"""The quantized blocks of a GGUF base, kept quantized for decode GEMVs.

The embedded base is a GGUF whose linear layers are Q4_1 and whose tied embedding / LM head
is Q8_0. `Base.load` dequantizes it to bf16 (training, prefill and the reference path use
that); decode, bound by the bytes it streams, reads these blocks instead (96 MB a token
instead of 269 MB) through kernels.c, which rebuilds each block's weights exactly as the
dequantization did, so the output does not change (tests/test_native.py).

Only what the kernels read is kept: Q4_1 and Q8_0 tensors of Llama-family layers. Every
other GGUF type stays on the dequantized bf16 path. Q8_0 stays in the file's layout; Q4_1 rows
are repacked once (`Blocks.for_kernels`: same bytes a row, cheaper for the kernel to decode).
"""

from __future__ import annotations

import functools
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..base import file_digest
from ..paths import cache_dir

log = logging.getLogger("lorastack.gguf")
BLOCK_BYTES = {"Q4_1": 20, "Q4_1R": 20, "Q8_0": 34}  # 32 weights a block
# GGUF (llama.cpp) tensor names -> Hugging Face parameter names for Llama-family layers.
_LAYER = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj"}
_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight"}


@dataclass(frozen=True)
class Blocks:
    """One weight matrix `[out, in]` as GGUF blocks: `data` is uint8 `[out, in / 32 * bytes]`.

    `kind` is the GGUF type, or "Q4_1R": Q4_1 rows repacked for the kernels (`for_kernels`)."""

    kind: str
    data: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return self.data.shape[0], self.data.shape[1] // BLOCK_BYTES[self.kind] * 32

    def dequantize(self, rows: slice | torch.Tensor = slice(None)) -> torch.Tensor:
        """float32 weights of `rows`, computed the way gguf-py (and so `Base.load`) computes them."""
        data = self.data[rows].numpy()
        n = data.shape[0]
        if self.kind == "Q4_1R":
            d, m, q = _unpack_q4_1r(data)
            return torch.from_numpy((d[..., None] * q + m[..., None]).reshape(n, -1))
        b = data.reshape(-1, BLOCK_BYTES[self.kind])
        d = b[:, :2].copy().view(np.float16).astype(np.float32)
        if self.kind == "Q8_0":
            w = b[:, 2:].copy().view(np.int8).astype(np.float32) * d
        else:
            m = b[:, 2:4].copy().view(np.float16).astype(np.float32)
            qs = b[:, 4:]
            q = np.concatenate([qs & 15, qs >> 4], axis=1).astype(np.float32)
            w = d * q + m
        return torch.from_numpy(w.reshape(n, -1))

    def for_kernels(self) -> "Blocks":
        """These blocks in the layout kernels.c reads: Q4_1 repacked to "Q4_1R" (each row's
        scales, then its minimums, then per pair of blocks one byte per weight position holding
        both blocks' nibbles; an odd last block keeps its 16 bytes). Same bytes a row, same
        weights; kernels.c's GGUF-blocks comment says why. Other kinds are read as they are."""
        if self.kind != "Q4_1":
            return self
        out, width = self.data.shape
        nb = width // 20
        b = self.data.numpy().reshape(out, nb, 20)
        qs = b[:, :, 4:]
        q = np.concatenate([qs & 15, qs >> 4], axis=2)  # [out, nb, 32]: weight j's nibble
        pairs = nb // 2 * 2
        packed = (q[:, 0:pairs:2] | (q[:, 1:pairs:2] << 4)).reshape(out, -1)
        parts = [b[:, :, 0:2].reshape(out, -1), b[:, :, 2:4].reshape(out, -1), packed]
        if nb % 2:
            parts.append(qs[:, -1])
        return Blocks("Q4_1R", torch.from_numpy(np.ascontiguousarray(np.concatenate(parts, axis=1))))


def _unpack_q4_1r(data: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_1R rows -> (d [n, nb], m [n, nb], q [n, nb, 32]) as float32."""
    n, width = data.shape
    nb = width // 20
    d = data[:, : 2 * nb].copy().view(np.float16).astype(np.float32)
    m = data[:, 2 * nb : 4 * nb].copy().view(np.float16).astype(np.float32)
    pairs = nb // 2
    packed = data[:, 4 * nb : 4 * nb + 32 * pairs].reshape(n, pairs, 32)
    q = np.empty((n, nb, 32), dtype=np.uint8)
    q[:, 0 : 2 * pairs : 2] = packed & 15
    q[:, 1 : 2 * pairs : 2] = packed >> 4
    if nb % 2:
        last = data[:, 4 * nb + 32 * pairs :]
        q[:, -1] = np.concatenate([last & 15, last >> 4], axis=1)
    return d, m, q.astype(np.float32)


def _unpermute_rows(rows: int, heads: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's rotary permutation of q/k weights (what transformers'
    GGUF loader applies): Hugging Face row i is GGUF row `perm[i]`."""
    dim = rows // heads // 2
    return torch.arange(rows).view(heads, dim, 2).transpose(1, 2).reshape(rows)


@functools.lru_cache(maxsize=2)
def read_blocks(path: Path, n_heads: int, kv_heads: int) -> dict[str, Blocks]:
    """Hugging Face parameter name -> Blocks, for every Q4_1/Q8_0 matrix of a Llama-family GGUF,
    in the kernels' layout (`Blocks.for_kernels`: Q4_1 comes back as Q4_1R).

    Cached twice: in memory (every engine on the same base shares one copy, ~96 MB for the
    embedded one) and as a safetensors file under the cache, because parsing the GGUF (its
    tokenizer metadata, mostly) takes ~3-4 s, which every engine start would pay. The file
    holds the kernels' layout too, so a start does not repack (~0.2 s for the embedded base);
    an entry written before the repack existed is repacked and rewritten when first read."""
    from safetensors.torch import load_file

    entry = cache_dir() / "gguf_blocks" / f"{path.stem}-{file_digest(path)}-h{n_heads}-{kv_heads}.safetensors"
    if entry.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(entry), "pt") as fh:
                kinds = fh.metadata() or {}
            stored = {name: Blocks(kinds[name], t) for name, t in load_file(str(entry)).items()}
            out = {name: b.for_kernels() for name, b in stored.items()}
            if any(b is not stored[name] for name, b in out.items()):
                _write_entry(entry, out)  # an entry from before the repack: rewritten once
            return out
        except Exception as e:  # noqa: BLE001 - a damaged cache entry is rebuilt
            log.warning("GGUF block cache %s unreadable (%s); reading the GGUF", entry, e)
    out = {name: b.for_kernels() for name, b in _parse(path, n_heads, kv_heads).items()}
    _write_entry(entry, out)
    return out


def _write_entry(entry: Path, blocks: dict[str, Blocks]) -> None:
    """Store `blocks` as the cache entry, atomically; a read-only cache only costs the next
    start its parse."""
    from safetensors.torch import save_file

    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=entry.parent, suffix=".tmp")
        os.close(fd)
        try:
            save_file({n: b.data for n, b in blocks.items()}, tmp, metadata={n: b.kind for n, b in blocks.items()})
            os.replace(tmp, entry)  # atomic: readers never see a half-written file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as e:
        log.warning("could not write GGUF block cache %s: %s", entry, e)


def _parse(path: Path, n_heads: int, kv_heads: int) -> dict[str, Blocks]:
    from gguf import GGUFReader

    out: dict[str, Blocks] = {}
    for t in GGUFReader(str(path)).tensors:
        kind = t.tensor_type.name
        if kind not in BLOCK_BYTES:
            continue
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", t.name)
        if m and m.group(2) in _LAYER:
            name = f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}.weight"
        elif t.name in _GLOBAL:
            name = _GLOBAL[t.name]
        else:
            continue
        data = torch.from_numpy(np.array(t.data, dtype=np.uint8))  # a copy: the file stays closed
        if m and m.group(2) in ("attn_q", "attn_k"):
            data = data[_unpermute_rows(data.shape[0], n_heads if m.group(2) == "attn_q" else kv_heads)]
        out[name] = Blocks(kind, data.contiguous())
    return out


def fuse(parts: list[Blocks]) -> Blocks | None:
    """The blocks of a fused projection (parts stacked by rows), if all parts are one kind (the
    rows of either layout stand alone, so Q4_1R parts stack too)."""
    if not parts or any(p.kind != parts[0].kind for p in parts):
        return None
    return Blocks(parts[0].kind, torch.cat([p.data for p in parts]) if len(parts) > 1 else parts[0].data)


def matches(blocks: Blocks, weight: torch.Tensor, samples: int = 4) -> bool:
    """Whether `weight` is these blocks dequantized and rounded to its dtype (checked on a few
    rows): the kernels' output is then the bf16 path's, bit for bit."""
    if blocks.shape != tuple(weight.shape):
        return False
    rows = torch.linspace(0, weight.shape[0] - 1, samples).long().unique()
    return torch.equal(blocks.dequantize(rows).to(weight.dtype), weight[rows])
