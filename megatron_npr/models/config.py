"""Megatron TransformerConfig for Qwen3 dense models, read from a HF config.json.

What the HF config means (and which configs are refused) is decided by `qwen3_hf.Qwen3Spec`;
this module adds the Megatron settings and the checks of the parallel layout.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from .qwen3_hf import ModelConfigError, Qwen3Spec, read_hf_config

ATTENTION_BACKENDS = ("sdpa", "flex", "triton", "te")


@dataclass
class NPRModelConfig(TransformerConfig):
    """TransformerConfig plus what GPTModel takes beside it."""
    vocab_size: int = 0
    rotary_base: float = 1e6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 40960
    attention_backend_name: str = "sdpa"


def transformer_config_from_hf(hf_config: Any, *, tp: int = 1, pp: int = 1, dtype: torch.dtype = torch.bfloat16,
                               attention_backend: str = "sdpa", recompute: str = "none") -> NPRModelConfig:
    """Config of a Qwen3 dense model (dict, transformers config, or a folder / config.json).
    `recompute="full"`: activation checkpointing of every layer (only its input is kept)."""
    cfg = read_hf_config(hf_config)
    spec = Qwen3Spec.from_hf_config(cfg)
    if attention_backend not in ATTENTION_BACKENDS:
        raise ModelConfigError(f"attention backend {attention_backend!r}; choose one of {ATTENTION_BACKENDS}")
    if recompute not in ("none", "full"):
        raise ModelConfigError(f"parallel.recompute={recompute!r}; choose one of ['none', 'full']")
    checks = [("num_attention_heads", spec.num_heads, tp, "tp"),
              ("num_key_value_heads", spec.num_kv_heads, tp, "tp"),
              ("intermediate_size", spec.intermediate_size, tp, "tp"), ("vocab_size", spec.vocab_size, tp, "tp"),
              ("num_hidden_layers", spec.num_layers, pp, "pp")]
    for field, value, size, name in checks:
        if size < 1 or value % size:
            raise ModelConfigError(f"{name}={size} does not divide {field}={value}")
    cpu = not torch.cuda.is_available()
    return NPRModelConfig(
        num_layers=spec.num_layers, hidden_size=spec.hidden_size, ffn_hidden_size=spec.intermediate_size,
        num_attention_heads=spec.num_heads, num_query_groups=spec.num_kv_heads, kv_channels=spec.head_dim,
        normalization="RMSNorm", layernorm_epsilon=spec.rms_norm_eps,
        gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        add_bias_linear=False, add_qkv_bias=False, qk_layernorm=True,
        hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        use_cpu_initialization=cpu, gradient_accumulation_fusion=False,
        bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        bias_dropout_fusion=False, apply_rope_fusion=False,
        mrope_section=[spec.head_dim // 2, 0, 0],  # per-token positions, see models/gpt.py
        init_method_std=float(cfg.get("initializer_range", 0.02)),
        vocab_size=spec.vocab_size, rotary_base=spec.rope_theta, tie_word_embeddings=spec.tie_word_embeddings,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 40960)),
        attention_backend_name=attention_backend, **_recompute_settings(recompute),
    )


def _recompute_settings(recompute: str) -> dict:
    """Megatron's knobs for `parallel.recompute`: "full" checkpoints each layer by itself (uniform
    chunks of one layer), so backward holds one layer's activations at a time."""
    if recompute == "none":
        return {}
    return dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
