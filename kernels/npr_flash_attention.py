"""NPR attention as fused Triton kernels (FlashAttention-2 style): forward and backward.

Loaded by path through `megatron_npr.kernels.triton_sources.load("npr_flash_attention")`; this
folder is not a package. Visibility is read from the compact layout arrays (key k is visible to
query q iff doc_start[q] <= k <= q and k lies in none of q's holes [hole_lo[d, q], hole_hi[d, q])):
no s x s tensor and no block mask is ever built.

Tile rule (`_tile_kind`), for query rows R of a tile and keys [k0, k_last] (k_last = k0 + BLOCK_N - 1,
even past the sequence end, which only makes the rule stricter):
- SKIPPED when every row q in R (rows past the end count as done) sees none of the keys, by one
  of: k0 > q; k_last < doc_start[q]; one hole of q covers the whole tile
  (hole_lo[d, q] <= k0 and k_last < hole_hi[d, q]). Each is a sufficient condition, so a tile
  holding a visible pair is never skipped; unions of holes are simply not used.
- UNMASKED when every row q sees every key: k_last <= q, k0 >= doc_start[q], k_last < seq_len,
  and every hole of q is empty or misses the tile.
- MASKED otherwise: the exact mask is evaluated for the tile's pairs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

SKIPPED = tl.constexpr(0)
UNMASKED = tl.constexpr(1)
MASKED = tl.constexpr(2)
NEG_INIT = tl.constexpr(-1.0e30)  # finite running max: a row with no visible key yet gives exp(-inf) = 0, not NaN


@dataclass(frozen=True)
class KernelOptions:
    block_m: int = 64  # query rows per tile
    block_n: int = 64  # keys per tile
    num_warps: int = 4
    ignore_holes: bool = False  # negative control: treat the layout as having no holes
    skip_off_by_one: bool = False  # negative control: the skip rule forgets the tile's last key


@triton.jit
def _tile_kind(start_ptr, lo_ptr, hi_ptr, rows, k0, seq_len,
               BLOCK_N: tl.constexpr, DEPTH: tl.constexpr, SKIP_BUG: tl.constexpr):
    """SKIPPED / UNMASKED / MASKED for query `rows` against keys [k0, k0 + BLOCK_N) (see the module doc)."""
    valid = rows < seq_len
    start = tl.load(start_ptr + rows, mask=valid, other=0)
    k_last = k0 + BLOCK_N - 1
    sees_none = (k0 > rows) | (k_last - SKIP_BUG < start)
    sees_all = (k_last <= rows) & (k0 >= start) & (k_last < seq_len)
    for d in tl.static_range(DEPTH):
        lo = tl.load(lo_ptr + d * seq_len + rows, mask=valid, other=0)
        hi = tl.load(hi_ptr + d * seq_len + rows, mask=valid, other=0)
        sees_none = sees_none | ((lo <= k0) & (k_last - SKIP_BUG < hi))
        sees_all = sees_all & ((hi <= k0) | (lo > k_last) | (hi <= lo))
    all_none = tl.min((sees_none | ~valid).to(tl.int32), 0)
    all_all = tl.min((sees_all | ~valid).to(tl.int32), 0)
    return tl.where(all_none == 1, SKIPPED, tl.where(all_all == 1, UNMASKED, MASKED))


@triton.jit
def _visible(start_ptr, lo_ptr, hi_ptr, rows, cols, seq_len, DEPTH: tl.constexpr):
    """bool [rows, cols]: the exact mask of one tile (k <= q < seq_len: no key past the end for a real row)."""
    valid = rows < seq_len
    start = tl.load(start_ptr + rows, mask=valid, other=0)
    k = cols[None, :]
    vis = (k <= rows[:, None]) & (k >= start[:, None])
    for d in tl.static_range(DEPTH):
        lo = tl.load(lo_ptr + d * seq_len + rows, mask=valid, other=0)
        hi = tl.load(hi_ptr + d * seq_len + rows, mask=valid, other=0)
        vis = vis & ((k < lo[:, None]) | (k >= hi[:, None]))
    return vis


@triton.jit
def _load_rows(ptr, rows, dims, row_stride, seq_len):
    """[rows, dims] block of a [s, d] slice (rows past the end read as 0)."""
    return tl.load(ptr + rows[:, None] * row_stride + dims[None, :], mask=rows[:, None] < seq_len, other=0.0)


@triton.jit
def _first_key_tile(start_ptr, rows, seq_len, BLOCK_N: tl.constexpr):
    """Start of the first key tile any valid row of `rows` can see (tiles before it are all skipped)."""
    start = tl.load(start_ptr + rows, mask=rows < seq_len, other=0)
    return (tl.min(tl.where(rows < seq_len, start, seq_len), 0) // BLOCK_N) * BLOCK_N


@triton.jit
def _forward_kernel(Q, K, V, Out, Lse, Start, Lo, Hi, TileLog, sm_scale, seq_len, heads, group,
                    q_sb, q_ss, q_sh, k_sb, k_ss, k_sh, v_sb, v_ss, v_sh, o_sb, o_ss, o_sh,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                    DEPTH: tl.constexpr, LAYOUT_DEPTH: tl.constexpr, SKIP_BUG: tl.constexpr,
                    LOG_TILES: tl.constexpr):
    q_tile, bh = tl.program_id(0), tl.program_id(1)
    batch, head = (bh // heads).to(tl.int64), bh % heads  # int64: batch offsets may pass 2**31
    kv_head = head // group
    start_ptr = Start + batch * seq_len
    lo_ptr, hi_ptr = Lo + batch * LAYOUT_DEPTH * seq_len, Hi + batch * LAYOUT_DEPTH * seq_len
    rows = q_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    q = _load_rows(Q + batch * q_sb + head * q_sh, rows, dims, q_ss, seq_len)
    k_base, v_base = K + batch * k_sb + kv_head * k_sh, V + batch * v_sb + kv_head * v_sh
    m_i = tl.zeros([BLOCK_M], tl.float32) + NEG_INIT
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    k_end = tl.minimum(q_tile * BLOCK_M + BLOCK_M, seq_len)  # causal: no key past the tile's last row
    for k0 in range(_first_key_tile(start_ptr, rows, seq_len, BLOCK_N), k_end, BLOCK_N):
        kind = _tile_kind(start_ptr, lo_ptr, hi_ptr, rows, k0, seq_len, BLOCK_N, DEPTH, SKIP_BUG)
        if LOG_TILES:
            tl.store(TileLog + (batch * tl.num_programs(0) + q_tile) * tl.cdiv(seq_len, BLOCK_N) + k0 // BLOCK_N, kind)
        if kind != SKIPPED:
            cols = k0 + tl.arange(0, BLOCK_N)
            k = _load_rows(k_base, cols, dims, k_ss, seq_len)
            v = _load_rows(v_base, cols, dims, v_ss, seq_len)
            scores = tl.dot(q, tl.trans(k), input_precision="ieee") * sm_scale
            if kind == MASKED:
                vis = _visible(start_ptr, lo_ptr, hi_ptr, rows, cols, seq_len, DEPTH)
                scores = tl.where(vis, scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            p = tl.exp(scores - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            m_i = m_new
    l_i = tl.where(l_i > 0, l_i, 1.0)  # only rows past the end see nothing (every row sees itself)
    out = acc / l_i[:, None]
    o_ptrs = Out + batch * o_sb + head * o_sh + rows[:, None] * o_ss + dims[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=rows[:, None] < seq_len)
    tl.store(Lse + bh * seq_len + rows, m_i + tl.log(l_i), mask=rows < seq_len)


@triton.jit
def _delta_kernel(Out, DOut, Delta, seq_len, heads, o_sb, o_ss, o_sh, d_sb, d_ss, d_sh,
                  BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
    """delta = rowsum(dO * O) per (batch, head, query): the softmax backward's correction term."""
    q_tile, bh = tl.program_id(0), tl.program_id(1)
    batch, head = (bh // heads).to(tl.int64), bh % heads  # int64: batch offsets may pass 2**31
    rows = q_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    o = _load_rows(Out + batch * o_sb + head * o_sh, rows, dims, o_ss, seq_len).to(tl.float32)
    do = _load_rows(DOut + batch * d_sb + head * d_sh, rows, dims, d_ss, seq_len).to(tl.float32)
    tl.store(Delta + bh * seq_len + rows, tl.sum(o * do, 1), mask=rows < seq_len)


@triton.jit
def _dkdv_kernel(Q, K, V, DOut, Lse, Delta, DK, DV, Start, Lo, Hi, QueryEnd, sm_scale, seq_len, heads, group,
                 q_sb, q_ss, q_sh, k_sb, k_ss, k_sh, v_sb, v_ss, v_sh, d_sb, d_ss, d_sh,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                 DEPTH: tl.constexpr, LAYOUT_DEPTH: tl.constexpr, SKIP_BUG: tl.constexpr):
    """dK, dV of one key tile: loops over the query heads of its KV group and their query tiles."""
    k_tile, bkv = tl.program_id(0), tl.program_id(1)
    kv_heads = heads // group
    batch, kv_head = (bkv // kv_heads).to(tl.int64), bkv % kv_heads
    start_ptr = Start + batch * seq_len
    lo_ptr, hi_ptr = Lo + batch * LAYOUT_DEPTH * seq_len, Hi + batch * LAYOUT_DEPTH * seq_len
    k0 = k_tile * BLOCK_N
    cols = k0 + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    k = _load_rows(K + batch * k_sb + kv_head * k_sh, cols, dims, k_ss, seq_len)
    v = _load_rows(V + batch * v_sb + kv_head * v_sh, cols, dims, v_ss, seq_len)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    q_end = tl.load(QueryEnd + batch * tl.num_programs(0) + k_tile)  # no later query sees this tile
    for g in range(group):
        head = kv_head * group + g
        stats = (batch * heads + head) * seq_len
        for q0 in range((k0 // BLOCK_M) * BLOCK_M, q_end, BLOCK_M):
            rows = q0 + tl.arange(0, BLOCK_M)
            kind = _tile_kind(start_ptr, lo_ptr, hi_ptr, rows, k0, seq_len, BLOCK_N, DEPTH, SKIP_BUG)
            if kind != SKIPPED:
                q = _load_rows(Q + batch * q_sb + head * q_sh, rows, dims, q_ss, seq_len)
                do = _load_rows(DOut + batch * d_sb + head * d_sh, rows, dims, d_ss, seq_len)
                lse = tl.load(Lse + stats + rows, mask=rows < seq_len, other=float("inf"))  # p = 0 past the end
                delta = tl.load(Delta + stats + rows, mask=rows < seq_len, other=0.0)
                p = tl.exp(tl.dot(q, tl.trans(k), input_precision="ieee") * sm_scale - lse[:, None])
                if kind == MASKED:
                    p = tl.where(_visible(start_ptr, lo_ptr, hi_ptr, rows, cols, seq_len, DEPTH), p, 0.0)
                dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision="ieee")
                dp = tl.dot(do, tl.trans(v), input_precision="ieee")
                ds = p * (dp - delta[:, None])
                dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision="ieee")
    out_offsets = batch * seq_len * kv_heads * HEAD_DIM + kv_head * HEAD_DIM  # dK, dV: contiguous [b, s, hkv, d]
    ptrs = out_offsets + cols[:, None] * kv_heads * HEAD_DIM + dims[None, :]
    tl.store(DK + ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=cols[:, None] < seq_len)
    tl.store(DV + ptrs, dv.to(DV.dtype.element_ty), mask=cols[:, None] < seq_len)


@triton.jit
def _dq_kernel(Q, K, V, DOut, Lse, Delta, DQ, Start, Lo, Hi, sm_scale, seq_len, heads, group,
               q_sb, q_ss, q_sh, k_sb, k_ss, k_sh, v_sb, v_ss, v_sh, d_sb, d_ss, d_sh,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
               DEPTH: tl.constexpr, LAYOUT_DEPTH: tl.constexpr, SKIP_BUG: tl.constexpr):
    """dQ of one query tile: loops over the key tiles the forward visits."""
    q_tile, bh = tl.program_id(0), tl.program_id(1)
    batch, head = (bh // heads).to(tl.int64), bh % heads  # int64: batch offsets may pass 2**31
    kv_head = head // group
    start_ptr = Start + batch * seq_len
    lo_ptr, hi_ptr = Lo + batch * LAYOUT_DEPTH * seq_len, Hi + batch * LAYOUT_DEPTH * seq_len
    rows = q_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    q = _load_rows(Q + batch * q_sb + head * q_sh, rows, dims, q_ss, seq_len)
    do = _load_rows(DOut + batch * d_sb + head * d_sh, rows, dims, d_ss, seq_len)
    lse = tl.load(Lse + bh * seq_len + rows, mask=rows < seq_len, other=float("inf"))
    delta = tl.load(Delta + bh * seq_len + rows, mask=rows < seq_len, other=0.0)
    k_base, v_base = K + batch * k_sb + kv_head * k_sh, V + batch * v_sb + kv_head * v_sh
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    k_end = tl.minimum(q_tile * BLOCK_M + BLOCK_M, seq_len)
    for k0 in range(_first_key_tile(start_ptr, rows, seq_len, BLOCK_N), k_end, BLOCK_N):
        kind = _tile_kind(start_ptr, lo_ptr, hi_ptr, rows, k0, seq_len, BLOCK_N, DEPTH, SKIP_BUG)
        if kind != SKIPPED:
            cols = k0 + tl.arange(0, BLOCK_N)
            k = _load_rows(k_base, cols, dims, k_ss, seq_len)
            v = _load_rows(v_base, cols, dims, v_ss, seq_len)
            p = tl.exp(tl.dot(q, tl.trans(k), input_precision="ieee") * sm_scale - lse[:, None])
            if kind == MASKED:
                p = tl.where(_visible(start_ptr, lo_ptr, hi_ptr, rows, cols, seq_len, DEPTH), p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision="ieee")
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision="ieee")
    dq_ptrs = DQ + (batch * seq_len * heads + head) * HEAD_DIM + rows[:, None] * heads * HEAD_DIM + dims[None, :]
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=rows[:, None] < seq_len)


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _query_end(doc_start: torch.Tensor, block_n: int) -> torch.Tensor:
    """int32 [b, key tiles]: queries from here on cannot see the tile. doc_start[q] >= the suffix
    minimum of doc_start, which is sorted, so one searchsorted bounds every key tile (O(b * s))."""
    s = doc_start.shape[1]
    suffix_min = doc_start.flip(1).cummin(1).values.flip(1).contiguous()
    last_keys = torch.arange(block_n - 1, s + block_n - 1, block_n, device=doc_start.device,
                             dtype=doc_start.dtype).clamp(max=s - 1)
    return torch.searchsorted(suffix_min, last_keys.expand(doc_start.shape[0], -1).contiguous(),
                              right=True).to(torch.int32)


class _Arrays:
    """The layout as contiguous int32 arrays plus what every launch shares."""

    def __init__(self, q, k, layout, scale, options: KernelOptions):
        self.batch, self.seq_len, self.heads, self.head_dim = q.shape
        self.group = self.heads // k.shape[2]
        self.start, self.lo, self.hi = (t.to(q.device, torch.int32).contiguous()
                                        for t in (layout.doc_start, layout.hole_lo, layout.hole_hi))
        self.layout_depth = self.lo.shape[1]
        self.scale, self.options = scale, options
        self.consts = dict(BLOCK_M=options.block_m, BLOCK_N=options.block_n, HEAD_DIM=self.head_dim,
                           DEPTH=0 if options.ignore_holes else self.layout_depth,
                           LAYOUT_DEPTH=self.layout_depth, SKIP_BUG=int(options.skip_off_by_one),
                           num_warps=options.num_warps)

    def grid(self, block: int, heads: int) -> tuple[int, int]:
        return triton.cdiv(self.seq_len, block), self.batch * heads


def _forward(q, k, v, arrays: _Arrays, tile_log=None):
    out = torch.empty_like(q)
    lse = torch.empty(arrays.batch, arrays.heads, arrays.seq_len, device=q.device, dtype=torch.float32)
    log = tile_log if tile_log is not None else lse  # any pointer: not written unless LOG_TILES
    _forward_kernel[arrays.grid(arrays.options.block_m, arrays.heads)](
        q, k, v, out, lse, arrays.start, arrays.lo, arrays.hi, log, arrays.scale, arrays.seq_len, arrays.heads,
        arrays.group, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        LOG_TILES=tile_log is not None, **arrays.consts)
    return out, lse


def _backward(dout, q, k, v, out, lse, arrays: _Arrays):
    consts, opts = arrays.consts, arrays.options
    delta = torch.empty_like(lse)
    _delta_kernel[arrays.grid(opts.block_m, arrays.heads)](
        out, dout, delta, arrays.seq_len, arrays.heads, *_strides(out), *_strides(dout),
        BLOCK_M=opts.block_m, HEAD_DIM=arrays.head_dim, num_warps=opts.num_warps)
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    shared = (arrays.scale, arrays.seq_len, arrays.heads, arrays.group,
              *_strides(q), *_strides(k), *_strides(v), *_strides(dout))
    _dkdv_kernel[arrays.grid(opts.block_n, k.shape[2])](
        q, k, v, dout, lse, delta, dk, dv, arrays.start, arrays.lo, arrays.hi,
        _query_end(arrays.start, opts.block_n), *shared, **consts)
    _dq_kernel[arrays.grid(opts.block_m, arrays.heads)](
        q, k, v, dout, lse, delta, dq, arrays.start, arrays.lo, arrays.hi, *shared, **consts)
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, arrays):
        out, lse = _forward(q, k, v, arrays)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.arrays = arrays
        return out

    @staticmethod
    def backward(ctx, dout):
        dout = dout if dout.stride(-1) == 1 else dout.contiguous()
        return (*_backward(dout, *ctx.saved_tensors, ctx.arrays), None)


def _checked(q, k, v, layout, options: KernelOptions):
    b, s, hq, d = q.shape
    if k.shape != v.shape or k.shape[:2] != (b, s) or k.shape[3] != d or not k.shape[2] or hq % k.shape[2]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: not [b, s, h, d] with GQA")
    if d < 16 or d & (d - 1):
        raise ValueError(f"head_dim {d}: the Triton kernel needs a power of two >= 16")
    if layout.hole_lo.shape[::2] != (b, s) or layout.doc_start.shape != (b, s):
        raise ValueError(f"layout {tuple(layout.hole_lo.shape)} does not fit q {tuple(q.shape)}")
    for block in (options.block_m, options.block_n):
        if block < 16 or block & (block - 1):
            raise ValueError(f"tile size {block}: a power of two >= 16")
    return [t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v)]


def npr_flash_attention(q, k, v, layout, scale: float | None = None, options: KernelOptions = KernelOptions(),
                        tile_log: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of packed NPR rows: q [b, s, hq, d], k/v [b, s, hkv, d] -> [b, s, hq, d];
    `layout` has doc_start [b, s] and hole_lo/hole_hi [b, D, s] on q's device. Differentiable
    in q, k, v. With `tile_log` (int32 [b, query tiles, key tiles]) only the forward runs and
    records its tile kinds (0 skipped, 1 unmasked, 2 masked); tiles outside its key loop are not written."""
    q, k, v = _checked(q, k, v, layout, options)
    arrays = _Arrays(q, k, layout, scale if scale is not None else q.shape[-1] ** -0.5, options)
    if tile_log is not None:
        return _forward(q, k, v, arrays, tile_log)[0]
    return _FlashAttention.apply(q, k, v, arrays)
