"""attention_backend: triton — the fused kernels of kernels/npr_flash_attention.py against a
float64 dense-mask reference, run in Triton's interpreter on CPU (tests/conftest.py sets
TRITON_INTERPRET=1 without CUDA). Shapes are tiny: the interpreter runs every tile in numpy."""
import importlib.util
import random

import pytest
import torch

from megatron_npr.kernels import AttentionLayout, npr_attention, triton_sources
from megatron_npr.topology import Layout, PackSample, build_layout, pack
from npr_reference import TAGS
from test_kernels import naive_float64, qkv, random_layout

if importlib.util.find_spec("triton") is None:  # looked up, not imported: the loader sets the interpreter up first
    pytest.skip("triton is not installed", allow_module_level=True)
flash = triton_sources.load("npr_flash_attention")
G, g, P, p, S, s, K, k = TAGS.ids
TILES = flash.KernelOptions(block_m=16, block_n=16)
SKIPPED, UNMASKED, MASKED = 0, 1, 2
TOL = 1e-4


def _document(rng: random.Random) -> list[int]:
    """A short NPR document: prompt, one or two rounds of 2-3 branches, a branch may nest a block.
    Half the documents have branches long enough to hide whole 16-key tiles."""
    longest = rng.choice((3, 20))

    def block(depth):
        n = rng.randint(2, 3 - depth)
        ids = [G] + [P, 7, p] * n + [g]
        for _ in range(n):
            ids += [S] + [7] * rng.randint(1, longest)
            if depth == 0 and rng.random() < 0.3:
                ids += block(1) + [7] * rng.randint(1, 3)
            ids += [s]
        return ids + [K] + [7] * rng.randint(1, 3) + [k]

    ids = [7] * rng.randint(1, 4)
    for _ in range(rng.randint(1, 2)):  # rounds follow each other directly
        ids += block(0)
    return ids + [7] * rng.randint(1, 3)


def tiny_layout(seed: int, max_tokens: int = 128, rows: int = 2) -> AttentionLayout:
    """Packed rows of short documents (several per row, rounds, nesting depth 2), padded to one length."""
    rng = random.Random(seed)
    samples = []
    while sum(x.token_ids.shape[0] for x in samples) < rows * max_tokens * 0.85:
        ids = _document(rng)
        if len(ids) <= max_tokens:
            samples.append(PackSample(torch.tensor(ids), torch.ones(len(ids), dtype=torch.bool),
                                      build_layout(ids, TAGS, max_depth=2)))
    packed = pack(samples, max_tokens)[:rows]
    length = max(r.num_tokens for r in packed)
    return AttentionLayout.from_layouts([r.pad_to(length, 0).layout for r in packed])


def tile_rule(layout: AttentionLayout, bm: int, bn: int, off_by_one: bool = False) -> torch.Tensor:
    """The kernel's tile rule in torch, int [b, query tiles, key tiles] (kinds as in the kernel)."""
    b, depth, n = layout.shape
    nq, nk = -(-n // bm), -(-n // bn)
    q = torch.arange(nq * bm).view(nq, bm, 1)
    valid = q < n
    qc = q.clamp(max=n - 1)[..., 0]
    k0 = torch.arange(nk).view(1, 1, nk) * bn
    k_last = k0 + bn - 1
    start = layout.doc_start[:, qc][..., None]
    none = (k0 > q) | (k_last - int(off_by_one) < start)
    every = (k_last <= q) & (k0 >= start) & (k_last < n)
    for d in range(depth):
        lo, hi = layout.hole_lo[:, d, qc][..., None], layout.hole_hi[:, d, qc][..., None]
        none |= (lo <= k0) & (k_last - int(off_by_one) < hi)
        every &= (hi <= k0) | (lo > k_last) | (hi <= lo)
    all_none, all_every = (none | ~valid).all(2), (every | ~valid).all(2)
    return torch.where(all_none, SKIPPED, torch.where(all_every, UNMASKED, MASKED))


def dense_tiles(layout: AttentionLayout, bm: int, bn: int):
    """(any visible, all visible over real rows) per tile, from the dense mask padded with False."""
    b, _, n = layout.shape
    nq, nk = -(-n // bm), -(-n // bn)
    vis = torch.zeros(b, nq * bm, nk * bn, dtype=torch.bool)
    vis[:, :n, :n] = layout.visible()
    real_row = (torch.arange(nq * bm) < n).view(1, nq, bm, 1, 1)
    tiles = vis.view(b, nq, bm, nk, bn)
    return tiles.any(4).any(2), (tiles | ~real_row).all(4).all(2)


def forward_and_grads(fn, q, k, v, dout):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), dout.to(out.dtype)))


def max_errors(layout, hq=4, hkv=2, d=16, options=TILES, seed=0):
    """Max |error| of out, dq, dk, dv against float64."""
    q, k, v = qkv(layout, hq=hq, hkv=hkv, d=d, seed=seed)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    ref = forward_and_grads(lambda *t: naive_float64(*t, layout), *(t.double() for t in (q, k, v)), dout)
    got = forward_and_grads(lambda *t: flash.npr_flash_attention(*t, layout, options=options), q, k, v, dout)
    return [(a.double() - b).abs().max().item() for a, b in zip(got, ref)]


@pytest.mark.parametrize("seed,hq,hkv,d,bm,bn,pad", [
    (1, 4, 2, 16, 16, 16, 0),
    (5, 2, 1, 32, 32, 16, 129),  # padded to 129: the last query tile holds one row
    (2, 4, 2, 16, 16, 32, 0),
])
def test_forward_and_backward_match_float64(seed, hq, hkv, d, bm, bn, pad):
    """Packed rows of several documents, rounds, nesting depth 2, lengths not multiples of the
    tiles, GQA; square and oblong tiles."""
    layout = tiny_layout(seed).padded(pad)
    b, depth, n = layout.shape
    assert depth == 2 and n % 16 and (layout.hole_hi[:, 1] > layout.hole_lo[:, 1]).any()
    assert all(len(row.unique()) >= 2 for row in layout.doc_start)  # documents per row
    errors = max_errors(layout, hq, hkv, d, options=flash.KernelOptions(bm, bn), seed=seed)
    assert max(errors) <= TOL, errors


def test_kernel_tile_kinds_follow_the_rule_which_is_sound_and_uses_all_three():
    layout = tiny_layout(1)
    b, _, n = layout.shape
    q, k, v = qkv(layout, hq=2, hkv=1, d=16)
    nq, nk = -(-n // 16), -(-n // 16)
    log = torch.full((b, nq, nk), -1, dtype=torch.int32)  # -1: outside the kernel's key loop
    out = flash.npr_flash_attention(q, k, v, layout, options=TILES, tile_log=log)
    assert (out.double() - naive_float64(q, k, v, layout)).abs().max() <= TOL
    rule = tile_rule(layout, 16, 16)
    looped = log >= 0
    assert torch.equal(log[looped].long(), rule[looped]) and (rule[~looped] == SKIPPED).all()
    any_vis, all_vis = dense_tiles(layout, 16, 16)
    assert not (any_vis & (rule == SKIPPED)).any()  # never skips a visible pair
    assert (all_vis[rule == UNMASKED]).all()  # unmasked tiles hold only visible pairs
    counts = [int(((log == kind) & looped).sum()) for kind in (SKIPPED, UNMASKED, MASKED)]
    assert min(counts) >= 2, counts
    below_diagonal = torch.arange(nk).view(1, 1, -1) <= torch.arange(nq).view(1, -1, 1)
    assert ((log == -1) & below_diagonal).any()  # key tiles before every row's document: not even looped over
    no_holes = tile_rule(AttentionLayout(layout.doc_start, layout.hole_lo, layout.hole_lo), 16, 16)
    assert ((rule == SKIPPED) & (no_holes != SKIPPED)).any()  # some tiles are skipped for holes alone


def test_negative_control_kernel_that_ignores_holes_fails():
    errors = max_errors(tiny_layout(1), hq=2, hkv=1, options=flash.KernelOptions(16, 16, ignore_holes=True))
    assert errors[0] > 1e-2, errors


def edge_layout(length: int = 70) -> AttentionLayout:
    """Two rows whose visible keys start exactly at a 16-key tile's last key: row 0 a document
    starting at key 15 (after a 15-token one); row 1 a second branch whose <step> is key 31, its
    hole (the first branch, keys 14-30) covering the rest of key tile 16-31."""
    first = build_layout([7] * 8 + [G, P, 7, p, g, S] + [7] * 10 + [s, K, 7, k], TAGS, max_depth=2)
    doc = [7] * 6 + [G] + [P, 7, p] * 2 + [g] + [S] + [7] * 15 + [s] + [S] + [7] * 20 + [s] + [K, 7, k]
    assert doc.index(S) == 14 and len(doc) - 1 - doc[::-1].index(S) == 31
    rows = [[Layout.causal(15, 2), first], [build_layout(doc, TAGS, max_depth=2)]]
    rows = [Layout.concat(r + [Layout.causal(length - sum(x.num_tokens for x in r), 2)]) for r in rows]
    return AttentionLayout.from_layouts(rows)


def test_tile_edges_are_exact_and_the_skip_rule_off_by_one_fails():
    """The planted bug (the skip rule forgets each tile's last key) skips, in both rows, a tile
    whose only visible key is its last one; the real rule computes them and matches float64."""
    layout = edge_layout()
    any_vis, _ = dense_tiles(layout, 16, 16)
    planted = any_vis & (tile_rule(layout, 16, 16, off_by_one=True) == SKIPPED)
    assert planted[0].any() and planted[1].any() and not (any_vis & (tile_rule(layout, 16, 16) == SKIPPED)).any()
    q, k, v = qkv(layout, hq=2, hkv=1, d=16)
    log = torch.full(any_vis.shape, -1, dtype=torch.int32)
    flash.npr_flash_attention(q, k, v, layout, options=TILES, tile_log=log)
    assert torch.equal(log[log >= 0].long(), tile_rule(layout, 16, 16)[log >= 0])
    assert max(max_errors(layout, hq=2, hkv=1)) <= TOL
    errors = max_errors(layout, hq=2, hkv=1, options=flash.KernelOptions(16, 16, skip_off_by_one=True))
    assert errors[0] > 1e-2, errors


def test_npr_attention_triton_backend_and_input_checks():
    layout = tiny_layout(3, max_tokens=60)
    q, k, v = qkv(layout, hq=2, hkv=1, d=16)
    out = npr_attention(q, k, v, layout, "triton")  # default tiles (64) and scale
    assert (out - npr_attention(q, k, v, layout, "sdpa")).abs().max() <= 1e-5
    q24 = torch.randn(*q.shape[:3], 24)
    with pytest.raises(ValueError, match="head_dim 24"):
        flash.npr_flash_attention(q24, q24[:, :, :1], q24[:, :, :1], layout)
    with pytest.raises(ValueError, match="tile size 24"):
        flash.npr_flash_attention(q, k, v, layout, options=flash.KernelOptions(block_m=24))
    with pytest.raises(ValueError, match="GQA"):
        flash.npr_flash_attention(torch.cat([q, k], 2), torch.cat([k, k], 2), torch.cat([v, v], 2), layout)


def test_model_with_triton_backend_matches_sdpa(megatron):
    from megatron_npr.models import forward_logits, token_logprobs
    from model_fixtures import megatron_from_hf, npr_batch, tiny_hf_model

    hf = tiny_hf_model(layers=2).train()
    batch = npr_batch()
    _, valid = batch.targets()
    results = []
    for backend in ("sdpa", "triton"):
        model = megatron_from_hf(hf, attention_backend=backend).train()
        with torch.no_grad():
            logits = forward_logits(model, batch)
        logprobs = token_logprobs(model, batch)
        (-(logprobs * valid).sum() / valid.sum()).backward()
        results.append((logits, logprobs.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (ref_logits, ref_lp, ref_grads), (logits, lp, grads) = results
    assert (logits - ref_logits).abs().max() <= 1e-5
    assert ((lp - ref_lp).abs() * valid).max() <= 1e-5
    assert max((grads[n] - ref_grads[n]).abs().max().item() for n in ref_grads) <= 1e-5


def test_missing_triton_fails_clearly(monkeypatch):
    import sys

    from megatron_npr.models.attention import require_backend
    monkeypatch.delitem(sys.modules, f"{triton_sources.PREFIX}.npr_flash_attention")
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` fails
    with pytest.raises(RuntimeError, match="'triton' attention backend needs triton"):
        require_backend("triton")


def test_triton_imported_before_the_interpreter_was_set_is_refused_clearly():
    """Without CUDA, a triton imported before TRITON_INTERPRET=1 has compiler-only helpers (tl.zeros):
    the loader says so instead of failing inside a kernel."""
    import os
    import subprocess
    import sys
    if torch.cuda.is_available():
        pytest.skip("on CUDA the kernels compile; the interpreter is not used")
    code = ("import triton\nfrom megatron_npr.kernels import triton_sources\n"
            "try:\n    triton_sources.load('npr_flash_attention')\nexcept ImportError as e:\n    print('ERR', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert "ERR triton was imported before TRITON_INTERPRET=1 was set" in out.stdout, out.stdout + out.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("seed", range(3))
def test_gpu_triton_and_flex_bf16_vs_float64(seed):
    """bf16 forward and backward: error no worse than 2x dense bf16 SDPA's + 1e-3, for both fused paths."""
    layout = random_layout(20 + seed)
    layout = AttentionLayout(*(t.cuda() for t in (layout.doc_start, layout.hole_lo, layout.hole_hi)))
    q, k, v = qkv(layout, hq=8, hkv=2, d=128 if seed else 64, dtype=torch.bfloat16, device="cuda")
    dout = torch.randn(q.shape, device="cuda", dtype=torch.float64)
    ref = forward_and_grads(lambda *t: naive_float64(*t, layout), *(t.double() for t in (q, k, v)), dout)

    def errors(fn):
        return [(a.double() - b).abs().max().item() for a, b in zip(forward_and_grads(fn, q, k, v, dout), ref)]

    dense = errors(lambda *t: npr_attention(*t, layout, "sdpa"))
    for backend in ("triton", "flex"):
        got = errors(lambda *t: npr_attention(*t, layout, backend))
        assert all(x <= 2 * y + 1e-3 for x, y in zip(got, dense)), (backend, got, dense)
    no_holes = flash.KernelOptions(ignore_holes=True)
    wrong = errors(lambda *t: flash.npr_flash_attention(*t, layout, options=no_holes))
    assert any(x > 2 * y + 1e-3 for x, y in zip(wrong, dense))  # negative control
