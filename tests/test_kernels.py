"""megatron_npr.kernels: FlexAttention over NPR layouts against dense SDPA and float64."""
import random
import pytest
import torch

from megatron_npr.kernels import (AttentionLayout, FlexInputs, bucket_length, build_block_mask, classify_tiles,
                                  npr_attention, prepare_flex)
from megatron_npr.kernels import attention as kernel
from megatron_npr.topology import PackSample, build_layout, pack
from npr_reference import TAGS

G, g, P, p, S, s, K, k = TAGS.ids


def _text(rng, lo, hi):
    return [7] * rng.randint(lo, hi)


def _block(rng, depth, max_depth, scale):
    n = rng.randint(1, 5)
    ids = [G] + [P, 7, p] * n + [g]
    for _ in range(n):
        ids += [S] + _text(rng, 1, scale)
        if depth + 1 < max_depth and rng.random() < 0.4:
            ids += _block(rng, depth + 1, max_depth, scale // 3) + _text(rng, 1, 20)
        ids += [s]
    return ids + [K] + _text(rng, 1, 60) + [k]


def random_layout(seed: int, max_tokens: int = 1900, scale: int = 300, rows: int = 2) -> AttentionLayout:
    """Packed rows of random NPR documents with branches that cross tile boundaries: several
    rounds, nesting depth 2, lengths not multiples of the 128-token tile."""
    rng = random.Random(seed)
    samples = []
    while sum(x.token_ids.shape[0] for x in samples) < rows * max_tokens * 0.8:
        ids = _text(rng, 5, 200)
        for _ in range(rng.randint(1, 3)):
            ids += _block(rng, 0, 2, scale)
        ids += _text(rng, 1, 30)
        ids = ids[:max_tokens] if len(ids) <= max_tokens else _text(rng, 50, 300)
        samples.append(PackSample(torch.tensor(ids), torch.ones(len(ids), dtype=torch.bool),
                                  build_layout(ids, TAGS, max_depth=2)))
    packed = pack(samples, max_tokens)[:rows]
    length = max(r.num_tokens for r in packed)
    return AttentionLayout.from_layouts([r.pad_to(length, 0).layout for r in packed])


def long_layout(tokens: int) -> AttentionLayout:
    """One document of about `tokens`: prompt, a round of 4 long branches, a round of 2, answer."""
    branch = (tokens - 1200) // 6
    ids = [7] * 500
    for n in (4, 2):
        ids += [G] + [P, 7, p] * n + [g] + ([S] + [7] * branch + [s]) * n + [K] + [7] * 100 + [k]
    ids += [7] * (tokens - len(ids))
    return AttentionLayout.from_layouts([build_layout(ids, TAGS)])


def naive_float64(q, k, v, layout):
    rep = q.shape[2] // k.shape[2]
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~layout.visible()[:, None], float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


def qkv(layout, hq=4, hkv=2, d=32, dtype=torch.float32, device="cpu", seed=0):
    b, _, n = layout.shape
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.randn(b, n, h, d, generator=gen).to(device, dtype) for h in (hq, hkv, hkv)]


def dense_tiles(layout: AttentionLayout):
    """(any visible, all visible) per 128 x 128 tile, from the whole dense mask at once."""
    b, _, n = layout.shape
    tiles = layout.visible().view(b, n // 128, 128, n // 128, 128)
    return tiles.any(4).any(2), tiles.all(4).all(2)


def assert_exact_tiles(padded: AttentionLayout, row_chunk: int = kernel.ROW_CHUNK):
    any_vis, all_vis = classify_tiles(padded, row_chunk=row_chunk)
    ref_any, ref_all = dense_tiles(padded)
    assert torch.equal(any_vis, ref_any) and torch.equal(all_vis, ref_all)
    assert (any_vis & ~all_vis).any() and all_vis.any()  # both kinds of tile occur
    assert torch.equal(build_block_mask(padded, row_chunk=row_chunk).to_dense()[:, 0].bool(), any_vis)


# row_chunk 128 / 384 / 1024: 16 / 6 (the last one short) / 2 chunks of the 2048-token rows; 2048: one
@pytest.mark.parametrize("seed,row_chunk", [(0, 2048), (1, 2048), (2, 128), (3, 384), (4, 1024), (5, 384)])
def test_tile_classification_is_exact(seed, row_chunk):
    layout = random_layout(seed)
    assert_exact_tiles(layout.padded(bucket_length(layout.shape[2])), row_chunk)


def test_tile_classification_is_exact_over_several_default_row_chunks():
    """A packed row of about 6k tokens (several documents, rounds, nesting): three default chunks."""
    layout = random_layout(7, max_tokens=6000, scale=400, rows=1)
    assert layout.shape[0] == 1 and 4096 < layout.shape[2] <= 6000 and len(layout.doc_start.unique()) >= 2
    padded = layout.padded(bucket_length(layout.shape[2]))
    assert padded.shape[2] > 2 * kernel.ROW_CHUNK
    assert_exact_tiles(padded)


def test_compiled_flex_matches_dense_sdpa_and_float64():
    """CPU forward (flex has no CPU backward); all layouts land in the 2048 bucket: one compile.
    The last two block masks are classified in 256- and 640-row chunks (8 and 4 chunks)."""
    for seed, row_chunk in ((10, kernel.ROW_CHUNK), (11, 256), (12, 640)):
        layout = random_layout(seed)
        assert 1024 < layout.shape[2] <= 2048 and layout.shape[2] % 128
        q, k, v = qkv(layout, seed=seed)
        out = npr_attention(q, k, v, prepare_flex(layout, row_chunk=row_chunk), "flex")
        assert (out - npr_attention(q, k, v, layout, "sdpa")).abs().max() <= 2e-5
        assert (out.double() - naive_float64(q, k, v, layout)).abs().max() <= 2e-5


def test_negative_controls_wrong_block_mask_and_wrong_mask_mod_are_caught():
    from torch.nn.attention.flex_attention import BlockMask

    layout = random_layout(10)
    q, k, v = qkv(layout)
    ref = naive_float64(q, k, v, layout)
    prepared = prepare_flex(layout)
    padded = layout.padded(prepared.length)
    any_vis, all_vis = classify_tiles(padded)
    partial = any_vis & ~all_vis
    diag = torch.eye(partial.shape[1], dtype=torch.bool)
    pn, pi = kernel._tile_lists(partial & diag)  # off-diagonal partial tiles wrongly declared full
    fn, fi = kernel._tile_lists(all_vis | (partial & ~diag))
    wrong_tiles = BlockMask.from_kv_blocks(kv_num_blocks=pn, kv_indices=pi, full_kv_num_blocks=fn, full_kv_indices=fi,
                                           BLOCK_SIZE=128, mask_mod=kernel.npr_mask_mod(padded))
    out = npr_attention(q, k, v, FlexInputs(layout, wrong_tiles, prepared.length))
    assert (out.double() - ref).abs().max() > 1e-2
    no_holes = AttentionLayout(layout.doc_start, layout.hole_lo, layout.hole_lo)  # branches see siblings
    out = npr_attention(q, k, v, no_holes, "flex")
    assert (out.double() - ref).abs().max() > 1e-2


def test_bad_shapes_are_named():
    layout = random_layout(1, max_tokens=300, scale=40)
    q, k, v = qkv(layout, hq=3)
    with pytest.raises(ValueError, match="GQA"):
        npr_attention(q, k, v, layout, "sdpa")
    with pytest.raises(ValueError, match="multiple of the block size"):
        build_block_mask(layout)


def largest_allocation(fn) -> int:
    """Bytes of the largest single CPU allocation while fn runs (the profiler sees allocations
    made inside compiled kernels too)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(e.cpu_memory_usage for e in prof.events())


def test_flex_at_32k_tokens_allocates_no_s_by_s_tensor():
    """Block-mask building plus the fused forward at 32k tokens: no allocation comes near one
    s x s boolean mask (1 GiB). Control: the dense path at 8k tokens does allocate s x s."""
    layout = long_layout(32000)
    n = layout.shape[2]
    q, k, v = (torch.randn(1, n, h, 16) for h in (2, 1, 1))
    out = []
    biggest = largest_allocation(lambda: out.append(npr_attention(q, k, v, prepare_flex(layout), "flex")))
    assert out[0].isfinite().all()
    assert biggest < n * n // 8, f"largest allocation {biggest / 2**20:.0f} MiB at {n} tokens"
    small = long_layout(8000)
    q, k, v = (torch.randn(1, small.shape[2], h, 16) for h in (2, 1, 1))
    assert largest_allocation(lambda: npr_attention(q, k, v, small, "sdpa")) >= small.shape[2] ** 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("seed", range(3))
def test_gpu_flex_forward_and_backward_bf16_vs_float64(seed):
    layout = random_layout(20 + seed)
    layout = AttentionLayout(*(t.cuda() for t in (layout.doc_start, layout.hole_lo, layout.hole_hi)))
    q, k, v = (t.requires_grad_() for t in qkv(layout, hq=8, hkv=2, d=64, dtype=torch.bfloat16, device="cuda"))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = naive_float64(q64, k64, v64, layout)
    dout = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout)

    def errors(backend, lay):
        out = npr_attention(q, k, v, lay, backend)
        grads = torch.autograd.grad(out, (q, k, v), dout.to(out.dtype))
        return [(a.double() - b).abs().max().item() for a, b in zip((out, *grads), (ref, *ref_grads))]

    dense = errors("sdpa", layout)
    flex = errors("flex", layout)
    assert all(f <= 2 * d + 1e-3 for f, d in zip(flex, dense)), (flex, dense)
    wrong = AttentionLayout(layout.doc_start, layout.hole_lo, layout.hole_lo)
    assert any(f > 2 * d + 1e-3 for f, d in zip(errors("flex", wrong), dense))  # negative control
