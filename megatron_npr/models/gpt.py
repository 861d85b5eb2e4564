"""Qwen3 as a Megatron-Core GPTModel whose attention follows the NPR layout.

Per-token rotary positions: GPTModel's plain 'rope' ignores position_ids, so the model uses the
'mrope' route with one section covering all rotary frequencies (mrope_section = [head_dim/2,
0, 0]) and position_ids [3, b, s] with three equal rows: plain RoPE evaluated at the layout's
positions, exact against HF for repeated (branch) positions.
"""
from __future__ import annotations

import copy

import torch
from megatron.core import parallel_state as ps
from megatron.core.distributed import finalize_model_grads
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.enums import AttnMaskType

from .attention import attention_inputs, core_attention_spec, require_backend
from .batch import NPRBatch
from .config import NPRModelConfig


def build_model(config: NPRModelConfig, attention_backend: str | None = None,
                pre_process: bool | None = None, post_process: bool | None = None) -> GPTModel:
    """This rank's pipeline stage of the model (Megatron parallel state must be initialised)."""
    backend = attention_backend or config.attention_backend_name
    require_backend(backend)
    config.attention_backend_name = backend
    if config.finalize_model_grads_func is None:
        # the schedules call it after backward: DP grad sync, tied-embedding sync across PP, and the
        # TP all-reduce of the replicated q/k layernorm grads (each TP rank sees only its heads)
        config.finalize_model_grads_func = finalize_model_grads
    spec = copy.deepcopy(get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm"))
    spec.submodules.self_attention.submodules.core_attention = core_attention_spec(backend)
    spec.submodules.self_attention.params = {"attn_mask_type": AttnMaskType.arbitrary}
    model = GPTModel(
        config=config, transformer_layer_spec=spec, vocab_size=config.vocab_size,
        max_sequence_length=config.max_position_embeddings,
        pre_process=ps.is_pipeline_first_stage() if pre_process is None else pre_process,
        post_process=ps.is_pipeline_last_stage() if post_process is None else post_process,
        share_embeddings_and_output_weights=config.tie_word_embeddings,
        position_embedding_type="mrope", rotary_base=config.rotary_base, parallel_output=True,
    )
    if torch.cuda.is_available():  # the local spec's torch RMSNorm layers are created on the CPU
        model.cuda(torch.cuda.current_device())
    return model


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def model_inputs(model, batch: NPRBatch) -> dict:
    """Keyword arguments of GPTModel.forward for this batch (every pipeline stage needs them)."""
    backend = _unwrap(model).config.attention_backend_name
    return dict(input_ids=batch.tokens, position_ids=batch.position_ids.unsqueeze(0).expand(3, -1, -1),
                attention_mask=attention_inputs(batch, backend))


def forward_logits(model, batch: NPRBatch) -> torch.Tensor:
    """Logits [b, s, vocab/tp] on the last stage (the hidden states elsewhere)."""
    return model(**model_inputs(model, batch))


def token_logprobs(model, batch: NPRBatch) -> torch.Tensor:
    """log p(next token) [b, s] in fp32 on the last pipeline stage, computed with the
    vocab-parallel cross entropy (no gathered logits under TP); elsewhere the stage output.
    Use with `batch.targets()[1]`, which says where a next token counts."""
    targets, _ = batch.targets()
    out = model(**model_inputs(model, batch), labels=targets)
    return -out.float() if ps.is_pipeline_last_stage() else out
