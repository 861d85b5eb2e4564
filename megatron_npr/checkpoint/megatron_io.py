"""Moving weights in and out of a (TP/PP-sharded) Megatron model.

HF weights enter one layer at a time: this rank converts the layer to Megatron layout, keeps its
tensor-parallel shard and drops the rest. They leave the same way in reverse (`hf_buckets`): per
layer, the holding stage joins its TP shards, sends the layer to global rank 0, and rank 0 maps it
to HF names; so an export needs neither a checkpoint nor a second process, on any layout.
Distributed checkpoints (Megatron dist_checkpointing) store global tensors with their offsets, so
they load at any other TP/PP.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import torch
from torch import Tensor

from .mapping import (CheckpointError, hf_layer_to_mcore, hf_nonlayer_to_mcore, layer_index, local_to_global_name,
                      mcore_layer_to_hf, mcore_nonlayer_to_hf, shard_for_tp, tp_split_kind, unshard_tp)

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


# ---- export: the whole model as HF tensors, gathered in process over TP and PP ------------------

@dataclass(frozen=True)
class _Piece:
    """One Megatron tensor of the export plan: which stage holds it, its TP-gathered shape."""
    name: str  # global Megatron name
    stage: int
    shape: tuple[int, ...]
    dtype: torch.dtype


def _tp_gathered_shape(name: str, shape: torch.Size, tp: int) -> tuple[int, ...]:
    kind = tp_split_kind(name)  # how unshard_tp will join the shards
    if kind == "replicated":
        return tuple(shape)
    dim = 1 if kind == "cols" else 0
    return tuple(n * tp if d == dim else n for d, n in enumerate(shape))


def _stage_tensors(model, hf_config: dict) -> dict[str, Tensor]:
    """This rank's weights by global name. With tied embeddings the last stage's output layer is a
    copy Megatron keeps in sync with the embedding, and HF has no lm_head: it is left out."""
    _, _, pp, stage = _parallel_coords()
    num_layers = hf_config["num_hidden_layers"]
    tied = bool(hf_config.get("tie_word_embeddings", False))
    return {local_to_global_name(n, stage, num_layers, pp): t.detach() for n, t in _local_params(model).items()
            if not (tied and n == "output_layer.weight")}


def _export_plan(local: dict[str, Tensor]) -> list[list[_Piece]]:
    """Every stage's tensors, grouped into the units the HF mapping converts: the non-layer tensors
    (embedding on the first stage, final norm and output layer on the last), then layer by layer."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    tp, _, pp, stage = _parallel_coords()
    mine = [_Piece(n, stage, _tp_gathered_shape(n, t.shape, tp), t.dtype) for n, t in sorted(local.items())]
    stages = [None] * pp
    dist.all_gather_object(stages, mine, group=ps.get_pipeline_model_parallel_group())
    units: dict[int | None, list[_Piece]] = {}
    for piece in (p for pieces in stages for p in pieces):
        units.setdefault(layer_index(piece.name), []).append(piece)
    return [units[i] for i in sorted(units, key=lambda i: -1 if i is None else i)]


def _join_tp_shards(name: str, shard: Tensor) -> Tensor | None:
    """Collective over this rank's TP group: the full tensor on its first TP rank, None elsewhere."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    tp, tp_rank, _, _ = _parallel_coords()
    if tp == 1:
        return shard
    group = ps.get_tensor_model_parallel_group()
    shards = [torch.empty_like(shard) for _ in range(tp)] if tp_rank == 0 else None
    dist.gather(shard.contiguous(), shards, dst=dist.get_global_rank(group, 0), group=group)
    return unshard_tp(name, shards) if tp_rank == 0 else None


def _gather_piece(piece: _Piece, local: dict[str, Tensor]) -> Tensor | None:
    """Collective over the holding stage and global rank 0: the full tensor on global rank 0 (the
    first TP rank of the first stage), None elsewhere. The holding stage joins its TP shards on its
    first TP rank, which sends the result to rank 0 unless it is rank 0."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    _, tp_rank, _, stage = _parallel_coords()
    full = _join_tp_shards(piece.name, local[piece.name]) if piece.stage == stage else None
    if tp_rank != 0 or piece.stage == 0:
        return full
    pp_group = ps.get_pipeline_model_parallel_group()
    if stage == 0:
        full = torch.empty(piece.shape, dtype=piece.dtype)
        dist.recv(full, src=dist.get_global_rank(pp_group, piece.stage))
    elif stage == piece.stage:
        dist.send(full.contiguous(), dst=dist.get_global_rank(pp_group, 0))
        full = None
    return full


def export_hf_from_model(model, hf_config: dict) -> Iterator[tuple[str, Tensor]]:
    """HF (name, tensor) pairs of the whole model on any TP/PP layout, one layer at a time.

    Collective: every rank must run the iterator to its end. The pairs come out on global rank 0
    only (other ranks yield nothing); the first data-parallel replica does the gathering and the
    other replicas, which hold the same weights, just return. Bitwise the weights of this model."""
    from megatron.core import parallel_state as ps

    if ps.get_data_parallel_rank(with_context_parallel=True) != 0:
        return
    local = _stage_tensors(model, hf_config)
    for unit in _export_plan(local):
        full = {piece.name: _gather_piece(piece, local) for piece in unit}
        if any(t is None for t in full.values()):
            continue  # not global rank 0
        i = layer_index(unit[0].name)
        hf = mcore_nonlayer_to_hf(full, hf_config) if i is None else mcore_layer_to_hf(full, hf_config, i)
        yield from hf.items()


def hf_buckets(model, hf_config: dict, bucket_bytes: int = 512 * 2**20) -> Iterator[list[tuple[str, Tensor]]]:
    """`export_hf_from_model` grouped into lists of at most `bucket_bytes` (a larger tensor gets a
    list of its own), in the same order. Collective, and non-empty on global rank 0 only."""
    bucket, size = [], 0
    for name, tensor in export_hf_from_model(model, hf_config):
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


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
