"""Pure-torch Qwen3 dense forward over a slot-addressed KV cache (the rollout engine's compute core).

Every token of every live sequence owns one KV slot. Callers say explicitly which slots each query
may attend to and at which position each token sits, so one call can decode NPR branches (shared
prefix + own slots, no siblings) and joins (prefix + all branches) without a per-layout kernel.
Numerics follow HF transformers' Qwen3 (RMSNorm in float32, rotate_half RoPE, GQA, SwiGLU); the
config, tensor names and shapes are those of models/qwen3_hf.py.
"""
from __future__ import annotations

import math
import os
from typing import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.qwen3_hf import EMBED, FINAL_NORM, LM_HEAD, Qwen3Spec, layer_prefix, tensor_shapes

# Gathered K plus V for one query chunk stays under this many elements (bounds peak memory).
GATHER_BUDGET = 64 * 1024 * 1024
ATTENTION = ("sdpa", "triton")  # forward's attention implementations


class Qwen3Weights:
    """HF-named tensors (model.embed_tokens.weight, model.layers.{i}.self_attn.q_proj.weight, ...,
    lm_head.weight when untied), owned copies in one dtype on one device."""

    def __init__(self, spec: Qwen3Spec, tensors: Mapping[str, Tensor], dtype=torch.float32, device="cpu"):
        self.spec, self.dtype, self.device = spec, dtype, torch.device(device)
        self.shapes = tensor_shapes(spec)
        self.tensors: dict[str, Tensor] = {}
        for name, shape in self.shapes.items():  # extra names (e.g. a tied lm_head copy) are ignored
            if name not in tensors:
                raise ValueError(f"missing tensor {name!r} (expected shape {shape})")
            src = tensors[name]
            if tuple(src.shape) != shape:
                raise ValueError(f"tensor {name!r} has shape {tuple(src.shape)}, expected {shape}")
            self.tensors[name] = src.detach().to(device=self.device, dtype=dtype, copy=True)
        # Per-layer views by short name; update() copies in place, so these stay current.
        self.layers = [{name[len(layer_prefix(i)):]: t for name, t in self.tensors.items()
                        if name.startswith(layer_prefix(i))} for i in range(spec.num_layers)]
        self.lm_head = self.tensors[EMBED if spec.tie_word_embeddings else LM_HEAD]

    @classmethod
    def from_hf(cls, hf_dir: str | os.PathLike, dtype=torch.float32, device="cpu") -> "Qwen3Weights":
        from megatron_npr.checkpoint import open_hf_weights
        spec = Qwen3Spec.from_hf_config(hf_dir)
        with open_hf_weights(hf_dir) as lazy:  # loads one tensor at a time
            return cls(spec, lazy, dtype=dtype, device=device)

    def update(self, named_tensors: Iterable[tuple[str, Tensor]]) -> int:
        """Copy HF-named tensors in place (the trainer's weight sync); returns how many were copied.
        With tied embeddings `lm_head.weight` is accepted as the embedding (HF state dicts list both)."""
        count = 0
        for name, src in named_tensors:
            if name == LM_HEAD and self.spec.tie_word_embeddings:
                name = EMBED
            if name not in self.shapes:
                raise ValueError(f"unknown tensor {name!r} for this Qwen3 model")
            if tuple(src.shape) != self.shapes[name]:
                raise ValueError(f"tensor {name!r} has shape {tuple(src.shape)}, expected {self.shapes[name]}")
            with torch.no_grad():
                self.tensors[name].copy_(src.detach())
            count += 1
        return count


class KVCache:
    """k, v: [num_layers, num_slots, num_kv_heads, head_dim]; the scheduler owns slot allocation."""

    def __init__(self, spec: Qwen3Spec, num_slots: int, dtype=torch.float32, device="cpu"):
        shape = (spec.num_layers, num_slots, spec.num_kv_heads, spec.head_dim)
        self.spec, self.num_slots = spec, num_slots
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """HF Qwen3RMSNorm: normalise in float32, cast back, then scale."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos, sin [n, head_dim] in float32, frequencies duplicated for the rotate_half layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64,
                                             device=positions.device).float() / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [n, heads, d]; cos/sin [n, 1, d] already in x's dtype."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def forward(weights: Qwen3Weights, cache: KVCache, tokens: Tensor, positions: Tensor, write_slots: Tensor,
            visible: Tensor, visible_len: Tensor, attention: str = "sdpa") -> Tensor:
    """tokens/positions/write_slots: [n] int64; visible: [n, V] int64 slot indices (row i's first
    visible_len[i] entries are valid, the rest padding, any value); returns logits [n, vocab] float32.

    Per layer, k/v of all n queries are written at write_slots before any query attends, so a
    query sees tokens of its own call (including itself) through their slots. Every row must
    list at least one slot (normally its own); out-of-range valid entries are the caller's bug.
    `attention`: "sdpa" (gathered SDPA, any device) or "triton" (kernels/npr_decode_attention.py:
    no gathered copy; on CPU it runs in Triton's interpreter, a correctness tool only)."""
    spec, dev, dtype = weights.spec, weights.device, weights.dtype
    n = tokens.shape[0]
    if positions.shape != (n,) or write_slots.shape != (n,) or visible.dim() != 2 or \
            visible.shape[0] != n or visible_len.shape != (n,):
        raise ValueError(f"shape mismatch: tokens {tuple(tokens.shape)}, positions {tuple(positions.shape)}, "
                         f"write_slots {tuple(write_slots.shape)}, visible {tuple(visible.shape)}, "
                         f"visible_len {tuple(visible_len.shape)}")
    tokens, positions, write_slots = (t.to(dev, torch.long) for t in (tokens, positions, write_slots))
    visible, visible_len = visible.to(dev, torch.long), visible_len.to(dev, torch.long)
    hq, hkv, d = spec.num_heads, spec.num_kv_heads, spec.head_dim

    with torch.no_grad():  # not inference_mode: logits and cache stay usable by ordinary code
        attend = attention_fn(attention, visible, visible_len, 1.0 / math.sqrt(d))
        cos, sin = (t.to(dtype)[:, None, :] for t in rope_cos_sin(positions, d, spec.rope_theta))
        x = weights.tensors[EMBED][tokens]  # [n, hidden]
        for li, layer in enumerate(weights.layers):
            h = rms_norm(x, layer["input_layernorm.weight"], spec.rms_norm_eps)
            q = (h @ layer["self_attn.q_proj.weight"].T).view(n, hq, d)
            k = (h @ layer["self_attn.k_proj.weight"].T).view(n, hkv, d)
            v = (h @ layer["self_attn.v_proj.weight"].T).view(n, hkv, d)
            q = apply_rope(rms_norm(q, layer["self_attn.q_norm.weight"], spec.rms_norm_eps), cos, sin)
            k = apply_rope(rms_norm(k, layer["self_attn.k_norm.weight"], spec.rms_norm_eps), cos, sin)
            cache.k[li, write_slots] = k.to(cache.k.dtype)
            cache.v[li, write_slots] = v.to(cache.v.dtype)
            attn = attend(q, cache.k[li], cache.v[li])  # [n, hq, d]
            x = x + attn.reshape(n, hq * d) @ layer["self_attn.o_proj.weight"].T

            h = rms_norm(x, layer["post_attention_layernorm.weight"], spec.rms_norm_eps)
            gated = F.silu(h @ layer["mlp.gate_proj.weight"].T) * (h @ layer["mlp.up_proj.weight"].T)
            x = x + gated @ layer["mlp.down_proj.weight"].T

        x = rms_norm(x, weights.tensors[FINAL_NORM], spec.rms_norm_eps)
        return (x @ weights.lm_head.T).float()


def attention_fn(attention: str, visible: Tensor, visible_len: Tensor, scale: float):
    """attend(q [n, hq, d], keys, values [num_slots, hkv, d]) -> [n, hq, d] over each row's slots;
    what depends only on the slot lists is prepared once per forward, not once per layer."""
    if attention == "triton":
        from ..kernels import triton_sources  # triton is imported only when chosen
        kernel = triton_sources.load("npr_decode_attention")
        lengths = visible_len.to(torch.int32)  # the kernel's type, converted once for all layers
        return lambda q, keys, values: kernel.decode_attention(q, keys, values, visible, lengths, scale=scale)
    if attention != "sdpa":
        raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
    n, num_visible = visible.shape
    valid = torch.arange(num_visible, device=visible.device)[None, :] < visible_len[:, None]  # [n, V]
    visible = torch.where(valid, visible, 0)  # padding may hold any value; make it a safe index
    attn_mask = valid[:, None, None, :]  # [n, 1, 1, V]: broadcast over heads and the single query

    def attend(q: Tensor, keys: Tensor, values: Tensor) -> Tensor:
        chunk = max(1, GATHER_BUDGET // (2 * max(num_visible, 1) * keys.shape[1] * keys.shape[2]))
        out = torch.empty_like(q)
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            slots = visible[start:end]  # [c, V]
            gathered_k = keys[slots].transpose(1, 2).to(q.dtype)  # [c, hkv, V, d]
            gathered_v = values[slots].transpose(1, 2).to(q.dtype)
            out[start:end] = F.scaled_dot_product_attention(q[start:end, :, None, :], gathered_k, gathered_v,
                                                            attn_mask=attn_mask[start:end], scale=scale,
                                                            enable_gqa=True)[:, :, 0, :]  # [c, hq, d]
        return out
    return attend
