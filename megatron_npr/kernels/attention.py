"""Attention over NPR layouts: FlexAttention with an exact block mask, fused Triton kernels
(`backend="triton"`, sources in the repository's kernels/ folder), and a dense reference.

Visibility comes from the compact arrays of the topology module: key k is visible to query q iff
doc_start[q] <= k <= q and k lies in none of q's holes [hole_lo[d, q], hole_hi[d, q]).

The flex path never builds an s x s tensor: the BlockMask is classified tile by tile (empty /
partial / full) from chunks of query rows, and the fused kernel evaluates `mask_mod` only on
partial tiles. Shapes are bucketed: a row is padded to a multiple of `BUCKET` tokens with a
padding document (attends only to itself), so a compiled kernel is reused for every length in
its bucket; each bucket compiles once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

BLOCK = 128  # FlexAttention's tile size
BUCKET = 1024  # sequence lengths are padded up to a multiple of this
ROW_CHUNK = 2048  # query rows classified at once: ROW_CHUNK x s booleans of scratch memory


@dataclass
class AttentionLayout:
    """Compact visibility arrays of a batch of packed rows, on the attention's device."""
    doc_start: torch.Tensor  # [b, s]
    hole_lo: torch.Tensor  # [b, D, s]
    hole_hi: torch.Tensor  # [b, D, s]

    @classmethod
    def from_layouts(cls, layouts: Sequence, device=None) -> "AttentionLayout":
        depth = max(lay.depth for lay in layouts)
        layouts = [lay.with_depth(depth) for lay in layouts]
        return cls(*(torch.stack([getattr(lay, n) for lay in layouts]).to(device)
                     for n in ("doc_start", "hole_lo", "hole_hi")))

    @property
    def shape(self) -> tuple[int, int, int]:
        b, d, s = self.hole_lo.shape
        return b, d, s

    def visible(self, rows: slice | None = None) -> torch.Tensor:
        """bool [b, r, s]: which keys the query rows in `rows` see (all rows by default)."""
        b, depth, s = self.shape
        rows = rows or slice(0, s)
        q = torch.arange(s, device=self.doc_start.device)[rows].view(1, -1, 1)
        k = torch.arange(s, device=self.doc_start.device).view(1, 1, -1)
        vis = (k <= q) & (k >= self.doc_start[:, rows, None])
        for d in range(depth):
            vis &= ~((k >= self.hole_lo[:, d, rows, None]) & (k < self.hole_hi[:, d, rows, None]))
        return vis

    def padded(self, length: int) -> "AttentionLayout":
        """Append one padding document so the rows are `length` long."""
        b, depth, s = self.shape
        extra = length - s
        if extra <= 0:
            return self
        idx = torch.arange(s, length, device=self.doc_start.device).expand(b, -1)
        return AttentionLayout(torch.cat([self.doc_start, torch.full_like(idx, s)], 1),
                               torch.cat([self.hole_lo, idx[:, None].expand(b, depth, extra)], 2),
                               torch.cat([self.hole_hi, idx[:, None].expand(b, depth, extra)], 2))


def bucket_length(s: int, bucket: int = BUCKET) -> int:
    return -(-s // bucket) * bucket


def npr_mask_mod(layout: AttentionLayout):
    """FlexAttention mask_mod over the compact arrays (nesting levels unrolled at trace time)."""
    doc_start, lo, hi = layout.doc_start, layout.hole_lo, layout.hole_hi
    depth = lo.shape[1]

    def mask_mod(b, h, q, k):
        vis = (k <= q) & (k >= doc_start[b, q])
        for d in range(depth):
            vis = vis & ~((k >= lo[b, d, q]) & (k < hi[b, d, q]))
        return vis

    return mask_mod


def _tile_lists(flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[b, nq, nkv] bool -> (count [b, 1, nq], indices [b, 1, nq, nkv]) with flagged tiles first."""
    count = flags.sum(-1, dtype=torch.int32)
    order = torch.argsort((~flags).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return count[:, None], order[:, None]


def classify_tiles(layout: AttentionLayout, block: int = BLOCK,
                   row_chunk: int = ROW_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """(any visible, all visible) per tile, bool [b, s/block, s/block], from `row_chunk` query
    rows at a time (rounded down to whole tiles): scratch memory is row_chunk x s, never s x s."""
    b, _, s = layout.shape
    if s % block:
        raise ValueError(f"sequence length {s} must be a multiple of the block size {block} (pad it)")
    n = s // block
    any_vis = torch.zeros(b, n, n, dtype=torch.bool, device=layout.doc_start.device)
    all_vis = torch.zeros_like(any_vis)
    chunk = max(block, row_chunk // block * block)
    for start in range(0, s, chunk):
        vis = layout.visible(slice(start, min(s, start + chunk))).view(b, -1, block, n, block)
        rows = slice(start // block, start // block + vis.shape[1])
        any_vis[:, rows] = vis.any(4).any(2)
        all_vis[:, rows] = vis.all(4).all(2)
    return any_vis, all_vis


def build_block_mask(layout: AttentionLayout, block: int = BLOCK, row_chunk: int = ROW_CHUNK):
    """Exact FlexAttention BlockMask: a tile is full if every pair in it is visible, empty if
    none is, partial otherwise; the kernel evaluates mask_mod only on partial tiles."""
    from torch.nn.attention.flex_attention import BlockMask

    any_vis, all_vis = classify_tiles(layout, block, row_chunk)
    partial_n, partial_idx = _tile_lists(any_vis & ~all_vis)
    full_n, full_idx = _tile_lists(all_vis)
    return BlockMask.from_kv_blocks(kv_num_blocks=partial_n, kv_indices=partial_idx, full_kv_num_blocks=full_n,
                                    full_kv_indices=full_idx, BLOCK_SIZE=block, mask_mod=npr_mask_mod(layout))


@dataclass
class FlexInputs:
    """What one batch needs for the flex path; built once, shared by every layer."""
    layout: AttentionLayout  # unpadded
    block_mask: object  # covers the bucketed length
    length: int  # the bucketed length


def prepare_flex(layout: AttentionLayout, bucket: int = BUCKET, row_chunk: int = ROW_CHUNK) -> FlexInputs:
    length = bucket_length(layout.shape[2], bucket)
    return FlexInputs(layout, build_block_mask(layout.padded(length), row_chunk=row_chunk), length)


_COMPILED = {}


def _flex(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention
    if not compiled:
        return flex_attention
    if "flex" not in _COMPILED:
        _COMPILED["flex"] = torch.compile(flex_attention, dynamic=False)
    return _COMPILED["flex"]


def npr_attention(q, k, v, layout: AttentionLayout | FlexInputs, backend: str = "flex", scale: float | None = None,
                  compiled: bool = True) -> torch.Tensor:
    """Attention of packed NPR rows. q [b, s, hq, d], k/v [b, s, hkv, d] (hq a multiple of
    hkv: GQA) -> [b, s, hq, d]. Pass `prepare_flex(layout)` instead of the layout to reuse one
    block mask across layers (flex)."""
    prepared = layout if isinstance(layout, FlexInputs) else None
    layout = prepared.layout if prepared else layout
    b, s, hq, d = q.shape
    if k.shape != v.shape or k.shape[:2] != (b, s) or hq % k.shape[2] or layout.shape[::2] != (b, s):
        raise ValueError(f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} and layout "
                         f"{layout.shape} do not fit [b, s, h, d] with GQA")
    gqa = hq != k.shape[2]
    if backend == "sdpa":
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=layout.visible()[:, None], scale=scale, enable_gqa=gqa)
        return out.transpose(1, 2)
    if backend == "triton":  # fused Triton kernels (kernels/npr_flash_attention.py); forward and backward
        from .triton_sources import load
        return load("npr_flash_attention").npr_flash_attention(q, k, v, layout, scale=scale)
    if backend != "flex":
        raise ValueError(f"npr_attention backend {backend!r}; choose 'flex', 'triton' or 'sdpa'")
    prepared = prepared or prepare_flex(layout)
    pad = prepared.length - s
    q, k, v = (F.pad(t, (0, 0, 0, 0, 0, pad)).transpose(1, 2) for t in (q, k, v))
    out = _flex(compiled)(q, k, v, block_mask=prepared.block_mask, scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2)[:, :s]
