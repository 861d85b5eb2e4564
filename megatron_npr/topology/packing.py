"""Packing of NPR samples into rows: first-fit-decreasing, per-document layouts concatenated."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from .layout import Layout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackSample:
    token_ids: torch.Tensor  # [n] int64
    loss_mask: torch.Tensor  # [n] bool: True where the token is trained on
    layout: Layout  # one document of n tokens
    # optional per-token fields ([n] each: advantages, rollout log-probs, ...), packed like loss_mask
    extras: Mapping[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class PackedRow:
    token_ids: torch.Tensor  # [L]
    loss_mask: torch.Tensor  # [L] bool
    layout: Layout  # documents concatenated; positions restart at 0 in each
    sample_indices: tuple[int, ...]  # which input samples, in row order (-1 = padding)
    doc_offsets: tuple[int, ...]  # document boundaries, cu_seqlens style: 0, ..., L
    extras: Mapping[str, torch.Tensor] = field(default_factory=dict)  # [L] each; zero on padding

    @property
    def num_tokens(self) -> int:
        return self.token_ids.shape[0]

    def pad_to(self, length: int, pad_id: int) -> "PackedRow":
        """Append padding up to `length` as its own causal document with no loss."""
        extra = length - self.num_tokens
        if extra < 0:
            raise ValueError(f"row has {self.num_tokens} tokens, cannot pad to {length}")
        if extra == 0:
            return self
        return PackedRow(
            torch.cat([self.token_ids, torch.full((extra,), pad_id, dtype=self.token_ids.dtype)]),
            torch.cat([self.loss_mask, torch.zeros(extra, dtype=torch.bool)]),
            Layout.concat([self.layout, Layout.causal(extra, self.layout.depth)]),
            self.sample_indices + (-1,), self.doc_offsets + (length,),
            {k: torch.cat([v, v.new_zeros(extra)]) for k, v in self.extras.items()})


class PackingError(ValueError):
    """Samples that cannot be packed; `.overlong` lists (sample index, length)."""

    def __init__(self, message: str, overlong: Sequence[tuple[int, int]] = ()):
        super().__init__(message)
        self.overlong = list(overlong)


def _as_sample(i: int, s) -> PackSample:
    token_ids, loss_mask, layout = (s.token_ids, s.loss_mask, s.layout) if isinstance(s, PackSample) else s
    extras = dict(s.extras) if isinstance(s, PackSample) else {}
    token_ids = torch.as_tensor(token_ids, dtype=torch.long)
    loss_mask = torch.as_tensor(loss_mask, dtype=torch.bool)
    n = token_ids.shape[0]
    if token_ids.dim() != 1 or loss_mask.shape != (n,) or layout.num_tokens != n:
        raise PackingError(f"sample {i}: token_ids {tuple(token_ids.shape)}, loss_mask {tuple(loss_mask.shape)} "
                           f"and layout ({layout.num_tokens} tokens) must be 1-D and equally long")
    bad = [k for k, v in extras.items() if v.shape != (n,)]
    if bad:
        raise PackingError(f"sample {i}: extras {bad} must be [{n}] like the tokens")
    if n == 0:
        raise PackingError(f"sample {i} is empty")
    return PackSample(token_ids, loss_mask, layout, extras)


def combine_extras(parts: Sequence[tuple[Mapping[str, torch.Tensor], int]],
                   join=torch.cat) -> dict[str, torch.Tensor]:
    """Join per-token extras of several (extras, n_tokens) parts with `join` (cat for documents
    of a row, stack for rows of a batch); a part without a field gets zeros for it."""
    out = {}
    for name in sorted({k for extras, _ in parts for k in extras}):
        like = next(extras[name] for extras, _ in parts if name in extras)
        out[name] = join([extras.get(name, like.new_zeros(n)) for extras, n in parts])
    return out


def _first_fit(lengths: Sequence[int], order: Sequence[int], capacity: int) -> list[list[int]]:
    """Bin of each item placed in `order`: the leftmost bin with room (max segment tree)."""
    size = 1
    while size < max(len(order), 1):
        size *= 2
    room = [capacity] * (2 * size)  # unopened bins have full room, so leftmost == first fit
    bins: list[list[int]] = []
    for i in order:
        need, node = lengths[i], 1
        while node < size:
            node = 2 * node if room[2 * node] >= need else 2 * node + 1
        b = node - size
        if b == len(bins):
            bins.append([])
        bins[b].append(i)
        room[node] -= need
        node //= 2
        while node:
            room[node] = max(room[2 * node], room[2 * node + 1])
            node //= 2
    return bins


def pack(samples: Sequence, max_tokens: int, *, drop_overlong: bool = False) -> list[PackedRow]:
    """First-fit-decreasing packing of (token_ids, loss_mask, layout) samples into rows of at
    most `max_tokens`. A sample longer than that is never cut: PackingError names every such
    sample, or with `drop_overlong=True` they are left out and logged."""
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    items = [_as_sample(i, s) for i, s in enumerate(samples)]
    lengths = [s.token_ids.shape[0] for s in items]
    overlong = [(i, n) for i, n in enumerate(lengths) if n > max_tokens]
    if overlong:
        shown = ", ".join(f"#{i} ({n} tokens)" for i, n in overlong[:10])
        more = f" and {len(overlong) - 10} more" if len(overlong) > 10 else ""
        msg = f"{len(overlong)} sample(s) longer than max_tokens={max_tokens}: {shown}{more}"
        if not drop_overlong:
            raise PackingError(msg, overlong)
        log.warning("dropping %s", msg)
    skip = {i for i, _ in overlong}
    order = sorted((i for i in range(len(items)) if i not in skip), key=lambda i: -lengths[i])
    rows = []
    for members in _first_fit(lengths, order, max_tokens):
        offsets = [0]
        for i in members:
            offsets.append(offsets[-1] + lengths[i])
        rows.append(PackedRow(
            torch.cat([items[i].token_ids for i in members]),
            torch.cat([items[i].loss_mask for i in members]),
            Layout.concat([items[i].layout for i in members]),
            tuple(members), tuple(offsets),
            combine_extras([(items[i].extras, lengths[i]) for i in members])))
    return rows
