"""Core attention for NPR layouts, plugged into Megatron's layer spec.

Megatron hands the module q [sq, b, heads, d] and k/v [sk, b, groups, d] with RoPE and
qk-norm applied, plus the `attention_mask` object given to `GPTModel.forward` unchanged. What
that object is depends on the backend; `attention_inputs` builds it from the batch:

- `sdpa`: dense bool mask [b, 1, s, s], True = masked (Megatron's convention). The CPU reference,
  differentiable, O(s^2) memory.
- `flex`: a FlexAttention block mask built once per batch (megatron_npr.kernels); the fused GPU
  path. Forward only on CPU (torch has no CPU backward for it).
- `triton`: the project's fused Triton kernels (kernels/npr_flash_attention.py) over the compact
  AttentionLayout on the compute device; forward and backward, on CPU in Triton's interpreter.

For flex and triton the object is one int64 tensor [b, 1 + 2D, s] (doc_start, hole_lo, hole_hi
stacked), not the layout object: Megatron's activation recomputation saves the layer inputs with
`save_for_backward`, which takes tensors only. Each layer turns it back into the layout (and the
flex block mask) through a small cache keyed by the tensor's storage, so the block mask is still
built once per batch, also when the recomputed backward hands the layer a detached copy.
- `te`: Transformer Engine with an arbitrary mask (an unfused baseline; needs TE and CUDA).
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from ..kernels import AttentionLayout, npr_attention, prepare_flex, triton_sources
from .config import ATTENTION_BACKENDS


class NPRCoreAttention(MegatronModule):
    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None, *, backend: str = "sdpa"):
        super().__init__(config=config)
        require_backend(backend)
        if config.context_parallel_size > 1:
            raise NotImplementedError("context parallelism is not supported by the NPR attention")
        self.backend = backend
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        if backend == "te":
            self.te = _te_attention(config, layer_number, attention_type, softmax_scale)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_bias is not None or packed_seq_params is not None:
            raise NotImplementedError("NPR attention takes its layout from attention_mask only")
        if self.backend == "te":
            return self.te(query, key, value, attention_mask)
        if self.backend in ("flex", "triton"):
            if self.backend == "flex" and query.device.type == "cpu" and torch.is_grad_enabled() \
                    and query.requires_grad:
                raise NotImplementedError("FlexAttention has no backward on CPU: train with 'sdpa' on CPU "
                                          "(flex forward works, e.g. under torch.no_grad())")
            q, k, v = (t.transpose(0, 1) for t in (query, key, value))  # [b, s, heads, d]
            out = npr_attention(q, k, v, unpack_layout(attention_mask, self.backend), self.backend, scale=self.scale)
            b, s, h, d = out.shape
            return out.transpose(0, 1).reshape(s, b, h * d)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        if attention_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale,
                                                 enable_gqa=q.shape[1] != k.shape[1])
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=~attention_mask, scale=self.scale,
                                                 enable_gqa=q.shape[1] != k.shape[1])
        b, h, s, d = out.shape
        return out.permute(2, 0, 1, 3).reshape(s, b, h * d)


def require_backend(backend: str) -> None:
    """Fail before any model is built when a backend cannot run here."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {backend!r}; choose one of {ATTENTION_BACKENDS}")
    if backend == "triton":
        try:
            triton_sources.load("npr_flash_attention")
        except ImportError as e:
            raise RuntimeError(f"the 'triton' attention backend needs triton: {e}") from e
    if backend == "te":
        try:
            import transformer_engine  # noqa: F401
        except Exception as e:  # transformer-engine raises RuntimeError without CUDA
            raise RuntimeError(f"the 'te' attention backend needs transformer-engine and CUDA: {e}") from e
        if not torch.cuda.is_available():
            raise RuntimeError("the 'te' attention backend needs transformer-engine and CUDA: no GPU")


def _te_attention(config, layer_number, attention_type, softmax_scale):
    from megatron.core.extensions.transformer_engine import TEDotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    return TEDotProductAttention(config, layer_number, AttnMaskType.arbitrary, attention_type,
                                 softmax_scale=softmax_scale)


def attention_inputs(batch, backend: str):
    """The `attention_mask` object GPTModel.forward passes to every layer for this batch."""
    if backend in ("sdpa", "te"):
        return ~batch.dense_mask().unsqueeze(1)  # [b, 1, s, s], True = masked
    if backend in ("flex", "triton"):  # the compact arrays as one tensor on the compute device (module doc)
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        return torch.cat([batch.doc_start.unsqueeze(1), batch.hole_lo, batch.hole_hi], dim=1).to(device)
    raise ValueError(f"attention backend {backend!r}; choose one of {ATTENTION_BACKENDS}")


_UNPACKED: OrderedDict = OrderedDict()  # (storage, offset, shape, backend) -> (packed tensor, layout or FlexInputs)
_UNPACKED_MAX = 8  # batches in flight at once (pipeline microbatches awaiting backward)


def unpack_layout(packed, backend: str):
    """`attention_inputs`' tensor -> the AttentionLayout (triton) or FlexInputs (flex) that
    npr_attention takes, cached per batch. The cache holds the packed tensor itself, so its
    storage stays alive and cannot be reused by another batch under the same key."""
    if not isinstance(packed, torch.Tensor):  # an AttentionLayout / FlexInputs given directly
        return packed
    key = (packed.untyped_storage().data_ptr(), packed.storage_offset(), tuple(packed.shape), backend)
    if key in _UNPACKED:
        _UNPACKED.move_to_end(key)
        return _UNPACKED[key][1]
    depth = (packed.shape[1] - 1) // 2
    layout = AttentionLayout(packed[:, 0].contiguous(), packed[:, 1:1 + depth].contiguous(),
                             packed[:, 1 + depth:].contiguous())
    unpacked = prepare_flex(layout) if backend == "flex" else layout
    _UNPACKED[key] = (packed, unpacked)
    while len(_UNPACKED) > _UNPACKED_MAX:
        _UNPACKED.popitem(last=False)
    return unpacked


def core_attention_spec(backend: str):
    """What goes into `SelfAttentionSubmodules.core_attention`: Megatron calls it like a class."""
    def build(*args, **kwargs):
        return NPRCoreAttention(*args, backend=backend, **kwargs)
    return build


__all__ = ["NPRCoreAttention", "attention_inputs", "core_attention_spec"]
