"""Attention benchmark for NPR layouts; prints one JSON row per (layout, length, method).

    python tools/bench_attention.py                       # GPU: Qwen3-4B heads (32/8/128), bf16, fwd+bwd
    python tools/bench_attention.py --device cpu --seqs 2048 --heads 4 2 32 --dtype float32 --forward-only

Layouts (branch lengths scale with the sequence length s): 4, 8 or 2 branches in one round;
3 rounds of 4 branches; a packed row of 4 documents of 4 branches. Methods: flex NPR (this
project), the project's fused Triton kernels (triton NPR), flex causal, SDPA causal (flash backend
on GPU), dense-mask SDPA (the public reference's way). Times are medians after warm-up (CUDA events
on GPU); compile time of flex is reported separately. `visible_pairs` is the fraction of causal
pairs the NPR mask keeps. Off CUDA the Triton kernels would run in Triton's interpreter: their rows
say `"interpreted": true` and carry no time.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from megatron_npr.kernels import AttentionLayout, npr_attention, prepare_flex
from megatron_npr.topology import NPR_TAGS, Layout, TagIds, build_layout

TAGS = TagIds.from_mapping({t: 10**6 + i for i, t in enumerate(NPR_TAGS)})
G, g, P, p, S, s, K, k = TAGS.ids


def document(tokens: int, branches: int, rounds: int) -> list[int]:
    prompt, take = min(512, tokens // 16), min(256, tokens // 32)
    per_round = (tokens - prompt) // rounds
    branch = (per_round - take - 3 * branches - 4) // branches
    ids = [0] * prompt
    for _ in range(rounds):
        ids += [G] + [P, 0, p] * branches + [g] + ([S] + [0] * (branch - 2) + [s]) * branches
        ids += [K] + [0] * (take - 2) + [k]
    return ids + [0] * (tokens - len(ids))


LAYOUTS = {"4 branches": (1, 4, 1), "8 branches": (1, 8, 1), "2 branches": (1, 2, 1),
           "3 rounds x 4 branches": (1, 4, 3), "packed 4 docs x 4 branches": (4, 4, 1)}


def make_layout(name: str, length: int) -> AttentionLayout:
    docs, branches, rounds = LAYOUTS[name]
    parts = [build_layout(document(length // docs, branches, rounds), TAGS) for _ in range(docs)]
    lay = Layout.concat(parts)
    return AttentionLayout.from_layouts([lay])


def timed(fn, device: str, warmup: int, repeat: int) -> float:
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(repeat):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            runs.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            runs.append(1e3 * (time.perf_counter() - t))
    return statistics.median(runs)


def methods(layout: AttentionLayout, n: int, device: str):
    causal = AttentionLayout.from_layouts([Layout.causal(n)], device=device)
    prepared, prepared_causal = prepare_flex(layout), prepare_flex(causal)
    return {
        "block_mask_build": lambda q, kk, v: prepare_flex(layout),  # once per batch, shared by all layers
        "flex_npr": lambda q, kk, v: npr_attention(q, kk, v, prepared, "flex"),
        "triton_npr": lambda q, kk, v: npr_attention(q, kk, v, layout, "triton"),
        "flex_causal": lambda q, kk, v: npr_attention(q, kk, v, prepared_causal, "flex"),
        "sdpa_causal": lambda q, kk, v: F.scaled_dot_product_attention(
            q.transpose(1, 2), kk.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True),
        "sdpa_dense_mask": lambda q, kk, v: npr_attention(q, kk, v, layout, "sdpa"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seqs", type=int, nargs="+", default=[8192, 16384, 32768])
    ap.add_argument("--heads", type=int, nargs=3, default=[32, 8, 128], metavar=("HQ", "HKV", "D"))
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    ap.add_argument("--methods", nargs="+",
                    default=["block_mask_build", "flex_npr", "triton_npr", "flex_causal", "sdpa_causal",
                             "sdpa_dense_mask"])
    ap.add_argument("--forward-only", action="store_true", help="forced on CPU: flex has no CPU backward")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    dev, dtype = args.device, getattr(torch, args.dtype)
    backward = not args.forward_only and dev == "cuda"
    hq, hkv, d = args.heads
    for n in args.seqs:
        for name in args.layouts:
            layout = make_layout(name, n)
            layout = AttentionLayout(*(t.to(dev) for t in (layout.doc_start, layout.hole_lo, layout.hole_hi)))
            visible = layout.visible().sum().item() / (n * (n + 1) / 2) if n <= 16384 else None
            q, kk, v = (torch.randn(1, n, h, d, device=dev, dtype=dtype, requires_grad=backward)
                        for h in (hq, hkv, hkv))
            for method, fn in methods(layout, n, dev).items():
                if method not in args.methods:
                    continue
                row = {"layout": name, "s": n, "method": method, "dtype": args.dtype, "heads": args.heads,
                       "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
                       "pass": "fwd+bwd" if backward else "fwd", "visible_pairs": visible}
                if method == "triton_npr" and dev != "cuda":  # the interpreter: minutes per call, not a timing
                    print(json.dumps({**row, "interpreted": True, "ms": None}), flush=True)
                    continue

                def step():
                    out = fn(q, kk, v)
                    if backward and isinstance(out, torch.Tensor):
                        out.backward(torch.ones_like(out))

                try:
                    t = time.perf_counter()
                    step()  # first call: compiles flex for this shape
                    row["first_call_s"] = round(time.perf_counter() - t, 2)
                    with torch.set_grad_enabled(backward):
                        row["ms"] = round(timed(step, dev, args.warmup, args.repeat), 3)
                except torch.OutOfMemoryError:
                    row["ms"] = "oom"
                    torch.cuda.empty_cache()
                except Exception as e:  # noqa: BLE001 - one method failing (a kernel that does not compile
                    row["error"] = repr(e)[:400]  # on this triton) must not cost the other rows
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
