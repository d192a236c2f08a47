"""The engine's forward pass for Llama-family decoders (Llama, SmolLM, Mistral, Qwen2).

Why not call the Hugging Face module: its forward rebuilds masks and cache objects every
step and knows nothing of per-row adapters. This runs the same weights and the same
norm/rotary modules (so numerics match HF), with the engine's compact KV cache and a
per-row LoRA delta on every targeted projection. Other architectures fall back to the
PEFT reference path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .cache import KVCache
from .lora import LoraBank, lora_delta

SUPPORTED = {"llama", "mistral", "qwen2"}
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


class LlamaRunner:
    def __init__(self, model: torch.nn.Module, bank: LoraBank) -> None:
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
        # (layer, projection) -> (Linear, full module name as PEFT names it)
        self.proj: list[dict[str, tuple[torch.nn.Linear, str]]] = []
        for i, layer in enumerate(self.layers):
            mods = {}
            for p in PROJECTIONS:
                parent = layer.self_attn if p in PROJECTIONS[:4] else layer.mlp
                mods[p] = (getattr(parent, p), f"model.layers.{i}.{'self_attn' if p in PROJECTIONS[:4] else 'mlp'}.{p}")
            self.proj.append(mods)

    def new_cache(self) -> KVCache:
        return KVCache(len(self.layers), self.kv_heads, self.head_dim, self.dtype)

    def _linear(self, layer: int, name: str, x: torch.Tensor, slots: torch.Tensor, uniform: int | None) -> torch.Tensor:
        lin, full = self.proj[layer][name]
        y = F.linear(x, lin.weight, lin.bias)
        A = self.bank.A.get(full)
        if A is not None:
            d = lora_delta(x, A, self.bank.B[full], slots, uniform)
            if d is not None:
                y = y + d
        return y

    @torch.inference_mode()
    def prefill(self, cache: KVCache, first: int, prompts: list[list[int]], slots: torch.Tensor, uniform: int | None) -> torch.Tensor:
        """Run new prompts (rows `first..`) through the model; returns next-token logits [n, V]."""
        n, width = len(prompts), max(len(p) for p in prompts)
        ids = torch.zeros(n, width, dtype=torch.long)
        lens = torch.tensor([len(p) for p in prompts])
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.tensor(p)
        positions = torch.arange(width).expand(n, width)
        valid = torch.arange(width)[None, :] < lens[:, None]
        mask = (torch.ones(width, width, dtype=torch.bool).tril()[None] & valid[:, None, :])[:, None]
        h = self.inner.embed_tokens(ids)
        cos, sin = self.inner.rotary_emb(h, positions)
        rows = slice(first, first + n)
        for li, layer in enumerate(self.layers):
            x = layer.input_layernorm(h)
            q, k, v = (self._linear(li, p, x, slots, uniform) for p in ("q_proj", "k_proj", "v_proj"))
            q = q.view(n, width, -1, self.head_dim).transpose(1, 2)
            k = k.view(n, width, -1, self.head_dim).transpose(1, 2)
            v = v.view(n, width, -1, self.head_dim).transpose(1, 2)
            q, k = self.rope(q, k, cos, sin)
            cache.k[li][rows, :, :width] = k
            cache.v[li][rows, :, :width] = v
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=layer.self_attn.scaling, enable_gqa=True)
            h = h + self._linear(li, "o_proj", a.transpose(1, 2).reshape(n, width, -1), slots, uniform)
            h = h + self._mlp(li, layer, layer.post_attention_layernorm(h), slots, uniform)
        cache.lengths[rows] = lens
        last = h[torch.arange(n), lens - 1]
        return self.model.lm_head(self.inner.norm(last)).float()

    @torch.inference_mode()
    def decode(self, cache: KVCache, tokens: torch.Tensor, slots: torch.Tensor, uniform: int | None) -> torch.Tensor:
        """One token for each of the `cache.n` running rows; returns logits [n, V]."""
        n = cache.n
        pos = cache.lengths[:n].clone()
        cache.reserve(n, int(pos.max()) + 1)
        h = self.inner.embed_tokens(tokens.view(n, 1))
        cos, sin = self.inner.rotary_emb(h, pos.view(n, 1))
        span = int(pos.max()) + 1
        mask = (torch.arange(span)[None, :] <= pos[:, None])[:, None, None, :]
        rows = torch.arange(n)
        for li, layer in enumerate(self.layers):
            x = layer.input_layernorm(h)
            q, k, v = (self._linear(li, p, x, slots, uniform) for p in ("q_proj", "k_proj", "v_proj"))
            q = q.view(n, 1, -1, self.head_dim).transpose(1, 2)
            k = k.view(n, 1, -1, self.head_dim).transpose(1, 2)
            v = v.view(n, 1, -1, self.head_dim).transpose(1, 2)
            q, k = self.rope(q, k, cos, sin)
            kc, vc = cache.k[li], cache.v[li]
            kc[rows, :, pos] = k[:, :, 0]
            vc[rows, :, pos] = v[:, :, 0]
            a = F.scaled_dot_product_attention(
                q, kc[:n, :, :span], vc[:n, :, :span], attn_mask=mask, scale=layer.self_attn.scaling, enable_gqa=True
            )
            h = h + self._linear(li, "o_proj", a.transpose(1, 2).reshape(n, 1, -1), slots, uniform)
            h = h + self._mlp(li, layer, layer.post_attention_layernorm(h), slots, uniform)
        cache.lengths[:n] += 1
        return self.model.lm_head(self.inner.norm(h[:, 0])).float()

    def _mlp(self, li: int, layer: torch.nn.Module, x: torch.Tensor, slots: torch.Tensor, uniform: int | None) -> torch.Tensor:
        g = self._linear(li, "gate_proj", x, slots, uniform)
        u = self._linear(li, "up_proj", x, slots, uniform)
        return self._linear(li, "down_proj", layer.mlp.act_fn(g) * u, slots, uniform)
