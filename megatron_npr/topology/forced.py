"""Which tokens the parallel engine inserts rather than samples.

At each fork the engine writes every branch's `<step>` followed by the ids of `branch_label(j)`;
at each join it writes the block's `<takeaway>`. Those tokens are never sampled, so training must
not treat them as targets (one of the reference defects, DESIGN section 2). Sequential decodes
and SFT text carry the same tokens without saying which ones are inserted: this recovers them
from the structure alone, with the same parser everything else uses.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .grammar import Block, Structure, TopologyError, parse_structure
from .tags import TagIds


def _as_list(token_ids) -> list[int]:
    return token_ids.tolist() if hasattr(token_ids, "tolist") else [int(t) for t in token_ids]


def _check_label(ids: Sequence[int], block: Block, j: int, label: list[int]) -> None:
    """Branch j (1-based) of `block` must open with exactly `label` after its `<step>`, before
    its `</step>`: otherwise the engine could not have produced it."""
    branch = block.branches[j - 1]
    lo, hi = branch.start + 1, branch.start + 1 + len(label)
    found = list(ids[lo:min(hi, branch.end - 1)])
    if hi > branch.end - 1 or found != label:
        raise TopologyError("branch_label", lo, f"branch {j} of the block at token {block.start} starts with "
                                                f"{found}, the engine inserts label {label}")


def engine_inserted_mask(token_ids, tags: TagIds, response_start: int,
                         label_ids: Callable[[int], list[int]], max_depth: int = 1) -> torch.Tensor:
    """bool [n]: True on the tokens the parallel engine inserts (each branch's `<step>` plus
    `label_ids(j)`, each block's `<takeaway>`; nested blocks too). Raises TopologyError for an
    invalid structure, with reason "branch_label" when a branch does not open with its label."""
    ids = _as_list(token_ids)
    return inserted_mask_from_structure(ids, parse_structure(ids, tags, response_start, max_depth), label_ids)


def inserted_mask_from_structure(token_ids, structure: Structure,
                                 label_ids: Callable[[int], list[int]]) -> torch.Tensor:
    """engine_inserted_mask for a sequence already parsed (callers that also build its layout
    parse once)."""
    ids = _as_list(token_ids)
    if len(ids) != structure.num_tokens:
        raise ValueError(f"{len(ids)} token ids for a structure of {structure.num_tokens} tokens")
    mask = torch.zeros(len(ids), dtype=torch.bool)
    labels: dict[int, list[int]] = {}  # label_ids may tokenize; ask once per branch number
    for block in structure.iter_blocks():
        for j, branch in enumerate(block.branches, 1):
            if j not in labels:
                labels[j] = [int(t) for t in label_ids(j)]
            label = labels[j]
            _check_label(ids, block, j, label)
            mask[branch.start:branch.start + 1 + len(label)] = True
        mask[block.takeaway[0]] = True
    return mask
