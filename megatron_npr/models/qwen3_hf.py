"""The HF Qwen3 dense format in one place: config.json, tensor names and tensor shapes.

The Megatron config (models/config.py), the checkpoint mapping (checkpoint/mapping.py) and the
rollout engine's weight loader (rollout/qwen3_torch.py) all read a config through `Qwen3Spec`
and check tensors against `tensor_shapes`, so they accept and reject exactly the same models.
Plain Python (no torch, no Megatron): the lower layers import it without cost.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

QWEN3_ARCHITECTURE = "Qwen3ForCausalLM"

EMBED, FINAL_NORM, LM_HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"


class ModelConfigError(ValueError):
    """An architecture or parallel layout we cannot build; the message names the field."""


class CheckpointError(ValueError):
    """A checkpoint is missing a tensor, has a wrong shape, or cannot be read or written."""


def read_hf_config(src: Any) -> dict:
    """An HF Qwen3 config as a plain dict, from a dict, a transformers config object, or a model
    folder (or its config.json). A folder is checked to really hold a Qwen3 dense model."""
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        return _read_config_json(path.parent if path.name.endswith(".json") else path)
    if isinstance(src, Mapping):
        return dict(src)
    if hasattr(src, "to_dict"):
        return src.to_dict()
    raise ModelConfigError(f"cannot read a model config from {type(src).__name__}")


def _read_config_json(folder: Path) -> dict:
    if not folder.is_dir():
        raise CheckpointError(f"HF model folder {folder} does not exist")
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} not found: not an HF model folder")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    model_type, architectures = config.get("model_type"), config.get("architectures") or []
    if model_type != "qwen3" or QWEN3_ARCHITECTURE not in architectures:
        raise CheckpointError(f"{path}: found model_type={model_type!r}, architectures={architectures!r}; "
                              f"only Qwen3 dense models ({QWEN3_ARCHITECTURE}, model_type 'qwen3') "
                              f"are supported")
    return config


@dataclass(frozen=True)
class Qwen3Spec:
    """The dimensions of a Qwen3 dense model, as every part of the project reads them."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool

    def __post_init__(self):
        if self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads:
            raise ModelConfigError(f"num_key_value_heads={self.num_kv_heads} does not divide "
                                   f"num_attention_heads={self.num_heads}")
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ModelConfigError(f"head_dim={self.head_dim} must be positive and even for RoPE")

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf_config(cls, src: Any) -> Qwen3Spec:
        """From anything `read_hf_config` reads (transformers 4 or 5 layout). Whatever this model
        family could mean but we do not implement is refused, since it would silently differ."""
        cfg = read_hf_config(src)
        _check_supported(cfg)
        hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
        return cls(vocab_size=cfg["vocab_size"], hidden_size=hidden, intermediate_size=cfg["intermediate_size"],
                   num_layers=cfg["num_hidden_layers"], num_heads=heads,
                   num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                   head_dim=int(cfg.get("head_dim") or hidden // heads),
                   rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=_rope_theta(cfg),
                   tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)))


def _check_supported(cfg: dict) -> None:
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


def _rope_theta(cfg: dict) -> float:
    """The RoPE base: `rope_parameters.rope_theta` (transformers 5) or `rope_theta` (4).

    A missing base is an error, not a default: transformers falls back to 10000 while released
    Qwen3 checkpoints use 1e6, and either guess would give plausible but wrong logits."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise ModelConfigError(f"rope scaling {kind!r} is not supported (only plain RoPE)")
    theta = params.get("rope_theta", cfg.get("rope_theta"))
    if theta is None:
        raise ModelConfigError("config field rope_theta is missing (transformers 5 writes it as "
                               "rope_parameters.rope_theta); the RoPE base is not guessed")
    return float(theta)


# ---- tensor names and shapes ---------------------------------------------------------------------

def layer_prefix(i: int) -> str:
    """The HF name prefix of decoder layer i's tensors."""
    return f"model.layers.{i}."


def layer_shapes(spec: Qwen3Spec) -> dict[str, tuple[int, ...]]:
    """Every tensor of one decoder layer, by name after `layer_prefix(i)`, with its shape."""
    h, d, ffn = spec.hidden_size, spec.head_dim, spec.intermediate_size
    q_rows, kv_rows = spec.num_heads * d, spec.num_kv_heads * d
    return {
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q_rows, h), "self_attn.k_proj.weight": (kv_rows, h),
        "self_attn.v_proj.weight": (kv_rows, h), "self_attn.o_proj.weight": (h, q_rows),
        "self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,),
        "mlp.gate_proj.weight": (ffn, h), "mlp.up_proj.weight": (ffn, h), "mlp.down_proj.weight": (h, ffn),
    }


def nonlayer_shapes(spec: Qwen3Spec) -> dict[str, tuple[int, ...]]:
    """Embedding, final norm and, when the embeddings are untied, the output head."""
    shapes = {EMBED: (spec.vocab_size, spec.hidden_size), FINAL_NORM: (spec.hidden_size,)}
    if not spec.tie_word_embeddings:  # a tied checkpoint may still list lm_head: a copy of EMBED
        shapes[LM_HEAD] = (spec.vocab_size, spec.hidden_size)
    return shapes


def tensor_shapes(spec: Qwen3Spec) -> dict[str, tuple[int, ...]]:
    """Every tensor of the model by full HF name: embedding and norm, the layers, then lm_head."""
    outside = nonlayer_shapes(spec)
    shapes = {name: outside.pop(name) for name in (EMBED, FINAL_NORM)}
    per_layer = layer_shapes(spec)
    for i in range(spec.num_layers):
        shapes.update({layer_prefix(i) + name: shape for name, shape in per_layer.items()})
    return {**shapes, **outside}
