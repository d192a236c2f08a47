"""Optional native decode kernels (kernels.c), compiled once per machine and loaded with ctypes.

Why: for 1-8 decode rows in bfloat16, torch's GEMM streams the weights at well under half
this CPU's memory bandwidth and every small LoRA GEMM carries tens of microseconds of fixed
cost (bench/kernels.py and bench/engine.py measure both). The kernels need gcc and
AVX512-BF16; anywhere else, or with `LORASTACK_NATIVE=0`, `kernels()` is None and the
engine uses torch throughout, with the same results up to bf16 rounding
(tests/test_native.py checks both against fp32 math).

The shared library is built into `$LORASTACK_CACHE/native/` keyed by a digest of the
source, the compiler and the CPU, written under a temporary name and renamed (atomic), so
concurrent first uses and upgrades never load a half-written file.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from ..paths import cache_dir

log = logging.getLogger("lorastack.native")
SOURCE = Path(__file__).with_name("kernels.c")
MAX_ROWS = 8  # must match kernels.c
_NEEDED = ("avx512f", "avx512bw", "avx512_bf16", "avx512_vnni", "f16c")
I8_BLOCK = 64  # kernels.c's activation block for int8 matmuls
# -ffp-contract=off: the GGUF block kernels must round d*q and +m separately, as gguf-py does.
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC"]
BLOCK_KINDS = ("Q4_1R", "Q8_0")  # GGUF block layouts kernels.c reads (gguf_blocks.Blocks.for_kernels)


def _cpu() -> str | None:
    """The CPU's model and flags line, or None when it lacks the instructions the kernels use."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = next((line for line in info.splitlines() if line.startswith("flags")), "")
    model = next((line for line in info.splitlines() if line.startswith("model name")), "")
    if not all(f in flags.split() for f in _NEEDED):
        return None
    return model + flags


def _build() -> Path | None:
    if os.environ.get("LORASTACK_NATIVE", "1") == "0" or platform.machine() not in ("x86_64", "AMD64"):
        return None
    cpu = _cpu()
    cc = shutil.which(os.environ.get("CC", "gcc"))
    if cpu is None or cc is None:
        return None
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(SOURCE.read_bytes() + version.encode() + cpu.encode() + " ".join(_FLAGS).encode()).hexdigest()[:16]
    out = cache_dir() / "native" / f"kernels-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        cmd = [cc, *_FLAGS, str(SOURCE), "-o", tmp]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            log.warning("native kernels did not compile, using torch: %s", res.stderr.strip()[:500])
            return None
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


class DecodeProj(ctypes.Structure):
    """One projection for `lorastack_decode_layers` (kernels.c's DecodeProj)."""

    _fields_ = [("w", ctypes.c_void_p), ("kind", ctypes.c_int32), ("in_", ctypes.c_int32), ("out", ctypes.c_int32),
                ("P", ctypes.c_int32), ("A", ctypes.c_void_p), ("B", ctypes.c_void_p), ("outs", ctypes.c_void_p),
                ("As", ctypes.c_void_p), ("Bs", ctypes.c_void_p), ("i8", ctypes.c_void_p), ("i8_scale", ctypes.c_void_p)]


class DecodeLayer(ctypes.Structure):
    """One layer for `lorastack_decode_layers`: q|k|v, o, gate|up, down and the two norms."""

    _fields_ = [("p", DecodeProj * 4), ("norm_in", ctypes.c_void_p), ("norm_post", ctypes.c_void_p)]


BLOCK_KIND_IDS = {"bf16": -1, "Q4_1R": 0, "Q8_0": 1}  # kernels.c's kind codes


class Kernels:
    """Thin typed wrappers; callers pass contiguous bf16 tensors."""

    def __init__(self, path: Path) -> None:
        lib = ctypes.CDLL(str(path))  # torch (imported above) already provides libgomp
        p, i = ctypes.c_void_p, ctypes.c_int
        self._gemv = lib.lorastack_gemv_bf16
        self._gemv.argtypes = [p, p, p, i, i, i, i]
        self._gemv.restype = None
        self._lora = lib.lorastack_lora_bf16
        self._lora.argtypes = [p, p, p, p, p, i, i, i, i, p, p, i, i]
        self._lora.restype = None
        self._lora_i8 = lib.lorastack_lora_i8
        self._lora_i8.argtypes = [p, p, p, p, p, p, p, i, i, i, i, p, p, i, i]
        self._lora_i8.restype = None
        self._attention = lib.lorastack_attention_bf16
        self._attention.argtypes = [p, p, p, p, p, p, i, i, i, i, ctypes.c_int64, ctypes.c_int64, ctypes.c_float, i, i]
        self._attention.restype = None
        self._rmsnorm = lib.lorastack_rmsnorm_bf16
        self._rmsnorm.argtypes = [p, p, p, p, i, i, ctypes.c_float]
        self._rmsnorm.restype = None
        self._silu_mul = lib.lorastack_silu_mul_bf16
        self._silu_mul.argtypes = [p, p, i, i]
        self._silu_mul.restype = None
        self._rope_attend = lib.lorastack_rope_attend_bf16
        self._rope_attend.argtypes = [p, p, p, p, p, p, p, i, i, i, i, ctypes.c_int64, ctypes.c_int64, ctypes.c_float, i, p, i]
        self._rope_attend.restype = None
        self._layers = lib.lorastack_decode_layers
        self._layers.argtypes = [p, i, p, p, p, i, i, p, p, p, p, p, p, i, i, i, ctypes.c_int64, ctypes.c_int64,
                                 ctypes.c_float, i, ctypes.c_float, i, p, p, i, i]
        self._layers.restype = None
        self._i8_pack = lib.lorastack_i8_pack
        self._i8_pack.argtypes = [p, i, i, p, p, i]
        self._i8_pack.restype = None
        self._gemm_i8 = lib.lorastack_gemm_i8
        self._gemm_i8.argtypes = [p, p, p, p, i, i, i, i]
        self._gemm_i8.restype = None
        self._peak = lib.lorastack_peak_macs
        self._peak.argtypes = [i, ctypes.c_int64, i]
        self._peak.restype = ctypes.c_double
        self._gemv_blocks = {}
        for kind in BLOCK_KINDS:
            fn = getattr(lib, f"lorastack_gemv_{kind.lower()}")
            fn.argtypes = [p, p, p, i, i, i, i]
            fn.restype = None
            self._gemv_blocks[kind] = fn
        self.path = path

    def gemv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """`x [m, in] @ weight[out, in]^T`; above MAX_ROWS rows through the tiled path, which
        needs `in` a multiple of 32 and `out` of 16 (`tiles_fit`)."""
        m, k = x.shape
        if m > MAX_ROWS and not tiles_fit(weight):
            raise ValueError(f"the tiled bf16 path needs in % 32 == 0 and out % 16 == 0, got {tuple(weight.shape)}")
        y = torch.empty(m, weight.shape[0], dtype=torch.bfloat16)
        self._gemv(x.data_ptr(), weight.data_ptr(), y.data_ptr(), m, k, weight.shape[0], torch.get_num_threads())
        return y

    def gemv_blocks(self, x: torch.Tensor, kind: str, blocks: torch.Tensor) -> torch.Tensor:
        """`x [m, in] @ W^T`, W given as GGUF blocks of `kind` (uint8 `[out, in / 32 * block
        bytes]`, in the kernels' layout: `Blocks.for_kernels`); bit-identical to `gemv` on W
        dequantized to bf16, row by row. Above MAX_ROWS rows `out` must be a multiple of 16
        (the tiled path)."""
        if kind not in self._gemv_blocks:
            raise ValueError(f"no kernel reads {kind} blocks (kernels read {', '.join(BLOCK_KINDS)}; "
                             "Blocks.for_kernels() repacks Q4_1)")
        m, k = x.shape
        y = torch.empty(m, blocks.shape[0], dtype=torch.bfloat16)
        self._gemv_blocks[kind](x.data_ptr(), blocks.data_ptr(), y.data_ptr(), m, k, blocks.shape[0], torch.get_num_threads())
        return y

    def peak_macs(self, int8: bool = False, seconds: float = 0.2) -> float:
        """Multiply-adds per second of the matmuls' dot-product instruction (bf16, or int8 with
        `int8`) on all threads, from registers only: the compute roofline (best of a few runs of
        about `seconds` / 4 each; this machine is shared)."""
        import time

        iters, best = 100_000, 0.0
        for _ in range(4):
            t0 = time.perf_counter()
            macs = self._peak(1 if int8 else 0, iters, torch.get_num_threads())
            dt = time.perf_counter() - t0
            best = max(best, macs / dt)
            iters = max(1000, int(iters * (seconds / 4) / max(dt, 1e-6)))
        return best

    def i8_pack(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """A bf16 weight `[out, in]` (`i8_fits`) as int8 matmuls' packed u8 tiles and per-output
        fp32 scales, both padded to a multiple of 16 outputs (kernels.c, "int8 matmuls"), and `out`."""
        out, k = weight.shape
        padded = (out + 15) // 16 * 16
        packed = torch.empty(padded * k, dtype=torch.uint8)
        scale = torch.empty(padded, dtype=torch.float32)
        self._i8_pack(weight.data_ptr(), out, k, packed.data_ptr(), scale.data_ptr(), torch.get_num_threads())
        return packed, scale, out

    def gemm_i8(self, x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, out: int) -> torch.Tensor:
        """`x [m, in] @ W^T` in int8 arithmetic from `i8_pack`'s output (approximate: the rows
        are quantized per 64-value block)."""
        m, k = x.shape
        y = torch.empty(m, out, dtype=torch.bfloat16)
        self._gemm_i8(x.data_ptr(), packed.data_ptr(), scale.data_ptr(), y.data_ptr(), m, k, out, torch.get_num_threads())
        return y

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor,
                  scale: float) -> torch.Tensor:
        """Query token i (`q [total, heads, d]`) against cache row `rows[i]` of the layer's `k`, `v`
        `[R, kv, T, d]`, keys `0..pos[i]`; returns `[total, heads, d]`. Batch-invariant by design."""
        total, heads, d = q.shape
        out = torch.empty_like(q)
        self._attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), rows.data_ptr(), pos.data_ptr(), total,
                        heads, k.shape[1], d, k.stride(0), k.stride(1), scale, int(pos.max()) + 1, torch.get_num_threads())
        return out

    def rmsnorm(self, x: torch.Tensor, weight: torch.Tensor, eps: float, delta: torch.Tensor | None = None) -> torch.Tensor:
        """RMSNorm of the rows of `x [n, d]`; with `delta`, `x += delta` in place first (the residual add)."""
        y = torch.empty_like(x)
        self._rmsnorm(x.data_ptr(), None if delta is None else delta.data_ptr(), weight.data_ptr(), y.data_ptr(),
                      x.shape[0], x.shape[1], eps)
        return y

    def silu_mul(self, gu: torch.Tensor) -> torch.Tensor:
        """`silu(g) * u` for `gu [n, 2 * d]` = [g | u]."""
        y = torch.empty(gu.shape[0], gu.shape[1] // 2, dtype=gu.dtype)
        self._silu_mul(gu.data_ptr(), y.data_ptr(), gu.shape[0], y.shape[1])
        return y

    def rope_attend(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    rows: torch.Tensor, pos: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
        """Rotary, K/V append at `(rows[i], pos[i])` and attention for `qkv [total, (heads + 2 kv) d]`
        (cos, sin `[total, d]`; the cache layer `k`, `v` `[R, kv, T, d]`); returns `[total, heads d]`."""
        total, d, kv = qkv.shape[0], k.shape[-1], k.shape[1]
        out = torch.empty(total, heads * d, dtype=qkv.dtype)
        self._rope_attend(qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), k.data_ptr(), v.data_ptr(), rows.data_ptr(),
                          pos.data_ptr(), total, heads, kv, d, k.stride(0), k.stride(1), scale, int(pos.max()) + 1,
                          out.data_ptr(), torch.get_num_threads())
        return out

    def decode_layers(self, table: "ctypes.Array[DecodeLayer]", final_norm: torch.Tensor, h: torch.Tensor,
                      k_ptrs: torch.Tensor, v_ptrs: torch.Tensor, k0: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor,
                      cos: torch.Tensor, sin: torch.Tensor, heads: int, scale: float, eps: float, rank: int,
                      lora_rows: tuple | None) -> torch.Tensor:
        """Every layer of a decode step for `h [n, d]` (<= MAX_ROWS token rows, or more when every
        projection reads GGUF blocks: their tiled path; updated in place, the residual stream) in
        one call; returns the final-normed rows `[n, d]` for the LM head.
        `k_ptrs`/`v_ptrs`: each layer's cache tensor address (int64), `k0` one of them (shape
        and strides); `lora_rows`: `rows_args` of the batch's LoRA rows, or None for no LoRA."""
        n, d = h.shape
        out = torch.empty_like(h)
        slots, weights, k = (lora_rows[1], lora_rows[2], lora_rows[3]) if lora_rows else (None, None, 0)
        self._layers(ctypes.addressof(table), len(table), final_norm.data_ptr(), h.data_ptr(), out.data_ptr(), n, d,
                     k_ptrs.data_ptr(), v_ptrs.data_ptr(), rows.data_ptr(), pos.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                     heads, k0.shape[1], k0.shape[-1], k0.stride(0), k0.stride(1), scale, int(pos.max()) + 1, eps, rank,
                     slots, weights, k, torch.get_num_threads())
        return out

    def lora_raw(self, x: torch.Tensor, y: torch.Tensor, group: tuple, rank: int, rows: tuple) -> None:
        """`lora` with the per-projection pointers (`group_args`) and per-batch row tables
        (`rows_args`) prepared once: this runs ~120 times a decode step."""
        if len(group) > 7:  # int8 banks (group_args_i8)
            self._lora_i8(x.data_ptr(), y.data_ptr(), group[0], group[7], group[1], group[8], group[2], group[3], rank,
                          group[4], rows[0], rows[1], rows[2], rows[3], rows[4])
            return
        self._lora(x.data_ptr(), y.data_ptr(), group[0], group[1], group[2], group[3], rank, group[4], rows[0],
                   rows[1], rows[2], rows[3], rows[4])

    @staticmethod
    def group_args(a: torch.Tensor, bs: list[torch.Tensor]) -> tuple:
        """Pointers for one fused projection's bank; holds the ctypes arrays alive."""
        if len(bs) > 16:  # kernels.c keeps part offsets in a fixed array
            raise ValueError(f"a fused projection of {len(bs)} parts; the kernel supports 16")
        b_ptrs = (ctypes.c_int64 * len(bs))(*[b.data_ptr() for b in bs])
        outs = (ctypes.c_int32 * len(bs))(*[b.shape[-1] for b in bs])
        return (a.data_ptr(), ctypes.addressof(b_ptrs), ctypes.addressof(outs), len(bs), a.shape[-1], b_ptrs, outs)

    @classmethod
    def group_args_i8(cls, a8: torch.Tensor, a_scale: torch.Tensor, bs8: list[torch.Tensor],
                      b_scales: list[torch.Tensor]) -> tuple:
        """`group_args` for int8 banks (int8 matmuls): the int8 A and B, then A's scales and
        a pointer array to each part's B scales (kernels.c lorastack_lora_i8)."""
        base = cls.group_args(a8, bs8)
        s_ptrs = (ctypes.c_int64 * len(b_scales))(*[s.data_ptr() for s in b_scales])
        return (*base, a_scale.data_ptr(), ctypes.addressof(s_ptrs), s_ptrs)

    @staticmethod
    def rows_args(slots: torch.Tensor, weights: torch.Tensor) -> tuple:
        """Row count, slot and weight tables `[n, K]` (held alive), K, threads."""
        return (slots.shape[0], slots.data_ptr(), weights.data_ptr(), slots.shape[1], torch.get_num_threads(), slots, weights)

    def lora(self, x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, bs: list[torch.Tensor], rank: int,
             slots: torch.Tensor, weights: torch.Tensor) -> None:
        """Add every row's LoRA delta to `y [n, out]` in place (see kernels.c); the one-off form
        of `lora_raw`, preparing its arguments on the spot."""
        self.lora_raw(x, y, self.group_args(a, bs), rank, self.rows_args(slots, weights))


@functools.cache
def kernels() -> Kernels | None:
    """The compiled kernels, or None where they cannot run (the engine then uses torch)."""
    try:
        path = _build()
        return Kernels(path) if path else None
    except OSError as e:  # unwritable cache, loader failure: never fatal, just slower
        log.warning("native kernels unavailable, using torch: %s", e)
        return None


def i8_fits(weight: torch.Tensor) -> bool:
    """Whether a bf16 weight `[out, in]` can take the int8 matmuls' path."""
    return weight.dim() == 2 and weight.dtype == torch.bfloat16 and weight.shape[1] % I8_BLOCK == 0


def tiles_fit(weight: torch.Tensor) -> bool:
    """Whether a bf16 weight `[out, in]` can take the tiled path above MAX_ROWS rows."""
    return weight.shape[1] % 32 == 0 and weight.shape[0] % 16 == 0
