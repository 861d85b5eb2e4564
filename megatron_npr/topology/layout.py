"""Positions and the attention mask of NPR sequences, in compact and dense form.

Compact form (what kernels consume): per token `doc_start` and, per nesting level d, a hole
`[hole_lo[d], hole_hi[d])`. Key k is visible to query q iff

    doc_start[q] <= k <= q   and   k is in none of q's holes.

A branch token's hole at its level is its earlier sibling branches: `[first <step>, own <step>)`.
Every other hole is empty, stored as lo == hi == q, so a flat layout is always the two key
ranges `[doc_start, lo)` and `[hi, q]`.

Positions: let g be the position of the last token before a block's first `<step>`; every
branch starts at g+1, `<takeaway>` gets g+1+(longest branch's position span) and everything
after continues from there. A packed row restarts positions at 0 in each document.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .grammar import Block, Structure, parse_structure
from .tags import TagIds


@dataclass(frozen=True)
class Layout:
    position_ids: torch.Tensor  # [L] int64
    doc_start: torch.Tensor  # [L] int64, index of the first token of the token's document
    hole_lo: torch.Tensor  # [D, L] int64
    hole_hi: torch.Tensor  # [D, L] int64

    def __post_init__(self):
        L = self.position_ids.shape[0]
        if self.doc_start.shape != (L,) or self.hole_lo.shape != self.hole_hi.shape or \
                self.hole_lo.dim() != 2 or self.hole_lo.shape[1] != L:
            raise ValueError(f"Layout shapes disagree: positions {tuple(self.position_ids.shape)}, "
                             f"doc_start {tuple(self.doc_start.shape)}, holes {tuple(self.hole_lo.shape)}"
                             f"/{tuple(self.hole_hi.shape)}")

    @property
    def num_tokens(self) -> int:
        return self.position_ids.shape[0]

    @property
    def depth(self) -> int:
        return self.hole_lo.shape[0]

    def dense_mask(self) -> torch.Tensor:
        """bool [L, L]: True where query row q may attend key column k (the reference), on the
        layout's device."""
        L, device = self.num_tokens, self.doc_start.device
        q = torch.arange(L, device=device).unsqueeze(1)
        k = torch.arange(L, device=device).unsqueeze(0)
        mask = (k <= q) & (k >= self.doc_start.unsqueeze(1))
        for lo, hi in zip(self.hole_lo, self.hole_hi):
            mask &= ~((k >= lo.unsqueeze(1)) & (k < hi.unsqueeze(1)))
        return mask

    def with_depth(self, depth: int) -> "Layout":
        """The same layout with `depth` hole levels (extra levels are empty)."""
        if depth < self.depth:
            raise ValueError(f"cannot shrink a depth-{self.depth} layout to {depth}")
        if depth == self.depth:
            return self
        extra = torch.arange(self.num_tokens).expand(depth - self.depth, -1)
        return Layout(self.position_ids, self.doc_start,
                      torch.cat([self.hole_lo, extra]), torch.cat([self.hole_hi, extra]))

    @classmethod
    def causal(cls, length: int, depth: int = 1) -> "Layout":
        """One plain causal document (e.g. padding)."""
        idx = torch.arange(length)
        return cls(idx.clone(), torch.zeros(length, dtype=torch.long),
                   idx.expand(depth, -1).clone(), idx.expand(depth, -1).clone())

    @classmethod
    def concat(cls, layouts: Sequence["Layout"]) -> "Layout":
        """Documents side by side: each keeps its positions; indices shift by its offset."""
        if not layouts:
            raise ValueError("Layout.concat needs at least one layout")
        depth = max(lay.depth for lay in layouts)
        parts, offset = [], 0
        for lay in layouts:
            lay = lay.with_depth(depth)
            parts.append((lay.position_ids, lay.doc_start + offset, lay.hole_lo + offset, lay.hole_hi + offset))
            offset += lay.num_tokens
        pos, start, lo, hi = zip(*parts)
        return cls(torch.cat(pos), torch.cat(start), torch.cat(lo, 1), torch.cat(hi, 1))


def assign_positions(structure: Structure) -> torch.Tensor:
    """Position id of every token of one document (see the module docstring)."""
    pos = torch.empty(structure.num_tokens, dtype=torch.long)

    def place(lo: int, hi: int, p: int, blocks: Sequence[Block]) -> int:
        """Fill pos[lo:hi] starting at p; return the position after the last token."""
        cur = lo
        for b in blocks:
            first = b.first_step
            pos[cur:first] = torch.arange(p, p + first - cur)
            branch_start = p + first - cur  # = g + 1
            longest = max(place(br.start, br.end, branch_start, br.blocks) - branch_start for br in b.branches)
            p, cur = branch_start + longest, b.branches[-1].end
        pos[cur:hi] = torch.arange(p, p + hi - cur)
        return p + hi - cur

    place(0, structure.num_tokens, 0, structure.blocks)
    return pos


def layout_from_structure(structure: Structure, max_depth: int = 1) -> Layout:
    if structure.depth > max_depth:
        raise ValueError(f"structure has depth {structure.depth} > max_depth {max_depth}")
    L = structure.num_tokens
    lo = torch.arange(L).expand(max_depth, -1).clone()
    hi = lo.clone()
    for b in structure.iter_blocks():
        first = b.first_step
        for br in b.branches:
            lo[b.depth, br.start:br.end] = first
            hi[b.depth, br.start:br.end] = br.start
    return Layout(assign_positions(structure), torch.zeros(L, dtype=torch.long), lo, hi)


def build_layout(token_ids, tags: TagIds, response_start: int = 0, max_depth: int = 1) -> Layout:
    """Positions and compact mask of one sequence (one document); TopologyError if invalid."""
    structure = parse_structure(token_ids, tags, response_start, max_depth)
    return layout_from_structure(structure, max_depth)


def critical_path_length(layout: Layout, response_start: int = 0) -> int:
    """Sequential decode steps a parallel engine needs for the response of a one-document
    layout: the response's position span (branches overlap in position)."""
    if layout.num_tokens <= response_start:
        return 0
    return int(layout.position_ids[-1]) + 1 - response_start
