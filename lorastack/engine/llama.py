"""The engine's forward pass for Llama-family decoders (Llama, SmolLM, Mistral, Qwen2).

Why not call the Hugging Face module: its forward rebuilds masks and cache objects every
step and knows nothing of per-row adapters. This runs the same weights and the same
norm/rotary modules (so numerics match HF), with the engine's compact KV cache and a
per-row LoRA delta on every targeted projection. Other architectures fall back to the
PEFT reference path.
"""

from __future__ import annotations

import ctypes
import logging

import torch
import torch.nn.functional as F

from .cache import KVCache
from .gguf_blocks import Blocks, fuse, matches
from .lora import LoraBank, LoraBatch
from .native import BLOCK_KIND_IDS, MAX_ROWS, DecodeLayer, Kernels, i8_fits, kernels, tiles_fit

SUPPORTED = {"llama", "mistral", "qwen2"}
# Up to this many rows, a prefill's layer projections take kernels.c's tiled path instead of
# torch's bf16 GEMM: from the GGUF blocks, or from bf16 weights (in % 32, out % 16) packed the same
# way, both with the few-row kernel's bits, so a GGUF base and its bf16 copy still prefill alike.
# It was 16 while the tiles reused each decoded weight vector for 2 rows (then 1.6x torch at 16
# rows, 0.87x at 64). With the 8-row reuse, a one-prompt prefill on the embedded base at 20 / 40 /
# 64 / 100 tokens (`python bench/engine.py --prefill-only --repeats 2`, two threads): GGUF blocks
# 33.5 / 46.5 / 62.2 / 96.0 ms vs torch above 8 rows 41.1 / 53.6 / 71.2 / 97.7; bf16 weights
# 35.7 / 49.1 / 65.3 / 95.4 vs 40.4 / 53.5 / 70.4 / 92.0. So 64, about where they meet. The LM head stays on torch above MAX_ROWS
# (the tiled Q8_0 head measured 0.7x torch at 16 rows).
BLOCK_TILE_ROWS = 64
# Decode passes (the glue path: plain steps and speculative verify passes) take the tiled path up to
# this many rows, through the compiled layer loop: with each packed weight vector reused for 8 rows
# (kernels.c's tile_block) the tiles match torch's bf16 GEMM at 64 rows, and the loop removes the
# per-layer Python calls and prefetches the rows' LoRA weights during the GEMMs (bench/engine.py).
LOOP_TILE_ROWS = 64
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def supports(model: torch.nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    inner = getattr(model, "model", None)
    return (
        getattr(cfg, "model_type", None) in SUPPORTED
        and inner is not None
        and hasattr(inner, "layers")
        and hasattr(inner, "rotary_emb")
        and isinstance(getattr(inner.layers[0].self_attn, "q_proj", None), torch.nn.Linear)
    )


# Fused projections: parts that read the same input run as one GEMM (and one LoRA pair).
FUSED = (("self_attn", "qkv_proj", ("q_proj", "k_proj", "v_proj")), ("self_attn", "o_proj", ("o_proj",)),
         ("mlp", "gate_up_proj", ("gate_proj", "up_proj")), ("mlp", "down_proj", ("down_proj",)))


class LlamaRunner:
    def __init__(self, model: torch.nn.Module, bank: LoraBank | None = None, int8_rows: int = 0, native: bool = True,
                 blocks: dict[str, Blocks] | None = None, int8_matmuls: bool = False) -> None:
        """`blocks` (a GGUF base's quantized matrices by parameter name, engine/gguf_blocks.py)
        lets decode GEMVs read those instead of the bf16 weights, with the same output.
        `int8_matmuls`: every layer projection and the LM head multiply in int8 (kernels.c, "int8
        matmuls"): 1.46x the GGUF block kernel at 1 row, 1.6-2.0x at 2-64 rows (bench/kernels.py),
        still batch-invariant, no longer bit-identical to the bf16 path; needs the kernels."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        self.model = model
        self.inner = model.model
        self.layers = list(self.inner.layers)
        cfg = model.config
        self.n_heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.dtype = next(model.parameters()).dtype
        self.bank = bank
        self.rope = apply_rotary_pos_emb
        # Per layer: fused name -> (weight, bias, full group name, split sizes). The parts'
        # Linear weights are rebound as views into the fused tensor, so memory is not doubled
        # and the Hugging Face modules still see their own weights.
        self.fused: list[dict[str, tuple[torch.Tensor, torch.Tensor | None, str, list[int]]]] = []
        self.groups: dict[str, list[tuple[str, int, int]]] = {}
        for i, layer in enumerate(self.layers):
            mods = {}
            for parent_name, fused_name, parts in FUSED:
                parent = getattr(layer, parent_name)
                lins = [getattr(parent, p) for p in parts]
                if len(lins) == 1:
                    weight, bias = lins[0].weight, lins[0].bias
                else:
                    weight = torch.cat([lin.weight.data for lin in lins], 0)
                    offset = 0
                    for lin in lins:
                        lin.weight.data = weight[offset : offset + lin.out_features]
                        offset += lin.out_features
                    biases = [lin.bias for lin in lins]
                    bias = None if all(b is None for b in biases) else torch.cat(
                        [b.data if b is not None else torch.zeros(lin.out_features, dtype=weight.dtype) for b, lin in zip(biases, lins)])
                prefix = f"model.layers.{i}.{parent_name}"
                group = f"{prefix}.{fused_name}"
                mods[fused_name] = (weight, bias, group, [lin.out_features for lin in lins])
                self.groups[group] = [(f"{prefix}.{p}", lin.in_features, lin.out_features) for p, lin in zip(parts, lins)]
            self.fused.append(mods)
        # Optional int8 weight-only copies for small decode batches: batch-1 decode is bound by
        # reading the weights, and int8 halves the bytes. Measured on the 2-core EPYC (bf16
        # activations): aten's int8 GEMV is ~2x faster than the bf16 one at 1 row but slower
        # from ~8 rows, so the bf16 weights stay for prefill and larger batches.
        self.int8_rows = int8_rows if self.dtype == torch.bfloat16 else 0
        # Compiled bf16 GEMV for decode batches of up to `native_rows` rows (see native.py).
        self.native: Kernels | None = kernels() if native and self.dtype == torch.bfloat16 else None
        self.native_rows = MAX_ROWS if self.native else 0
        self.q8: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.blocks: dict[int, Blocks] = self._match_blocks(blocks) if blocks and self.native else {}
        self.head = model.lm_head.weight
        self.tile_rows = BLOCK_TILE_ROWS
        self.loop_rows = LOOP_TILE_ROWS
        # The compiled glue (kernels.c: norms, rotary, K/V append, attention, SiLU*up) for decode
        # steps: measured at batch 1 on the embedded base, the ~45 torch ops a layer between the
        # matmuls cost more than the matmuls themselves (torch.profiler: ~16 ms a token).
        self.eps = getattr(self.layers[0].input_layernorm, "variance_epsilon", None)
        self.glue = (self.native is not None and getattr(cfg, "hidden_act", None) == "silu" and self.eps is not None
                     and self.head_dim % 2 == 0)
        # Without the glue (other activations), attention still runs in the batch-invariant kernel
        # where it builds, so speculative verify passes round like plain steps. bench/engine.py
        # turns both off for its "as before" row.
        self.attention_kernel = self.native is not None
        # The whole layer loop of a decode step in one compiled call (see _layer_table); None
        # until tried, False where some projection cannot run there. bench/engine.py can turn it off.
        self.layer_loop: bool | None = None if self.glue else False
        self._table: tuple | None = None
        self._tiles_all = True  # every projection on GGUF blocks (the loop can then take up to loop_rows rows)
        # Packed int8 copies (kernels.c's layout) of the layer weights and the LM head. The head
        # too: at 16 rows torch's bf16 GEMM took 5.6 ms of a ~26 ms step and int8 1.8 ms (1.7x at
        # 1 row against the Q8_0 block kernel; embedded base, two threads).
        self.i8: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}
        if int8_matmuls and self.native is not None:
            for weight in [w for mods in self.fused for w, *_ in mods.values()] + [model.lm_head.weight]:
                if i8_fits(weight):
                    self.i8[id(weight)] = self.native.i8_pack(weight.contiguous())
        if self.int8_rows:
            for mods in self.fused:
                for weight, *_ in mods.values():
                    self.q8[id(weight)] = quantize_int8(weight)
            self.q8[id(model.lm_head.weight)] = quantize_int8(model.lm_head.weight)

    def _match_blocks(self, blocks: dict[str, Blocks]) -> dict[int, Blocks]:
        """Fused weight (by id) -> its GGUF blocks, for every weight that is exactly those
        blocks dequantized (sampled rows); any other weight stays on the bf16 kernel."""
        found: dict[int, Blocks] = {}
        for i, mods in enumerate(self.fused):
            for parent_name, fused_name, parts in FUSED:
                weight = mods[fused_name][0]
                names = [f"model.layers.{i}.{parent_name}.{p}.weight" for p in parts]
                fused = fuse([blocks[n] for n in names]) if all(n in blocks for n in names) else None
                if fused is not None and matches(fused, weight):
                    found[id(weight)] = fused.for_kernels()
        head = self.model.lm_head.weight
        tied = head is self.inner.embed_tokens.weight
        hb = blocks.get("lm_head.weight") or (blocks.get("model.embed_tokens.weight") if tied else None)
        if hb is not None and matches(hb, head):
            found[id(head)] = hb.for_kernels()
        expected = 4 * len(self.layers) + 1
        if len(found) < expected:
            logging.getLogger("lorastack.engine").info("GGUF blocks used for %d of %d decode matrices", len(found), expected)
        return found

    def new_cache(self) -> KVCache:
        return KVCache(len(self.layers), self.kv_heads, self.head_dim, self.dtype)

    def _linear(self, layer: int, name: str, x: torch.Tensor, lora: LoraBatch, tiles: int | None = None) -> torch.Tensor:
        weight, bias, group, _ = self.fused[layer][name]
        return lora.add_delta(group, x, self._matmul(x, weight, bias, tiles))

    def _matmul(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tiles: int | None = None) -> torch.Tensor:
        """`x @ weight^T + bias`; GGUF blocks' tiled path up to `tiles` rows (default `tile_rows`)."""
        rows = x.numel() // x.shape[-1]
        tiles = self.tile_rows if tiles is None else tiles
        if rows <= self.int8_rows:
            w8, scales = self.q8[id(weight)]
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(rows, -1), w8, scales).view(*x.shape[:-1], -1)
            return y if bias is None else y + bias
        if id(weight) in self.i8 and x.dtype == torch.bfloat16:
            y = self.native.gemm_i8(x.reshape(rows, -1).contiguous(), *self.i8[id(weight)]).view(*x.shape[:-1], -1)
            return y if bias is None else y + bias
        if x.dtype == torch.bfloat16 and id(weight) in self.blocks and (
                rows <= self.native_rows or (rows <= tiles and weight.shape[0] % 16 == 0 and weight is not self.head)):
            b = self.blocks[id(weight)]
            y = self.native.gemv_blocks(x.reshape(rows, -1).contiguous(), b.kind, b.data).view(*x.shape[:-1], -1)
            return y if bias is None else y + bias
        if weight.is_contiguous() and weight.dtype == x.dtype == torch.bfloat16 and (rows <= self.native_rows or (
                rows <= tiles and tiles_fit(weight) and weight is not self.head and self.native is not None)):
            y = self.native.gemv(x.reshape(rows, -1).contiguous(), weight).view(*x.shape[:-1], -1)
            return y if bias is None else y + bias
        return F.linear(x, weight, bias)

    def _qkv(self, li: int, x: torch.Tensor, lora: LoraBatch) -> tuple[torch.Tensor, ...]:
        return self._linear(li, "qkv_proj", x, lora).split(self.fused[li]["qkv_proj"][3], dim=-1)

    @torch.inference_mode()
    def prefill(self, cache: KVCache, first: int, prompts: list[list[int]], lora: LoraBatch,
                starts: list[int] | None = None) -> torch.Tensor:
        """Run new prompts (rows `first..`) through the model; returns next-token logits [n, V].

        `starts[i]` tokens of prompt i are already in the cache (a reused prefix); only the
        rest is computed. The rows' remaining tokens are packed into one sequence with no
        padding (prompts differ in length; padding wasted ~40% of prefill compute), and
        attention runs per row against that row's cache.
        """
        n = len(prompts)
        starts = starts or [0] * n
        counts = [len(p) - s for p, s in zip(prompts, starts)]
        offsets = [0]
        for c in counts:
            offsets.append(offsets[-1] + c)
        ids = torch.tensor([t for p, s in zip(prompts, starts) for t in p[s:]]).view(1, -1)
        positions = torch.cat([torch.arange(s, len(p)) for p, s in zip(prompts, starts)]).view(1, -1)
        total = offsets[-1]
        h = self.inner.embed_tokens(ids)
        cos, sin = self.inner.rotary_emb(h, positions)
        # With the compiled glue, rotary, K/V append and attention run in the decode kernel, token by
        # token against the row's cache: one call a layer instead of two cache copies and one torch
        # attention call per prompt, and a prompt's attention rounds as its decode steps do. In a
        # scratch A/B (interleaved, 2 threads): 64 prompts on 64 int8 adapters 1245 -> 1197 ms, 16
        # on 16 exact 472 -> 420 ms, one 256-token prompt 277 -> 265 ms (exact).
        native_attention = self.glue and h.dtype == torch.bfloat16
        if native_attention:
            rows = torch.repeat_interleave(torch.arange(first, first + n), torch.tensor(counts))
            pos = positions[0].contiguous()
            cos2, sin2 = cos[0].contiguous(), sin[0].contiguous()
        else:
            masks = [None if s == 0 else (torch.arange(len(p))[None, :] <= torch.arange(s, len(p))[:, None])
                     for p, s in zip(prompts, starts)]
        for li, layer in enumerate(self.layers):
            x = layer.input_layernorm(h)
            if native_attention:
                a = self.native.rope_attend(self._linear(li, "qkv_proj", x, lora)[0], cos2, sin2, cache.k[li], cache.v[li],
                                            rows, pos, self.n_heads, layer.self_attn.scaling)[None]
            else:
                q, k, v = self._qkv(li, x, lora)
                q = q.view(1, total, -1, self.head_dim).transpose(1, 2)
                k = k.view(1, total, -1, self.head_dim).transpose(1, 2)
                v = v.view(1, total, -1, self.head_dim).transpose(1, 2)
                q, k = self.rope(q, k, cos, sin)
                kc, vc = cache.k[li], cache.v[li]
                out = torch.empty_like(q)
                for i in range(n):
                    lo, hi, s, row = offsets[i], offsets[i + 1], starts[i], first + i
                    kc[row, :, s : s + counts[i]] = k[0, :, lo:hi]
                    vc[row, :, s : s + counts[i]] = v[0, :, lo:hi]
                    out[:, :, lo:hi] = F.scaled_dot_product_attention(
                        q[:, :, lo:hi], kc[row : row + 1, :, : s + counts[i]], vc[row : row + 1, :, : s + counts[i]],
                        attn_mask=masks[i], is_causal=masks[i] is None, scale=layer.self_attn.scaling, enable_gqa=True,
                    )
                a = out.transpose(1, 2).reshape(1, total, -1)
            h = h + self._linear(li, "o_proj", a, lora)
            h = h + self._mlp(li, layer, layer.post_attention_layernorm(h), lora)
        cache.lengths[first : first + n] = torch.tensor([len(p) for p in prompts])
        last = h[0, torch.tensor(offsets[1:]) - 1]
        return self.model.lm_head(self.inner.norm(last)).float()

    @torch.inference_mode()
    def embed(self, prompts: list[list[int]], layers: int) -> torch.Tensor:
        """Mean-pooled hidden state after the first `layers` layers of the bare base, [n, hidden].

        Routers use it as a sentence embedding: early layers already separate tasks and cost a
        fraction of a full forward. No KV cache, no LoRA.
        """
        out = []
        for p in prompts:  # prompts differ in length; one short forward each keeps it simple
            ids = torch.tensor(p).view(1, -1)
            h = self.inner.embed_tokens(ids)
            cos, sin = self.inner.rotary_emb(h, torch.arange(len(p)).view(1, -1))
            for li, layer in enumerate(self.layers[:layers]):
                x = layer.input_layernorm(h)
                weight, bias, _, sizes = self.fused[li]["qkv_proj"]
                q, k, v = (t.view(1, len(p), -1, self.head_dim).transpose(1, 2)
                           for t in F.linear(x, weight, bias).split(sizes, dim=-1))
                q, k = self.rope(q, k, cos, sin)
                a = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=layer.self_attn.scaling, enable_gqa=True)
                h = h + layer.self_attn.o_proj(a.transpose(1, 2).reshape(1, len(p), -1))
                h = h + layer.mlp(layer.post_attention_layernorm(h))
            out.append(h[0].float().mean(0))
        return torch.stack(out)

    @torch.inference_mode()
    def layer_inputs(self, prompt: list[int]) -> torch.Tensor:
        """The bare base's normalised inputs to attention and MLP at every layer, [layers, 2, T, d]
        (what Arrow scores against adapter prototypes)."""
        ids = torch.tensor(prompt).view(1, -1)
        n = len(prompt)
        h = self.inner.embed_tokens(ids)
        cos, sin = self.inner.rotary_emb(h, torch.arange(n).view(1, -1))
        out = []
        for li, layer in enumerate(self.layers):
            x = layer.input_layernorm(h)
            weight, bias, _, sizes = self.fused[li]["qkv_proj"]
            q, k, v = (t.view(1, n, -1, self.head_dim).transpose(1, 2) for t in F.linear(x, weight, bias).split(sizes, dim=-1))
            q, k = self.rope(q, k, cos, sin)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=layer.self_attn.scaling, enable_gqa=True)
            h = h + layer.self_attn.o_proj(a.transpose(1, 2).reshape(1, n, -1))
            m = layer.post_attention_layernorm(h)
            h = h + layer.mlp(m)
            out.append(torch.stack([x[0], m[0]]).float())
        return torch.stack(out)

    @torch.inference_mode()
    def decode(self, cache: KVCache, tokens: torch.Tensor | list[list[int]], lora: LoraBatch) -> torch.Tensor:
        """One token for each of the `cache.n` running rows; returns logits [n, V].

        With `tokens` a list of per-row token lists (speculative decoding), see `_verify`."""
        if isinstance(tokens, list):
            return self._verify(cache, tokens, lora)
        n = cache.n
        if self.glue:
            pos = cache.lengths[:n].clone()
            cache.reserve(n, int(pos.max()) + 1)
            logits = self._glued(cache, tokens.view(n), torch.arange(n), pos, lora)
            cache.lengths[:n] += 1
            return logits
        pos = cache.lengths[:n].clone()
        cache.reserve(n, int(pos.max()) + 1)
        h = self.inner.embed_tokens(tokens.view(n, 1))
        cos, sin = self.inner.rotary_emb(h, pos.view(n, 1))
        span = int(pos.max()) + 1
        # Additive mask [n, 1, 1, span]: 0 where a row's key exists, -inf past its length.
        bias = torch.zeros(n, 1, 1, span, dtype=torch.float32)
        bias.masked_fill_(torch.arange(span)[None, None, None, :] > pos[:, None, None, None], float("-inf"))
        rows = torch.arange(n)
        for li, layer in enumerate(self.layers):
            x = layer.input_layernorm(h)
            q, k, v = self._qkv(li, x, lora)
            q = q.view(n, 1, -1, self.head_dim).transpose(1, 2)
            k = k.view(n, 1, -1, self.head_dim).transpose(1, 2)
            v = v.view(n, 1, -1, self.head_dim).transpose(1, 2)
            q, k = self.rope(q, k, cos, sin)
            kc, vc = cache.k[li], cache.v[li]
            kc[rows, :, pos] = k[:, :, 0]
            vc[rows, :, pos] = v[:, :, 0]
            if self.attention_kernel:
                a = self.native.attention(q[:, :, 0].contiguous(), kc, vc, rows, pos, layer.self_attn.scaling).view(n, 1, -1)
            else:
                a = _decode_attention(q, kc[:n, :, :span], vc[:n, :, :span], bias, layer.self_attn.scaling).transpose(1, 2).reshape(n, 1, -1)
            h = h + self._linear(li, "o_proj", a, lora)
            h = h + self._mlp(li, layer, layer.post_attention_layernorm(h), lora)
        cache.lengths[:n] += 1
        head = self.model.lm_head
        return self._matmul(self.inner.norm(h[:, 0]), head.weight, head.bias).float()

    def _verify(self, cache: KVCache, feeds: list[list[int]], lora: LoraBatch) -> torch.Tensor:
        """Several tokens for each of the `cache.n` running rows (speculative decoding): row
        i's `feeds[i]` (its last token, then its draft) go in at its next positions; returns
        the logits after every fed token, packed row after row, `[sum(len(f)), V]`.

        Every fed token's K/V is written and `cache.lengths` advances by `len(feeds[i])`; the
        caller then sets each row's length back to the tokens it accepted (the rejected tail
        is masked out by the length and overwritten by the next step). The rows' tokens are
        packed like a prefill (`lora` carries per-row token counts); attention pads only the
        queries, to the longest feed, so it stays one batched product per layer.
        """
        n = cache.n
        counts = torch.tensor([len(f) for f in feeds])
        total, most = int(counts.sum()), int(counts.max())
        pos = cache.lengths[:n].clone()
        row_of = torch.repeat_interleave(torch.arange(n), counts)  # packed token -> its row
        step_of = torch.arange(total) - (torch.cumsum(counts, 0) - counts)[row_of]  # -> its index in the feed
        positions = pos[row_of] + step_of
        span = int((pos + counts).max())
        cache.reserve(n, span)
        ids = torch.tensor([t for f in feeds for t in f])
        if self.glue:
            logits = self._glued(cache, ids, row_of, positions, lora)
            cache.lengths[:n] += counts
            return logits
        h = self.inner.embed_tokens(ids.view(1, total))
        cos, sin = self.inner.rotary_emb(h, positions.view(1, total))
        # Additive mask [n, 1, most, span]: query j of row i sees keys up to position pos_i + j.
        limit = pos[:, None] + torch.arange(most)[None, :]
        bias = torch.zeros(n, 1, most, span, dtype=torch.float32)
        bias.masked_fill_(torch.arange(span)[None, None, None, :] > limit[:, None, :, None], float("-inf"))
        for li, layer in enumerate(self.layers):
            x = layer.input_layernorm(h)
            q, k, v = self._qkv(li, x, lora)
            q = q.view(1, total, -1, self.head_dim).transpose(1, 2)
            k = k.view(1, total, -1, self.head_dim).transpose(1, 2)
            q, k = self.rope(q, k, cos, sin)
            kc, vc = cache.k[li], cache.v[li]
            kc[row_of, :, positions] = k[0].transpose(0, 1)
            vc[row_of, :, positions] = v.view(total, -1, self.head_dim)
            if self.attention_kernel:  # the same kernel as `decode`: the same bits per token
                a = self.native.attention(q[0].transpose(0, 1).contiguous(), kc, vc, row_of, positions, layer.self_attn.scaling)
            else:
                qp = q.new_zeros(n, most, self.n_heads, self.head_dim)
                qp[row_of, step_of] = q[0].transpose(0, 1)
                a = _decode_attention(qp.transpose(1, 2), kc[:n, :, :span], vc[:n, :, :span], bias, layer.self_attn.scaling)
                a = a.transpose(1, 2)[row_of, step_of]  # [total, heads, d]
            h = h + self._linear(li, "o_proj", a.reshape(1, total, -1), lora)
            h = h + self._mlp(li, layer, layer.post_attention_layernorm(h), lora)
        cache.lengths[:n] += counts
        head = self.model.lm_head
        return self._matmul(self.inner.norm(h[0]), head.weight, head.bias).float()

    def _glued(self, cache: KVCache, ids: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, lora: LoraBatch) -> torch.Tensor:
        """New tokens `ids [total]` of cache rows `rows` at positions `pos` through every layer with
        the compiled glue between the matmuls; K/V appended; returns logits `[total, V]`. The
        residual stream `h` is updated in place by the fused add+norm calls."""
        nat, eps = self.native, self.eps
        h = self.inner.embed_tokens(ids)  # [total, d]
        cos, sin = self.inner.rotary_emb(h[None], pos[None])
        cos, sin = cos[0].contiguous(), sin[0].contiguous()
        head = self.model.lm_head
        table = self._layer_table(h, lora)
        if table is not None:  # every layer in one compiled call: same kernels, same order, same bits
            k_ptrs = torch.tensor([t.data_ptr() for t in cache.k], dtype=torch.int64)
            v_ptrs = torch.tensor([t.data_ptr() for t in cache.v], dtype=torch.int64)
            rows_arg = lora._native_rows() if lora.used else None
            x = nat.decode_layers(table, self.inner.norm.weight, h, k_ptrs, v_ptrs, cache.k[0], rows, pos, cos, sin,
                                  self.n_heads, self.layers[0].self_attn.scaling, eps, self.bank.rank if self.bank else 0, rows_arg)
            return self._matmul(x, head.weight, head.bias).float()
        x = nat.rmsnorm(h, self.layers[0].input_layernorm.weight, eps)
        t = self.loop_rows  # the same kernels as the compiled loop's, so the same bits
        for li, layer in enumerate(self.layers):
            qkv = self._linear(li, "qkv_proj", x, lora, t)
            a = nat.rope_attend(qkv, cos, sin, cache.k[li], cache.v[li], rows, pos, self.n_heads, layer.self_attn.scaling)
            x = nat.rmsnorm(h, layer.post_attention_layernorm.weight, eps, delta=self._linear(li, "o_proj", a, lora, t))
            down = self._linear(li, "down_proj", nat.silu_mul(self._linear(li, "gate_up_proj", x, lora, t)), lora, t)
            after = self.layers[li + 1].input_layernorm.weight if li + 1 < len(self.layers) else self.inner.norm.weight
            x = nat.rmsnorm(h, after, eps, delta=down)
        return self._matmul(x, head.weight, head.bias).float()

    def _layer_table(self, h: torch.Tensor, lora: LoraBatch) -> "ctypes.Array[DecodeLayer] | None":
        """The layers as kernels.c's `lorastack_decode_layers` reads them, when this pass can run
        there: at most MAX_ROWS tokens (up to `loop_rows` when every projection reads GGUF
        blocks, through their tiled path, or has an int8 copy), every projection on a compiled kernel without bias, no
        int8 path, and the batch's LoRA (if any) on the native kernel. Rebuilt when the LoRA
        bank is reallocated (a larger rank); None means the per-layer Python loop."""
        if h.shape[0] <= self.int8_rows or self.layer_loop is False:
            return None
        if h.shape[0] > self.native_rows and not (h.shape[0] <= self.loop_rows and self._tiles_all):
            return None  # above MAX_ROWS only the block kernels' tiled path can run every projection
        if lora.used and not lora._use_native(h):
            return None
        bank = self.bank
        key = (bank.rank, tuple(a.data_ptr() for a in list(bank.A.values())[:1])) if bank is not None and bank.A else None
        if self._table is not None and self._table[0] == key:
            return self._table[1]
        table = (DecodeLayer * len(self.layers))()
        tiles = True
        for li, layer in enumerate(self.layers):
            entry = table[li]
            entry.norm_in = layer.input_layernorm.weight.data_ptr()
            entry.norm_post = layer.post_attention_layernorm.weight.data_ptr()
            for j, (_, fused_name, _) in enumerate(FUSED):
                weight, bias, group, _ = self.fused[li][fused_name]
                proj = entry.p[j]
                if bias is not None or not (id(weight) in self.blocks or (weight.is_contiguous() and weight.dtype == torch.bfloat16)):
                    self.layer_loop = False  # a projection the loop cannot run: never try again
                    return None
                b = self.blocks.get(id(weight))
                i8 = self.i8.get(id(weight))
                tiles = tiles and ((b is not None and weight.shape[0] % 16 == 0) or i8 is not None)
                if i8 is not None:
                    proj.i8, proj.i8_scale = i8[0].data_ptr(), i8[1].data_ptr()
                proj.w = b.data.data_ptr() if b is not None else weight.data_ptr()
                proj.kind = BLOCK_KIND_IDS[b.kind if b is not None else "bf16"]
                proj.out, proj.in_ = weight.shape
                args = bank.native_args.get(group) if key is not None else None
                proj.P = args[3] if args else 0
                if args:
                    proj.A, proj.B, proj.outs = args[0], args[1], args[2]
                    if len(args) > 7:  # int8 banks
                        proj.As, proj.Bs = args[7], args[8]
        self._table = (key, table)
        self._tiles_all = tiles
        return table if h.shape[0] <= self.native_rows or tiles else None

    def _mlp(self, li: int, layer: torch.nn.Module, x: torch.Tensor, lora: LoraBatch) -> torch.Tensor:
        g, u = self._linear(li, "gate_up_proj", x, lora).chunk(2, dim=-1)
        return self._linear(li, "down_proj", layer.mlp.act_fn(g) * u, lora)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: `W ~= w8 * scale[:, None]`."""
    w = weight.detach().float()
    scale = (w.abs().amax(1) / 127.0).clamp(min=1e-12)
    w8 = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
    return w8, scale.to(weight.dtype)


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention for a few query tokens per row (`q [n, heads, L, d]`, L = 1 when decoding,
    more when verifying a draft; `bias [n, 1, L, span]`), grouped-query aware without
    repeating K/V.

    For a single query the fused SDPA kernel spends most of its time on setup (measured:
    ~0.8 ms a call at batch 32 vs ~0.15 ms for these three small ops).
    """
    n, heads, steps, d = q.shape
    kv = k.shape[1]
    if q.dtype == torch.bfloat16 and n * k.shape[2] <= 4096:
        # Small bf16 bmm calls carry a large fixed cost on CPU (measured at 1 row, 64 keys:
        # 74 us in bf16 vs 43 us converting to fp32); the copies stay small under this bound.
        return _decode_attention(q.float(), k.float(), v.float(), bias, scale).to(q.dtype)
    group = heads // kv
    qg = q.reshape(n, kv, group * steps, d)  # heads are kv-major: [n, kv, group * L, d]
    if steps > 1:
        bias = bias.unsqueeze(2).expand(n, 1, group, steps, bias.shape[-1]).reshape(n, 1, group * steps, -1)
    scores = (qg @ k.transpose(-1, -2)).float() * scale  # [n, kv, group * L, span]
    probs = torch.softmax(scores + bias, dim=-1).to(v.dtype)
    return (probs @ v).view(n, heads, steps, d)
