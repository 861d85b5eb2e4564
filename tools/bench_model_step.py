"""Model-step benchmark: forward+backward of the Megatron Qwen3 on a packed NPR batch; prints JSON.

    python tools/bench_model_step.py                          # GPU: Qwen3-0.6B shape, bf16, sdpa and flex
    python tools/bench_model_step.py --seqs 4096 8192 --rows 1 --backends sdpa flex
    python tools/bench_model_step.py --device cpu --tiny      # seconds on a CPU: checks the plumbing

Builds the project's model (`megatron_npr.models.build_model`, TP=PP=1, one process) with random
weights, packs `--rows` rows of `--seqs` tokens (one run per length), each `--docs` NPR documents
(several branch layouts, several rounds), and times `token_logprobs` + a token-mean NLL + backward, the work of
one training microbatch (no optimizer step). The attention mask (dense for sdpa, the block mask
for flex) is rebuilt inside every step, as training does once per batch. One JSON row per
backend: median ms per step, tokens/s, peak GPU memory, the first step's loss (same weights for
every backend, so the losses should agree), and a rough TFLOP/s (6 N T for the matrices plus
the visible attention pairs). A `model_step_check` row per length compares the backends'
losses. sdpa (a dense s x s mask; on GPUs likely the math kernel, fp32 scores kept per layer) is
skipped above `--sdpa-max-seq`.

Flex has no backward on CPU: there it is timed forward-only (`"pass": "fwd"`).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import platform
import statistics
import time

import torch

QWEN3_06B = dict(layers=28, hidden=1024, ffn=3072, heads=16, kv_heads=8, head_dim=128, vocab=151936)
TINY = dict(layers=2, hidden=64, ffn=128, heads=4, kv_heads=2, head_dim=16, vocab=256)
SHAPES = [(4, 1), (2, 2), (8, 1), (3, 3)]  # (branches, rounds) of the documents, cycled


def document(n: int, branches: int, rounds: int, tags, vocab: int, gen: torch.Generator) -> tuple[list[int], int]:
    """One NPR document of exactly n tokens (prompt, then `rounds` parallel blocks) and its
    response start. Text tokens are random ids below the tag ids."""
    G, g, P, p, S, s, K, k = tags.ids
    text = lambda m: torch.randint(0, vocab - 16, (m,), generator=gen).tolist()  # noqa: E731
    prompt, take = min(512, n // 16), max(3, min(256, n // 32))
    per_round = (n - prompt) // rounds
    branch = (per_round - take - 3 * branches - 4) // branches
    if branch < 3:
        raise ValueError(f"a document of {n} tokens is too short for {rounds} rounds of {branches} branches")
    ids = text(prompt)
    for _ in range(rounds):
        ids += [G] + sum(([P] + text(1) + [p] for _ in range(branches)), []) + [g]
        ids += sum(([S] + text(branch - 2) + [s] for _ in range(branches)), [])
        ids += [K] + text(take - 2) + [k]
    return ids + text(n - len(ids)), prompt


def make_batch(rows: int, seq: int, docs: int, vocab: int, seed: int = 0):
    from megatron_npr.models import NPRBatch
    from megatron_npr.topology import NPR_TAGS, PackSample, TagIds, build_layout, pack

    tags = TagIds.from_mapping({t: vocab - 16 + i for i, t in enumerate(NPR_TAGS)})
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(rows * docs):
        branches, rounds = SHAPES[i % len(SHAPES)]
        ids, start = document(seq // docs, branches, rounds, tags, vocab, gen)
        tokens = torch.tensor(ids)
        samples.append(PackSample(tokens, torch.arange(len(ids)) >= start, build_layout(ids, tags, start)))
    packed = pack(samples, seq)
    if len(packed) != rows:
        raise RuntimeError(f"packing gave {len(packed)} rows, expected {rows}")
    return NPRBatch.from_rows(packed, length=seq, pad_id=0)


def _visible(batch):
    from megatron_npr.kernels import AttentionLayout
    return AttentionLayout(batch.doc_start, batch.hole_lo, batch.hole_hi).visible()


def to_device(batch, device: str):
    """The batch on `device`, and a note when its dense mask needed a workaround there.

    `NPRBatch.dense_mask` (via `Layout.dense_mask`) builds its aranges on the CPU, so it fails
    for a batch on a GPU; then the batch gets a device-side dense mask with the same
    semantics (`AttentionLayout.visible`)."""
    from megatron_npr.models import NPRBatch

    moved = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    move = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731
    moved = {n: {k: move(x) for k, x in v.items()} if isinstance(v, dict) else move(v) for n, v in moved.items()}
    out = NPRBatch(**moved)
    try:
        out.dense_mask()
        return out, None
    except RuntimeError as e:
        class DeviceBatch(NPRBatch):
            def dense_mask(self):
                return _visible(self)
        note = f"NPRBatch.dense_mask failed on {device} ({str(e).splitlines()[0][:160]}); used AttentionLayout.visible"
        return DeviceBatch(**moved), note


def matrix_params(shape: dict) -> int:
    """Parameters that take part in matrix products per token (layers plus the output layer)."""
    h, f, hd = shape["hidden"], shape["ffn"], shape["head_dim"]
    attn = h * shape["heads"] * hd * 2 + h * shape["kv_heads"] * hd * 2
    return shape["layers"] * (attn + 3 * h * f) + shape["vocab"] * h


def timed(fn, device: str, warmup: int, repeat: int) -> list[float]:
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
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
    return runs


def bench_backend(backend: str, args, seq: int, shape: dict, dtype, batch, base: dict) -> dict:
    from megatron.core import tensor_parallel

    from megatron_npr.models import build_model, token_logprobs, transformer_config_from_hf
    from megatron_npr.models.attention import attention_inputs

    dev = args.device
    backward = not (backend == "flex" and dev == "cpu")
    row = {**base, "backend": backend, "pass": "fwd+bwd" if backward else "fwd"}
    hf_cfg = {"model_type": "qwen3", "vocab_size": shape["vocab"], "hidden_size": shape["hidden"],
              "intermediate_size": shape["ffn"], "num_hidden_layers": shape["layers"],
              "num_attention_heads": shape["heads"], "num_key_value_heads": shape["kv_heads"],
              "head_dim": shape["head_dim"], "rms_norm_eps": 1e-6, "rope_theta": 1e6,
              "tie_word_embeddings": args.tied, "max_position_embeddings": max(40960, seq)}
    model = None
    try:
        torch.manual_seed(args.seed)
        tensor_parallel.model_parallel_cuda_manual_seed(args.seed)
        t = time.perf_counter()
        model = build_model(transformer_config_from_hf(hf_cfg, dtype=dtype, attention_backend=backend))
        model.train(backward)
        if dev == "cuda":
            torch.cuda.synchronize()
        row["build_s"] = round(time.perf_counter() - t, 2)
        row["params"] = sum(p.numel() for p in model.parameters())
        _, valid = batch.targets()
        count = valid.sum()
        params = [p for p in model.parameters() if p.requires_grad]

        def step():
            for p in params:
                p.grad = None
            if backward:
                loss = -(token_logprobs(model, batch) * valid).sum() / count
                loss.backward()
            else:
                with torch.no_grad():
                    loss = -(token_logprobs(model, batch) * valid).sum() / count
            return loss

        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        row["loss"] = round(step().item(), 5)  # first call: compiles flex for this shape
        row["first_step_s"] = round(time.perf_counter() - t, 2)
        runs = timed(step, dev, args.warmup, args.repeat)
        ms = statistics.median(runs)
        row.update(ms=round(ms, 3), ms_min=round(min(runs), 3), ms_max=round(max(runs), 3),
                   tokens_per_s=round(base["tokens"] / (ms / 1e3), 1))
        flops = 2 * base["tokens"] * matrix_params(shape)
        if base.get("visible_pairs_total") is not None:
            flops += 4 * base["visible_pairs_total"] * shape["heads"] * shape["head_dim"] * shape["layers"]
        row["approx_tflops_per_s"] = round(flops * (3 if backward else 1) / (ms / 1e3) / 1e12, 3)
        mask_runs = timed(lambda: attention_inputs(batch, backend), dev, 1, 3)
        row["mask_ms"] = round(statistics.median(mask_runs), 3)
        if dev == "cuda":
            row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    except Exception as e:  # noqa: BLE001 - one backend failing (OOM, compile error) must not hide the other
        row.update(ms=None, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
    finally:
        del model
        gc.collect()
        if dev == "cuda":
            torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="a 2-layer, 64-wide model on 2 rows of 256 tokens")
    ap.add_argument("--backends", nargs="+", default=["sdpa", "flex"], choices=["sdpa", "flex", "te"])
    ap.add_argument("--seqs", type=int, nargs="+", help="tokens per packed row, one run each (default 4096; tiny 256)")
    ap.add_argument("--rows", type=int, help="packed rows per step (default 1; tiny 2)")
    ap.add_argument("--docs", type=int, help="NPR documents per row (default 4; tiny 2)")
    ap.add_argument("--sdpa-max-seq", type=int, default=4096,
                    help="skip sdpa above this row length: its dense mask path holds s x s scores per layer")
    for name, value in QWEN3_06B.items():
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, help=f"default {value} (Qwen3-0.6B)")
    ap.add_argument("--untied", dest="tied", action="store_false", help="separate output layer (0.6B ties)")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], help="default bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--warmup", type=int, help="default 2 (tiny 0: the first, untimed step warms up)")
    ap.add_argument("--repeat", type=int, help="default 5 (tiny 2)")
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch sees no GPU")
    shape = {n: getattr(args, n) or (TINY if args.tiny else QWEN3_06B)[n] for n in QWEN3_06B}
    args.seqs = args.seqs or [256 if args.tiny else 4096]
    args.rows = args.rows or (2 if args.tiny else 1)
    args.docs = args.docs or (2 if args.tiny else 4)
    args.warmup = args.warmup if args.warmup is not None else (0 if args.tiny else 2)
    args.repeat = args.repeat or (2 if args.tiny else 5)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))

    from megatron_npr.distributed import destroy_distributed, init_distributed

    init_distributed(tp=1, pp=1, seed=args.seed)
    try:
        for seq in args.seqs:
            batch, note = to_device(make_batch(args.rows, seq, args.docs, shape["vocab"]), args.device)
            tokens = args.rows * seq
            pairs = int(_visible(batch).sum()) if seq <= 16384 else None
            base = {"bench": "model_step", "device": torch.cuda.get_device_name() if args.device == "cuda"
                    else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)",
                    "torch": torch.__version__, "dtype": str(dtype).replace("torch.", ""), **shape,
                    "tied": args.tied, "rows": args.rows, "seq": seq, "docs_per_row": args.docs, "tokens": tokens,
                    "loss_tokens": int(batch.targets()[1].sum()), "visible_pairs_total": pairs,
                    "visible_pairs": round(pairs / (args.rows * seq * (seq + 1) / 2), 4) if pairs else None,
                    "warmup": args.warmup, "repeat": args.repeat}
            if note:
                base["workaround"] = note
            results = []
            for backend in args.backends:
                if backend == "sdpa" and seq > args.sdpa_max_seq:
                    row = {**base, "backend": backend, "ms": None,
                           "skipped": f"seq {seq} > --sdpa-max-seq {args.sdpa_max_seq}"}
                else:
                    row = bench_backend(backend, args, seq, shape, dtype, batch, base)
                results.append(row)
                print(json.dumps(row), flush=True)
            losses = {r["backend"]: r["loss"] for r in results if r.get("loss") is not None}
            if len(losses) > 1:
                ref = next(iter(losses.values()))
                print(json.dumps({"bench": "model_step_check", "seq": seq, "losses": losses,
                                  "max_rel_diff": round(max(abs(v - ref) / max(abs(ref), 1e-12)
                                                            for v in losses.values()), 6)}), flush=True)
            del batch
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
