"""Fused attention for NPR layouts (importable as `megatron_npr.kernels`; not a top-level
`kernels` package, which would clash with an unrelated PyPI package of that name)."""
from .attention import (BLOCK, BUCKET, AttentionLayout, FlexInputs, bucket_length, build_block_mask, classify_tiles,
                            npr_attention, npr_mask_mod, prepare_flex)

__all__ = ["BLOCK", "BUCKET", "AttentionLayout", "FlexInputs", "bucket_length", "build_block_mask", "classify_tiles",
           "npr_attention", "npr_mask_mod", "prepare_flex"]
