"""The NPR topology: the only module that knows the branch grammar.

Rewards, masks, kernels, the rollout engine, PAPO and metrics all call into this package.
"""
from .forced import engine_inserted_mask, inserted_mask_from_structure
from .grammar import (REASONS, Block, Branch, Defect, Structure, TopologyError, find_defects,
                      parse_kinds, parse_structure)
from .layout import Layout, assign_positions, build_layout, critical_path_length, layout_from_structure
from .packing import PackedRow, PackingError, PackSample, pack
from .tags import NPR_TAGS, Kind, TagIds, lex_text
from .text import Canonical, FormatResult, branch_label, canonicalize, format_reward, last_boxed

__all__ = [
    "NPR_TAGS", "Kind", "TagIds", "lex_text",
    "REASONS", "TopologyError", "Defect", "Structure", "Block", "Branch",
    "parse_structure", "parse_kinds", "find_defects",
    "Layout", "build_layout", "layout_from_structure", "assign_positions", "critical_path_length",
    "PackSample", "PackedRow", "PackingError", "pack",
    "engine_inserted_mask", "inserted_mask_from_structure",
    "FormatResult", "format_reward", "last_boxed", "Canonical", "canonicalize", "branch_label",
]
