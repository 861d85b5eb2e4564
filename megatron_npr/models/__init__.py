"""Qwen3 on Megatron-Core with the NPR attention layout.

`qwen3_hf` (the HF Qwen3 config, tensor names and shapes) is plain Python and is what checkpoint/
and rollout/ import; the Megatron-Core parts below load on first use, so those imports stay free of
Megatron (seconds of import time, and no Megatron needed to convert or sample).
"""
from importlib import import_module

from .batch import NPRBatch
from .qwen3_hf import ModelConfigError, Qwen3Spec, read_hf_config

_MEGATRON_NAMES = {
    "ATTENTION_BACKENDS": ".config", "NPRModelConfig": ".config", "transformer_config_from_hf": ".config",
    "build_model": ".gpt", "forward_logits": ".gpt", "model_inputs": ".gpt", "token_logprobs": ".gpt",
}


def __getattr__(name: str):
    if name not in _MEGATRON_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_MEGATRON_NAMES[name], __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_MEGATRON_NAMES})


__all__ = ["ATTENTION_BACKENDS", "ModelConfigError", "NPRBatch", "NPRModelConfig", "Qwen3Spec", "build_model",
           "forward_logits", "model_inputs", "read_hf_config", "token_logprobs", "transformer_config_from_hf"]
