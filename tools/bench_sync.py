"""Benchmark of the weight sync transports, Qwen3-shaped weights, printing JSON rows:

- `group`: one sender and N receiver processes in a weight-update group
  (megatron_npr.rollout.weight_transport, SGLang's update_weights_from_distributed wire), per
  tensor or flattened; the split placement's path;
- `tensor`: the colocated SGLang path (megatron_npr.rollout.tensor_payload): each bucket
  serialized for one TP rank, deserialized and copied into the engine's tensors, in one process
  (on a GPU the payload is a CUDA-IPC handle; on CPU a shared-memory file, so this counts one
  copy into shared memory that a GPU does not make);
- `inprocess`: the colocated torch engine's path, a copy into the engine's tensors.

    python tools/bench_sync.py                                   # 0.6B, bf16, every transport
    python tools/bench_sync.py --models 0.6b 1.7b 4b --bucket-mb 64 512 --receivers 1 2

Per row: transport, model, bytes, bucket size, format, receivers, seconds for one whole update
(until every receiver holds every bucket; the median of --repeat) and GB/s. The tensors are the
model's HF names and shapes in HF order, filled with zeros (the bytes do not change the time).
On CPU `group` measures gloo over loopback: a floor for what a real update costs, not a GPU figure.
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
                    rows.append({"transport": "group", "device": "cpu", "model": model, "dtype": args.dtype, "bytes": total, "bucket_mb": mb,
                                 "buckets": len(buckets), "format": "flattened" if flattened else "per_tensor",
                                 "receivers": world - 1, "seconds": seconds, "GB_per_s": total / seconds / 1e9})
                    print(json.dumps(rows[-1]), flush=True)


def local_transports(args) -> None:
    """`tensor` and `inprocess`: the sender's buckets into an engine's preallocated tensors."""
    from megatron_npr.rollout.tensor_payload import deserialize_payload, serialize_bucket

    for model in args.models:
        tensors = [(n, t.to(args.device)) for n, t in model_tensors(model, DTYPES[args.dtype])]
        engine = {n: torch.empty_like(t) for n, t in tensors}
        total = sum(t.numel() * t.element_size() for _, t in tensors)
        for mb in args.bucket_mb:
            buckets = buckets_of(tensors, mb * 2**20)
            cases = [("inprocess", None)] * ("inprocess" in args.transports)
            cases += [("tensor", f) for f in (False, True)] * ("tensor" in args.transports)
            for transport, flattened in cases:
                times = []
                for _ in range(args.repeat):
                    start = time.perf_counter()
                    for bucket in buckets:
                        if transport == "tensor":
                            payloads = serialize_bucket(bucket, 1, flattened)
                            bucket = deserialize_payload(payloads[0])
                        for name, t in bucket:
                            engine[name].copy_(t)
                    if args.device == "cuda":
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - start)
                seconds = statistics.median(times)
                fmt = "copy" if flattened is None else "flattened" if flattened else "per_tensor"
                print(json.dumps({"transport": transport, "device": args.device, "model": model, "dtype": args.dtype,
                                  "bytes": total,
                                  "bucket_mb": mb, "buckets": len(buckets), "format": fmt, "receivers": 1,
                                  "seconds": seconds, "GB_per_s": total / seconds / 1e9}), flush=True)
        del engine, tensors


def _spawned(rank, world, port, args):
    worker(rank, world, port, args, [])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["0.6b"], choices=sorted(MODELS))
    ap.add_argument("--bucket-mb", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--receivers", type=int, nargs="+", default=[1])
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--transports", nargs="+", default=["group", "tensor", "inprocess"],
                    choices=["group", "tensor", "inprocess"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="where tensor and inprocess keep the weights (group runs over gloo on the CPU)")
    args = ap.parse_args(argv)
    from megatron_npr.distributed import free_port

    local_transports(args)
    for receivers in args.receivers if "group" in args.transports else []:
        torch.multiprocessing.spawn(_spawned, args=(receivers + 1, free_port(), args), nprocs=receivers + 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
