"""HF Qwen3 <-> Megatron-Core checkpoint mapping and HF folder I/O."""
from ..io import atomic_output_dir
from ..models.qwen3_hf import read_hf_config
from .hf_io import HFWeights, open_hf_weights, write_hf_weights
from .mapping import (
    CheckpointError, check_parallel_sizes, fuse_qkv, global_to_local_name, hf_layer_to_mcore,
    hf_nonlayer_to_mcore, hf_to_mcore, layer_index, layer_names_hf, layer_names_mcore, local_to_global_name,
    mcore_layer_to_hf, mcore_nonlayer_to_hf, mcore_to_hf, shard_for_tp, split_qkv, stage_layers,
    stage_of_layer, tp_split_kind, unshard_tp,
)

__all__ = [
    "CheckpointError", "HFWeights", "atomic_output_dir", "check_parallel_sizes",
    "fuse_qkv", "global_to_local_name", "hf_layer_to_mcore", "hf_nonlayer_to_mcore", "hf_to_mcore",
    "layer_index", "layer_names_hf", "layer_names_mcore", "local_to_global_name",
    "mcore_layer_to_hf", "mcore_nonlayer_to_hf", "mcore_to_hf", "open_hf_weights",
    "read_hf_config", "shard_for_tp", "split_qkv", "stage_layers", "stage_of_layer",
    "tp_split_kind", "unshard_tp", "write_hf_weights",
]
