"""Qwen3 on Megatron-Core with the NPR attention layout."""
from .batch import NPRBatch
from .config import ATTENTION_BACKENDS, ModelConfigError, NPRModelConfig, transformer_config_from_hf
from .gpt import build_model, forward_logits, model_inputs, token_logprobs

__all__ = ["ATTENTION_BACKENDS", "ModelConfigError", "NPRBatch", "NPRModelConfig", "build_model",
           "forward_logits", "model_inputs", "token_logprobs", "transformer_config_from_hf"]
