"""Benchmark of the weight sync transport (megatron_npr.rollout.weight_transport): one sender and
N receiver processes in a weight-update group, Qwen3-shaped weights, printing JSON rows.

    python tools/bench_sync.py                                   # 0.6B, bf16, gloo, 1 receiver
    python tools/bench_sync.py --models 0.6b 1.7b --bucket-mb 64 512 --receivers 1 2

Per row: model, bytes, bucket size, wire format (per tensor / flattened), receivers, seconds for
one whole update (the sender's announce + broadcast of every bucket until every receiver has it;
the median of --repeat) and GB/s. The tensors are the model's HF names and shapes in HF order,
filled with zeros (the bytes do not change the time); no model is built, no engine loads them.
On CPU this measures gloo over loopback: a floor for what a real update costs, not a GPU figure.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

# Qwen3 dense models (config.json of the released checkpoints): hidden, intermediate, layers,
# heads, kv heads; every one has head_dim 128, vocabulary 151,936 and tied embeddings up to 4B
MODELS = {"0.6b": (1024, 3072, 28, 16, 8), "1.7b": (2048, 6144, 28, 16, 8), "4b": (2560, 9728, 36, 32, 8)}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def model_tensors(name: str, dtype: torch.dtype) -> list[tuple[str, torch.Tensor]]:
    from megatron_npr.models.qwen3_hf import Qwen3Spec, tensor_shapes

    hidden, inter, layers, heads, kv = MODELS[name]
    spec = Qwen3Spec(vocab_size=151936, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
                     num_heads=heads, num_kv_heads=kv, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6,
                     tie_word_embeddings=True)
    return [(n, torch.zeros(shape, dtype=dtype)) for n, shape in tensor_shapes(spec).items()]


def buckets_of(tensors, bucket_bytes: int) -> list[list[tuple[str, torch.Tensor]]]:
    """Consecutive tensors in lists of at most bucket_bytes (a larger tensor alone)."""
    out, current, size = [], [], 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > bucket_bytes:
            out.append(current)
            current, size = [], 0
        current.append((name, t))
        size += nbytes
    return out + ([current] if current else [])


def worker(rank: int, world: int, port: int, args, rows: list) -> None:
    import torch.distributed as dist

    from megatron_npr.distributed import init_weight_group
    from megatron_npr.rollout.weight_transport import receive_weights, send_weights

    group = init_weight_group("127.0.0.1", port, world, rank, "bench_sync", timeout_s=600)
    for model in args.models:
        tensors = model_tensors(model, DTYPES[args.dtype]) if rank == 0 else None
        total = sum(t.numel() * t.element_size() for _, t in tensors) if rank == 0 else 0
        for mb in args.bucket_mb:
            buckets = buckets_of(tensors, mb * 2**20) if rank == 0 else None
            for flattened in (False, True):
                times = []
                for _ in range(args.repeat):
                    dist.barrier(group=group)
                    start = time.perf_counter()
                    if rank == 0:
                        send_weights(buckets, group, flattened=flattened)
                    else:
                        for _ in receive_weights(group, flattened=flattened):
                            pass
                    dist.barrier(group=group)  # every receiver has every bucket
                    times.append(time.perf_counter() - start)
                if rank == 0:
                    seconds = statistics.median(times)
                    rows.append({"model": model, "dtype": args.dtype, "bytes": total, "bucket_mb": mb,
                                 "buckets": len(buckets), "format": "flattened" if flattened else "per_tensor",
                                 "receivers": world - 1, "seconds": seconds, "GB_per_s": total / seconds / 1e9})
                    print(json.dumps(rows[-1]), flush=True)


def _spawned(rank, world, port, args):
    worker(rank, world, port, args, [])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["0.6b"], choices=sorted(MODELS))
    ap.add_argument("--bucket-mb", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--receivers", type=int, nargs="+", default=[1])
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    from megatron_npr.distributed import free_port

    for receivers in args.receivers:
        torch.multiprocessing.spawn(_spawned, args=(receivers + 1, free_port(), args), nprocs=receivers + 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
