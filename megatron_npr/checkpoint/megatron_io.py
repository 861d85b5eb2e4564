"""Moving weights in and out of a (TP/PP-sharded) Megatron model.

HF weights enter one layer at a time: this rank converts the layer to Megatron layout, keeps its
tensor-parallel shard and drops the rest. Distributed checkpoints (Megatron dist_checkpointing)
store global tensors with their offsets, so they load at any other TP/PP.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Mapping

import torch
from torch import Tensor

from .mapping import (CheckpointError, hf_layer_to_mcore, hf_nonlayer_to_mcore, layer_index, local_to_global_name,
                      mcore_layer_to_hf, mcore_nonlayer_to_hf, shard_for_tp)

NPR_META = "npr_checkpoint.json"  # beside the dist checkpoint: the HF config it was made from


def _parallel_coords() -> tuple[int, int, int, int]:
    from megatron.core import parallel_state as ps
    return (ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank(),
            ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank())


def is_weight_name(name: str) -> bool:
    """A real weight of a Megatron state dict (not TE extra state, not the rotary buffer)."""
    return not name.endswith("_extra_state") and "inv_freq" not in name


def _local_params(model) -> dict[str, Tensor]:
    return {n: t for n, t in model.state_dict(keep_vars=True).items() if is_weight_name(n)}


def load_hf_into_model(model, hf_weights: Mapping[str, Tensor], hf_config: dict, progress=None) -> None:
    """Fill this rank's parameters from HF weights (a mapping that may load lazily), holding
    one converted layer at a time. `progress` wraps the layer iterator (e.g. tqdm)."""
    tp, tp_rank, pp, stage = _parallel_coords()
    num_layers = hf_config["num_hidden_layers"]
    tied = bool(hf_config.get("tie_word_embeddings", False))
    groups: dict[int | None, list[tuple[str, str]]] = {}
    for name in _local_params(model):
        gname = local_to_global_name(name, stage, num_layers, pp)
        if name == "output_layer.weight" and tied:  # the last stage's copy of the tied embedding
            gname = "embedding.word_embeddings.weight"
        groups.setdefault(layer_index(gname), []).append((name, gname))
    params = _local_params(model)
    layers = sorted(groups, key=lambda i: -1 if i is None else i)
    with torch.no_grad():
        for i in (progress(layers) if progress else layers):
            full = hf_nonlayer_to_mcore(hf_weights, hf_config) if i is None else hf_layer_to_mcore(hf_weights, hf_config, i)
            for name, gname in groups[i]:
                if gname not in full:
                    raise CheckpointError(f"no weight for Megatron parameter {gname}")
                shard = shard_for_tp(gname, full[gname], tp, tp_rank)
                if shard.shape != params[name].shape:
                    raise CheckpointError(f"{gname}: converted shard {tuple(shard.shape)} does not fit "
                                          f"parameter {tuple(params[name].shape)}")
                params[name].copy_(shard)
            del full


def export_hf_from_model(model, hf_config: dict) -> Iterator[tuple[str, Tensor]]:
    """HF (name, tensor) pairs of an unsharded model (TP=PP=1), one layer at a time."""
    tp, _, pp, _ = _parallel_coords()
    if tp != 1 or pp != 1:
        raise CheckpointError(f"export needs the whole model in one process (tp=pp=1), got tp={tp} pp={pp}")
    state = _local_params(model)
    yield from mcore_nonlayer_to_hf(state, hf_config).items()
    for i in range(hf_config["num_hidden_layers"]):
        prefix = f"decoder.layers.{i}."
        layer = {k: v.detach() for k, v in state.items() if k.startswith(prefix)}
        yield from mcore_layer_to_hf(layer, hf_config, i).items()


def save_dist_checkpoint(model, ckpt_dir: str | Path, hf_config: dict) -> None:
    """Collective: every rank writes its shards; rank 0 writes the HF config beside them."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), str(ckpt_dir))
    if dist.get_rank() == 0:
        (ckpt_dir / NPR_META).write_text(json.dumps({"hf_config": hf_config}, indent=2))
    dist.barrier()


def read_checkpoint_config(ckpt_dir: str | Path) -> dict:
    meta = Path(ckpt_dir) / NPR_META
    if not meta.is_file():
        raise CheckpointError(f"{ckpt_dir} is not a megatron-npr checkpoint (no {NPR_META})")
    try:
        return json.loads(meta.read_text())["hf_config"]
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{meta} is unreadable: {e}") from e


def load_dist_checkpoint(model, ckpt_dir: str | Path) -> None:
    """Collective: load a dist checkpoint written at any TP/PP into this model."""
    from megatron.core import dist_checkpointing

    request = model.sharded_state_dict()
    state = dist_checkpointing.load(request, str(ckpt_dir))
    # a training checkpoint also holds the optimizer and run state: only the model is wanted here
    state = {k: v for k, v in state.items() if k in request}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if is_weight_name(m)]
    if missing or unexpected:
        raise CheckpointError(f"{ckpt_dir}: missing {missing[:5]}, unexpected {list(unexpected)[:5]}")
