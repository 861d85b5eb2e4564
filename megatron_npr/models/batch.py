"""A batch of packed NPR rows, as the model consumes it."""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Sequence

import torch

from ..topology import Layout, PackedRow
from ..topology.packing import combine_extras


@dataclass
class NPRBatch:
    tokens: torch.Tensor  # [b, s] int64
    position_ids: torch.Tensor  # [b, s] int64
    doc_start: torch.Tensor  # [b, s] int64
    hole_lo: torch.Tensor  # [b, D, s] int64
    hole_hi: torch.Tensor  # [b, D, s] int64
    loss_mask: torch.Tensor  # [b, s] bool: tokens that are trained on
    doc_offsets: list[tuple[int, ...]]  # per row, cu_seqlens style
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # [b, s] per-token fields of the rows

    @classmethod
    def from_rows(cls, rows: Sequence[PackedRow], length: int | None = None, pad_id: int = 0) -> "NPRBatch":
        """Stack packed rows, padding each to `length` (default: the longest) with its own
        no-loss document."""
        if not rows:
            raise ValueError("NPRBatch.from_rows needs at least one row")
        length = length or max(r.num_tokens for r in rows)
        depth = max(r.layout.depth for r in rows)
        rows = [r.pad_to(length, pad_id) for r in rows]
        layouts = [r.layout.with_depth(depth) for r in rows]
        return cls(torch.stack([r.token_ids for r in rows]),
                   torch.stack([lay.position_ids for lay in layouts]),
                   torch.stack([lay.doc_start for lay in layouts]),
                   torch.stack([lay.hole_lo for lay in layouts]),
                   torch.stack([lay.hole_hi for lay in layouts]),
                   torch.stack([r.loss_mask for r in rows]),
                   [r.doc_offsets for r in rows],
                   combine_extras([(r.extras, r.num_tokens) for r in rows], torch.stack))

    def to(self, device) -> "NPRBatch":
        """The same batch with every tensor on `device` (extras included)."""
        move = {f.name: getattr(self, f.name).to(device) for f in fields(self) if isinstance(getattr(self, f.name),
                                                                                             torch.Tensor)}
        return replace(self, **move, extras={k: v.to(device) for k, v in self.extras.items()})

    def layout(self, row: int) -> Layout:
        return Layout(self.position_ids[row], self.doc_start[row], self.hole_lo[row], self.hole_hi[row])

    def dense_mask(self) -> torch.Tensor:
        """bool [b, s, s], True = visible."""
        return torch.stack([self.layout(i).dense_mask() for i in range(self.tokens.shape[0])])

    def targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token ids [b, s] and where they count [b, s]: the next token must exist, be in
        the same document, and be trained on."""
        nxt = torch.zeros_like(self.tokens)
        nxt[:, :-1] = self.tokens[:, 1:]
        valid = torch.zeros_like(self.loss_mask)
        valid[:, :-1] = self.loss_mask[:, 1:] & (self.doc_start[:, 1:] == self.doc_start[:, :-1])
        return nxt, valid

