"""Megatron TransformerConfig for Qwen3 dense models, read from a HF config.json."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

ATTENTION_BACKENDS = ("sdpa", "flex", "te")


class ModelConfigError(ValueError):
    """An architecture or parallel layout we cannot build; the message names the field."""


@dataclass
class NPRModelConfig(TransformerConfig):
    """TransformerConfig plus what GPTModel takes beside it."""
    vocab_size: int = 0
    rotary_base: float = 1e6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 40960
    attention_backend_name: str = "sdpa"


def _as_dict(hf_config: Any) -> dict:
    if isinstance(hf_config, (str, Path)):
        from ..checkpoint.hf_io import read_hf_config
        return read_hf_config(Path(hf_config).parent if str(hf_config).endswith(".json") else hf_config)
    if isinstance(hf_config, Mapping):
        return dict(hf_config)
    if hasattr(hf_config, "to_dict"):
        return hf_config.to_dict()
    raise ModelConfigError(f"cannot read a model config from {type(hf_config).__name__}")


def _rope_theta(cfg: dict) -> float:
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise ModelConfigError(f"rope scaling {kind!r} is not supported (only plain RoPE)")
    return float(params.get("rope_theta", cfg.get("rope_theta", 1e6)))


def transformer_config_from_hf(hf_config: Any, *, tp: int = 1, pp: int = 1, dtype: torch.dtype = torch.bfloat16,
                               attention_backend: str = "sdpa") -> NPRModelConfig:
    """Config of a Qwen3 dense model (dict, transformers config, or a folder / config.json)."""
    cfg = _as_dict(hf_config)
    arch = cfg.get("model_type")
    if arch != "qwen3":
        raise ModelConfigError(f"model_type {arch!r} (architectures {cfg.get('architectures')}) is not supported: "
                               "only Qwen3 dense models (model_type 'qwen3')")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(cfg.get(key), int) or cfg[key] <= 0:
            raise ModelConfigError(f"config field {key} must be a positive integer, got {cfg.get(key)!r}")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ModelConfigError(f"hidden_act {cfg['hidden_act']!r} is not supported (Qwen3 uses silu)")
    if cfg.get("attention_bias"):
        raise ModelConfigError("attention_bias=true is not supported (Qwen3 has no attention bias)")
    if cfg.get("use_sliding_window"):
        raise ModelConfigError("use_sliding_window=true is not supported")
    if attention_backend not in ATTENTION_BACKENDS:
        raise ModelConfigError(f"attention backend {attention_backend!r}; choose one of {ATTENTION_BACKENDS}")
    heads, layers = cfg["num_attention_heads"], cfg["num_hidden_layers"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    checks = [("num_attention_heads", heads, tp, "tp"), ("num_key_value_heads", kv_heads, tp, "tp"),
              ("intermediate_size", cfg["intermediate_size"], tp, "tp"), ("vocab_size", cfg["vocab_size"], tp, "tp"),
              ("num_hidden_layers", layers, pp, "pp")]
    for field, value, size, name in checks:
        if size < 1 or value % size:
            raise ModelConfigError(f"{name}={size} does not divide {field}={value}")
    if heads % kv_heads:
        raise ModelConfigError(f"num_key_value_heads={kv_heads} does not divide num_attention_heads={heads}")
    cpu = not torch.cuda.is_available()
    return NPRModelConfig(
        num_layers=layers, hidden_size=cfg["hidden_size"], ffn_hidden_size=cfg["intermediate_size"],
        num_attention_heads=heads, num_query_groups=kv_heads, kv_channels=head_dim,
        normalization="RMSNorm", layernorm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)),
        gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        add_bias_linear=False, add_qkv_bias=False, qk_layernorm=True,
        hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        use_cpu_initialization=cpu, gradient_accumulation_fusion=False,
        bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        bias_dropout_fusion=False, apply_rope_fusion=False,
        mrope_section=[head_dim // 2, 0, 0],  # per-token positions, see models/gpt.py
        init_method_std=float(cfg.get("initializer_range", 0.02)),
        vocab_size=cfg["vocab_size"], rotary_base=_rope_theta(cfg),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 40960)),
        attention_backend_name=attention_backend,
    )
