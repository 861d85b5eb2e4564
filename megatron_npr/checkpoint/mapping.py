"""Name and layout mapping between HF Qwen3 (`Qwen3ForCausalLM`) and Megatron-Core GPTModel state dicts.

Pure torch: no Megatron import, so conversion tools and tests run anywhere. Every function works on
one layer at a time where it can, so callers can bound memory by one layer. The HF side (config,
tensor names, shapes) is models/qwen3_hf.py; `cfg` arguments take a `Qwen3Spec` or anything
`Qwen3Spec.from_hf_config` reads (a config.json dict, a transformers config, a folder).
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

# CheckpointError lives with the HF format (reading config.json raises it too); importers keep
# getting it from here.
from ..models.qwen3_hf import (
    EMBED as HF_EMBED, FINAL_NORM as HF_FINAL_NORM, LM_HEAD as HF_LM_HEAD, CheckpointError, Qwen3Spec,
    layer_prefix, layer_shapes, nonlayer_shapes,
)

MC_EMBED, MC_FINAL_NORM, MC_OUTPUT = ("embedding.word_embeddings.weight", "decoder.final_layernorm.weight",
                                      "output_layer.weight")

# One-to-one renames inside a layer (HF suffix -> Megatron suffix); qkv and fc1 are fused separately.
_LAYER_RENAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
    "self_attn.q_norm.weight": "self_attention.q_layernorm.weight",
    "self_attn.k_norm.weight": "self_attention.k_layernorm.weight",
    "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
    "mlp.down_proj.weight": "mlp.linear_fc2.weight",
}
_HF_QKV = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")
_HF_GATE_UP = ("mlp.gate_proj.weight", "mlp.up_proj.weight")
_MC_QKV, _MC_FC1 = "self_attention.linear_qkv.weight", "mlp.linear_fc1.weight"


def layer_names_hf(i: int) -> list[str]:
    """Every HF tensor name of decoder layer i."""
    suffixes = [*_LAYER_RENAMES, *_HF_QKV, *_HF_GATE_UP]
    return [layer_prefix(i) + s for s in suffixes]


def layer_names_mcore(i: int) -> list[str]:
    """Every Megatron tensor name of decoder layer i (global index)."""
    suffixes = [*_LAYER_RENAMES.values(), _MC_QKV, _MC_FC1]
    return [f"decoder.layers.{i}.{s}" for s in suffixes]


def _fetch(state: Mapping[str, Tensor], name: str, shape: tuple[int, ...]) -> Tensor:
    if name not in state:
        raise CheckpointError(f"missing tensor {name!r}")
    tensor = state[name]
    if tuple(tensor.shape) != shape:
        raise CheckpointError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {shape}")
    return tensor


def _spec(cfg: Any) -> Qwen3Spec:
    return cfg if isinstance(cfg, Qwen3Spec) else Qwen3Spec.from_hf_config(cfg)


def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, cfg: Any) -> Tensor:
    """Megatron's linear_qkv: per KV group g, the q heads of g, then k_g, then v_g."""
    d = _spec(cfg)
    ng, hd, hidden = d.num_kv_heads, d.head_dim, d.hidden_size
    groups = [q.reshape(ng, d.heads_per_group, hd, hidden), k.reshape(ng, 1, hd, hidden),
              v.reshape(ng, 1, hd, hidden)]
    return torch.cat(groups, dim=1).reshape(-1, hidden)


def split_qkv(qkv: Tensor, cfg: Any) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of fuse_qkv: (q_proj, k_proj, v_proj) weights."""
    d = _spec(cfg)
    ng, per, hd, hidden = d.num_kv_heads, d.heads_per_group, d.head_dim, d.hidden_size
    grouped = qkv.reshape(ng, per + 2, hd, hidden)
    q = grouped[:, :per].reshape(ng * per * hd, hidden)
    k = grouped[:, per].reshape(ng * hd, hidden)
    v = grouped[:, per + 1].reshape(ng * hd, hidden)
    return q, k, v


def hf_layer_to_mcore(hf_state: Mapping[str, Tensor], cfg: Any, i: int) -> dict[str, Tensor]:
    """Megatron tensors of layer i (global index) from an HF state; reads only layer i's names, so a
    lazy Mapping loads just one layer."""
    d = _spec(cfg)
    src, dst = layer_prefix(i), f"decoder.layers.{i}."
    shapes = layer_shapes(d)
    get = lambda suffix: _fetch(hf_state, src + suffix, shapes[suffix])  # noqa: E731
    out = {dst + mc: get(hf) for hf, mc in _LAYER_RENAMES.items()}
    out[dst + _MC_QKV] = fuse_qkv(*(get(s) for s in _HF_QKV), d)
    out[dst + _MC_FC1] = torch.cat([get(s) for s in _HF_GATE_UP], dim=0)
    return out


def mcore_layer_to_hf(mcore_state: Mapping[str, Tensor], cfg: Any, i: int) -> dict[str, Tensor]:
    """HF tensors of layer i from a full (unsharded, global-index) Megatron state."""
    d = _spec(cfg)
    src, dst = f"decoder.layers.{i}.", layer_prefix(i)
    hf_shapes = layer_shapes(d)
    out = {dst + hf: _fetch(mcore_state, src + mc, hf_shapes[hf]) for hf, mc in _LAYER_RENAMES.items()}
    qkv_rows = (d.num_heads + 2 * d.num_kv_heads) * d.head_dim
    qkv = _fetch(mcore_state, src + _MC_QKV, (qkv_rows, d.hidden_size))
    for name, tensor in zip(_HF_QKV, split_qkv(qkv, d)):
        out[dst + name] = tensor
    gate, up = _fetch(mcore_state, src + _MC_FC1, (2 * d.intermediate_size, d.hidden_size)).chunk(2, dim=0)
    out[dst + _HF_GATE_UP[0]], out[dst + _HF_GATE_UP[1]] = gate, up
    return out


def hf_nonlayer_to_mcore(hf_state: Mapping[str, Tensor], cfg: Any) -> dict[str, Tensor]:
    """Embedding, final norm and (untied only) output layer."""
    d = _spec(cfg)
    shapes = nonlayer_shapes(d)
    embed = _fetch(hf_state, HF_EMBED, shapes[HF_EMBED])
    out = {MC_EMBED: embed, MC_FINAL_NORM: _fetch(hf_state, HF_FINAL_NORM, shapes[HF_FINAL_NORM])}
    if not d.tie_word_embeddings:
        out[MC_OUTPUT] = _fetch(hf_state, HF_LM_HEAD, shapes[HF_LM_HEAD])
    elif HF_LM_HEAD in hf_state and not torch.equal(hf_state[HF_LM_HEAD], embed):
        raise CheckpointError(f"tie_word_embeddings is true but {HF_LM_HEAD!r} differs from {HF_EMBED!r}")
    return out


def mcore_nonlayer_to_hf(mcore_state: Mapping[str, Tensor], cfg: Any) -> dict[str, Tensor]:
    """Inverse of hf_nonlayer_to_mcore; a tied model gets no lm_head (as save_pretrained writes it)."""
    d = _spec(cfg)
    shapes = nonlayer_shapes(d)
    embed = _fetch(mcore_state, MC_EMBED, shapes[HF_EMBED])
    out = {HF_EMBED: embed, HF_FINAL_NORM: _fetch(mcore_state, MC_FINAL_NORM, shapes[HF_FINAL_NORM])}
    if not d.tie_word_embeddings:
        out[HF_LM_HEAD] = _fetch(mcore_state, MC_OUTPUT, shapes[HF_LM_HEAD])
    # With pp > 1 and tied weights the last stage keeps a synced copy; a diverged copy means a bug.
    elif MC_OUTPUT in mcore_state and not torch.equal(mcore_state[MC_OUTPUT], embed):
        raise CheckpointError(f"tie_word_embeddings is true but {MC_OUTPUT!r} differs from {MC_EMBED!r}")
    return out


def hf_to_mcore(hf_state: Mapping[str, Tensor], cfg: Any) -> dict[str, Tensor]:
    """Full (unsharded, global layer index) Megatron GPTModel state dict from an HF Qwen3 state."""
    d = _spec(cfg)
    out = hf_nonlayer_to_mcore(hf_state, d)
    for i in range(d.num_layers):
        out.update(hf_layer_to_mcore(hf_state, d, i))
    return out


def mcore_to_hf(mcore_state: Mapping[str, Tensor], cfg: Any) -> dict[str, Tensor]:
    """Exact inverse of hf_to_mcore."""
    d = _spec(cfg)
    out = mcore_nonlayer_to_hf(mcore_state, d)
    for i in range(d.num_layers):
        out.update(mcore_layer_to_hf(mcore_state, d, i))
    return out


_TP_ROWS = ("self_attention.linear_qkv.weight", "word_embeddings.weight", "output_layer.weight")
_TP_COLS = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")
_TP_FC1 = "mlp.linear_fc1.weight"


def tp_split_kind(name: str) -> str:
    """'rows', 'cols', 'fc1' or 'replicated' for a Megatron parameter name."""
    if name.endswith(_TP_ROWS):
        return "rows"
    if name.endswith(_TP_COLS):
        return "cols"
    if name.endswith(_TP_FC1):
        return "fc1"
    # Qwen3 dense has no biases; replicating a parallel layer's bias would be silently wrong.
    if name.endswith(".bias"):
        raise CheckpointError(f"no tensor-parallel rule for bias {name!r}")
    return "replicated"


def _chunks(name: str, tensor: Tensor, parts: int, dim: int) -> tuple[Tensor, ...]:
    if tensor.dim() <= dim or tensor.shape[dim] % parts != 0:
        raise CheckpointError(f"{name!r} with shape {tuple(tensor.shape)} cannot be split into {parts} "
                              f"equal parts along dim {dim}")
    return tensor.chunk(parts, dim=dim)


def shard_for_tp(name: str, full: Tensor, tp: int, rank: int) -> Tensor:
    """The slice of `full` that tensor-parallel rank `rank` of `tp` holds."""
    if tp < 1 or not 0 <= rank < tp:
        raise CheckpointError(f"bad tensor-parallel rank {rank} of {tp}")
    kind = tp_split_kind(name)
    if kind == "rows":
        return _chunks(name, full, tp, 0)[rank]
    if kind == "cols":
        return _chunks(name, full, tp, 1)[rank]
    if kind == "fc1":
        # Megatron's fc1 shard is [gate_r; up_r], so SwiGLU can split it locally in halves.
        gate, up = _chunks(name, full, 2, 0)
        return torch.cat([_chunks(name, gate, tp, 0)[rank], _chunks(name, up, tp, 0)[rank]], dim=0)
    return full


def unshard_tp(name: str, shards: Sequence[Tensor]) -> Tensor:
    """Inverse of shard_for_tp: the full tensor from all tp shards, in rank order."""
    if not shards:
        raise CheckpointError(f"no shards given for {name!r}")
    kind = tp_split_kind(name)
    if kind == "rows":
        return torch.cat(list(shards), dim=0)
    if kind == "cols":
        return torch.cat(list(shards), dim=1)
    if kind == "fc1":
        halves = [_chunks(name, shard, 2, 0) for shard in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    if any(not torch.equal(shards[0], s) for s in shards[1:]):
        raise CheckpointError(f"replicated tensor {name!r} differs between tensor-parallel ranks")
    return shards[0]


_LAYER_NAME = re.compile(r"^decoder\.layers\.(\d+)\.")


def stage_layers(num_layers: int, pp: int, stage: int) -> range:
    """Global indices of the layers that pipeline stage `stage` of `pp` holds (even split)."""
    if pp < 1 or num_layers % pp != 0:
        raise CheckpointError(f"{num_layers} layers cannot be split evenly into {pp} pipeline stages")
    if not 0 <= stage < pp:
        raise CheckpointError(f"bad pipeline stage {stage} of {pp}")
    per_stage = num_layers // pp
    return range(stage * per_stage, (stage + 1) * per_stage)


def layer_index(name: str) -> int | None:
    """The layer index in a Megatron name, or None for non-layer names."""
    match = _LAYER_NAME.match(name)
    return int(match.group(1)) if match else None


def _with_layer(name: str, index: int) -> str:
    return _LAYER_NAME.sub(f"decoder.layers.{index}.", name, count=1)


def local_to_global_name(name: str, stage: int, num_layers: int, pp: int) -> str:
    """Stage-local Megatron name -> global name; non-layer names are unchanged."""
    layers = stage_layers(num_layers, pp, stage)
    local = layer_index(name)
    if local is None:
        return name
    if local >= len(layers):
        raise CheckpointError(f"{name!r}: stage {stage} holds only {len(layers)} layers")
    return _with_layer(name, layers.start + local)


def global_to_local_name(name: str, stage: int, num_layers: int, pp: int) -> str:
    """Global Megatron name -> the name inside stage `stage`; the layer must belong to that stage."""
    layers = stage_layers(num_layers, pp, stage)
    index = layer_index(name)
    if index is None:
        return name
    if index not in layers:
        raise CheckpointError(f"{name!r}: layer {index} is not on pipeline stage {stage} "
                              f"(layers {layers.start}..{layers.stop - 1})")
    return _with_layer(name, index - layers.start)


def stage_of_layer(index: int, num_layers: int, pp: int) -> int:
    """The pipeline stage that holds global layer `index`."""
    if not 0 <= index < num_layers:
        raise CheckpointError(f"layer {index} is out of range for {num_layers} layers")
    return index // len(stage_layers(num_layers, pp, 0))


def check_parallel_sizes(cfg: Any, tp: int, pp: int = 1) -> None:
    """Raise CheckpointError unless tp and pp split this model the way Megatron needs: whole KV
    groups and heads per tensor-parallel rank, and an even layer split across pipeline stages."""
    d = _spec(cfg)
    sizes = {"num_key_value_heads": d.num_kv_heads, "num_attention_heads": d.num_heads,
             "intermediate_size": d.intermediate_size, "vocab_size": d.vocab_size}
    for field, size in sizes.items():
        if tp < 1 or size % tp != 0:
            raise CheckpointError(f"{field}={size} is not divisible by tensor-parallel size {tp}")
    stage_layers(d.num_layers, pp, 0)
