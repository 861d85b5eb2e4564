"""Split-K decode attention over a slot-addressed KV cache (the torch rollout engine's kernel).

Each query row is one token of one stream; it attends to the KV slots listed in its row of
`visible` (the first `visible_len[row]` entries; the rest is padding and never read). NPR streams
list the trunk's slots then their own, so rows of one batch have very different lengths and their
keys are scattered over the cache: the kernel gathers K/V rows by slot id instead of assuming a
contiguous sequence.

Two launches:
1. `_chunk_partials_kernel`, grid (row, kv head, chunk): the q heads sharing one kv head (GQA) are
   one [BLOCK_H, d] block, so each gathered K/V tile is read once for the whole group. It runs an
   online softmax over its chunk of the slot list and writes the chunk's normalised output and
   log-sum-exp. Splitting a row into chunks keeps the GPU busy when a decode batch has few rows
   but long contexts (split-K, "flash decoding").
2. `_combine_chunks_kernel`, grid (row, q head): merges the chunks with the log-sum-exp trick.

Scores, softmax and accumulators are float32 whatever the cache dtype. Loaded by path through
`megatron_npr.kernels.triton_sources.load("npr_decode_attention")` (this folder is not a package).
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

BLOCK_N = 64  # slots per tile of the inner loop
MIN_CHUNK = 256  # shorter chunks cost more in partial-result traffic than they win in parallelism
MAX_CHUNKS = 64  # bounds the partial buffers and the combine kernel's block


@triton.jit
def _chunk_partials_kernel(q_ptr, k_ptr, v_ptr, slots_ptr, lengths_ptr, part_ptr, lse_ptr,
                           stride_qn, stride_qh, stride_kslot, stride_kh, stride_vslot, stride_vh,
                           stride_slots_n, stride_pn, stride_ph, stride_pc, stride_ln, stride_lh,
                           chunk, group, head_dim, scale,
                           BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                           DOT_PRECISION: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    chunk_id = tl.program_id(2)
    local = tl.arange(0, BLOCK_H)
    heads = kv_head * group + local  # q heads h with h // group == kv_head (HF / SDPA GQA mapping)
    head_ok = local < group
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    q = tl.load(q_ptr + row * stride_qn + heads[:, None] * stride_qh + dims[None, :],
                mask=head_ok[:, None] & dim_ok[None, :], other=0.0)

    length = tl.load(lengths_ptr + row)
    begin = chunk_id * chunk
    end = tl.minimum(begin + chunk, length)  # a chunk past the row's length runs no iteration
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for start in range(begin, end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < end  # padding entries of the slot list are never loaded
        slots = tl.load(slots_ptr + row * stride_slots_n + cols, mask=col_ok, other=0).to(tl.int64)
        tile_ok = dim_ok[:, None] & col_ok[None, :]
        k_t = tl.load(k_ptr + slots[None, :] * stride_kslot + kv_head * stride_kh + dims[:, None],
                      mask=tile_ok, other=0.0)  # [BLOCK_D, BLOCK_N], gathered by slot id
        scores = tl.dot(q, k_t, input_precision=DOT_PRECISION) * scale
        scores = tl.where(col_ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))  # finite: every iteration has a valid column
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m - m_new)
        v = tl.load(v_ptr + slots[:, None] * stride_vslot + kv_head * stride_vh + dims[None, :],
                    mask=col_ok[:, None] & dim_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        l = l * alpha + tl.sum(p, 1)
        m = m_new

    has_keys = l > 0
    out = acc / tl.where(has_keys, l, 1.0)[:, None]
    lse = tl.where(has_keys, m + tl.log(tl.where(has_keys, l, 1.0)), float("-inf"))  # empty chunk: weight 0
    tl.store(part_ptr + row * stride_pn + heads[:, None] * stride_ph + chunk_id * stride_pc + dims[None, :],
             out, mask=head_ok[:, None] & dim_ok[None, :])
    tl.store(lse_ptr + row * stride_ln + heads * stride_lh + chunk_id, lse, mask=head_ok)


@triton.jit
def _combine_chunks_kernel(part_ptr, lse_ptr, out_ptr, num_chunks, head_dim,
                           stride_pn, stride_ph, stride_pc, stride_ln, stride_lh, stride_on, stride_oh,
                           BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    chunks = tl.arange(0, BLOCK_C)
    chunk_ok = chunks < num_chunks
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    lse = tl.load(lse_ptr + row * stride_ln + head * stride_lh + chunks, mask=chunk_ok, other=float("-inf"))
    top = tl.max(lse, 0)  # finite: chunk 0 of a row with >= 1 slot has keys
    weights = tl.exp(lse - top)
    parts = tl.load(part_ptr + row * stride_pn + head * stride_ph + chunks[:, None] * stride_pc + dims[None, :],
                    mask=chunk_ok[:, None] & dim_ok[None, :], other=0.0)
    out = tl.sum(weights[:, None] * parts, 0) / tl.sum(weights, 0)
    tl.store(out_ptr + row * stride_on + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty), mask=dim_ok)


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def default_chunk(rows: int, kv_heads: int, width: int, device: torch.device, block_n: int = BLOCK_N) -> int:
    """Slots per chunk: enough chunks that the grid covers the GPU about twice, none shorter than
    MIN_CHUNK slots, at most MAX_CHUNKS; a multiple of block_n."""
    wanted = -(-2 * _multiprocessors(device) // max(1, rows * kv_heads))
    chunks = max(1, min(wanted, MAX_CHUNKS, -(-width // MIN_CHUNK)))
    return -(-max(1, -(-width // chunks)) // block_n) * block_n


def chunk_partials(q, k_cache, v_cache, visible, visible_len, *, chunk: int, scale: float | None = None,
                   block_n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-chunk results: out [n, hq, chunks, d] float32 (each chunk normalised on its own) and
    lse [n, hq, chunks] float32 (-inf for a chunk past the row's length). block_n defaults to
    min(BLOCK_N, chunk); it must be a power of two >= 16 dividing chunk."""
    n, hq, d = q.shape
    hkv = k_cache.shape[1]
    if k_cache.shape[2] != d or v_cache.shape != k_cache.shape or hq % hkv:
        raise ValueError(f"q {tuple(q.shape)} does not fit k {tuple(k_cache.shape)} / v {tuple(v_cache.shape)}")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"q is {q.dtype} but the cache is {k_cache.dtype}/{v_cache.dtype}")
    block_n = block_n or min(BLOCK_N, chunk)
    if block_n < 16 or block_n & (block_n - 1) or chunk % block_n:
        raise ValueError(f"chunk ({chunk}) must be a multiple of block_n ({block_n}), a power of two >= 16")
    if q.stride(2) != 1 or k_cache.stride(2) != 1 or v_cache.stride(2) != 1:
        raise ValueError("q, k and v need a contiguous head_dim")
    visible = visible if visible.stride(1) == 1 else visible.contiguous()
    lengths = visible_len.to(device=q.device, dtype=torch.int32)
    num_chunks = max(1, -(-visible.shape[1] // chunk))
    parts = torch.empty(n, hq, num_chunks, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(n, hq, num_chunks, dtype=torch.float32, device=q.device)
    group = hq // hkv
    _chunk_partials_kernel[(n, hkv, num_chunks)](
        q, k_cache, v_cache, visible, lengths, parts, lse,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        visible.stride(0), parts.stride(0), parts.stride(1), parts.stride(2), lse.stride(0), lse.stride(1),
        chunk, group, d, scale if scale is not None else 1.0 / math.sqrt(d),
        BLOCK_H=max(16, triton.next_power_of_2(group)),  # tl.dot wants >= 16 rows; spare rows are masked
        BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(d)),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")  # fp32: no TF32 rounding
    return parts, lse


def combine_chunks(parts: torch.Tensor, lse: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Merge chunk results [n, hq, chunks, d] / [n, hq, chunks] into [n, hq, d] of out_dtype."""
    n, hq, num_chunks, d = parts.shape
    if parts.stride(3) != 1 or lse.stride(2) != 1:
        raise ValueError("parts and lse need contiguous last dimensions")
    out = torch.empty(n, hq, d, dtype=out_dtype, device=parts.device)
    _combine_chunks_kernel[(n, hq)](
        parts, lse, out, num_chunks, d,
        parts.stride(0), parts.stride(1), parts.stride(2), lse.stride(0), lse.stride(1), out.stride(0), out.stride(1),
        BLOCK_C=triton.next_power_of_2(num_chunks), BLOCK_D=max(16, triton.next_power_of_2(d)))
    return out


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, visible: torch.Tensor,
                     visible_len: torch.Tensor, *, scale: float | None = None, chunk: int | None = None,
                     block_n: int | None = None) -> torch.Tensor:
    """q [n, hq, d]; k_cache/v_cache [num_slots, hkv, d] (hq a multiple of hkv, same dtype as q);
    visible [n, V] int slot ids, row i's first visible_len[i] (>= 1) entries valid, the rest any
    value; returns [n, hq, d] in q's dtype: softmax(q k^T * scale) v over each row's slots.
    `chunk` (slots per split, a multiple of block_n) defaults to `default_chunk`."""
    if chunk is None:
        chunk = default_chunk(q.shape[0], k_cache.shape[1], visible.shape[1], q.device, block_n or BLOCK_N)
    parts, lse = chunk_partials(q, k_cache, v_cache, visible, visible_len, chunk=chunk, scale=scale,
                                block_n=block_n)
    return combine_chunks(parts, lse, q.dtype)
