"""One rank of a weight-update group for tests/test_weight_transport.py (gloo, CPU).

    python weight_group.py RANK WORLD PORT OUT_DIR

Rank 0 is the trainer side: it streams the buckets of a tiny random Qwen3 (seed 0; fp32, with
one bucket cast to bf16) to every other rank, four times:
  1. our protocol (announcement over the group, then the tensors), one broadcast per tensor;
  2. the same, flattened (one uint8 broadcast per bucket);
  3-4. SGLang's wire only (no announcement): the receivers get (names, dtypes, shapes) out of
       band, as SGLang's `update_weights_from_distributed` API call delivers them, and receive
       with `sglang_like_receive`, written here from the research note and not from our receiver.
Rank 1 loads what it receives in phase 1 into an NPREngine built with other random weights
(seed 1). Every receiver writes OUT_DIR/rank_R.json: per phase, whether every tensor arrived
bitwise equal (name, dtype, shape, bytes), and for rank 1 whether the engine now holds what
was sent.
"""
import json
import os
import sys
import warnings

warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def model_buckets(seed: int = 0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, tie_word_embeddings=True)
    model = Qwen3ForCausalLM(cfg)
    named = [(k, v.detach().clone()) for k, v in model.state_dict().items() if k != "lm_head.weight"]
    third = len(named) // 3
    return cfg, [named[:third], named[third:2 * third], named[2 * third:]]


def sglang_like_receive(names, dtypes, shapes, group, flattened: bool):
    """The receiver as the research note describes SGLang 0.5.21's: per (name, dtype, shape) in
    list order, torch.empty(shape, dtype=getattr(torch, dtype)) and an async broadcast from
    rank 0, then wait for all; or, flattened, one uint8 tensor of every tensor's bytes in list
    order, viewed back per tensor."""
    if not flattened:
        out, handles = [], []
        for name, dtype, shape in zip(names, dtypes, shapes):
            t = torch.empty(shape, dtype=getattr(torch, dtype))
            handles.append(dist.broadcast(t, src=0, group=group, async_op=True))
            out.append((name, t))
        for h in handles:
            h.wait()
        return out
    sizes = [torch.Size(s).numel() * torch.empty((), dtype=getattr(torch, d)).element_size()
             for d, s in zip(dtypes, shapes)]
    flat = torch.empty(sum(sizes), dtype=torch.uint8)
    dist.broadcast(flat, src=0, group=group)
    out, at = [], 0
    for name, dtype, shape, size in zip(names, dtypes, shapes, sizes):
        chunk = flat[at:at + size]
        if at % torch.empty((), dtype=getattr(torch, dtype)).element_size():
            chunk = chunk.clone()  # an unaligned byte offset cannot be viewed as a wider dtype
        out.append((name, chunk.view(getattr(torch, dtype)).reshape(shape)))
        at += size
    return out


def same(sent, got) -> bool:
    return len(sent) == len(got) and all(
        n1 == n2 and t1.dtype == t2.dtype and t1.shape == t2.shape and t1.view(-1).view(torch.uint8).equal(
            t2.contiguous().view(-1).view(torch.uint8)) for (n1, t1), (n2, t2) in zip(sent, got))


def main(rank: int, world: int, port: int, out_dir: str) -> None:
    from megatron_npr.distributed import init_weight_group
    from megatron_npr.rollout.weight_transport import broadcast_bucket, describe, receive_weights, send_weights

    group = init_weight_group("127.0.0.1", port, world, rank, "weight_update_group", timeout_s=60)
    cfg, buckets = model_buckets(0)
    buckets[1] = [(n, t.to(torch.bfloat16)) for n, t in buckets[1]]  # exact dtypes, no conversion
    flat_sent = [pair for b in buckets for pair in b]
    result = {}
    for phase, flattened in (("ours", False), ("ours_flat", True)):
        if rank == 0:
            result[phase] = send_weights(buckets, group, flattened=flattened)
            continue
        got = [pair for b in receive_weights(group, flattened=flattened) for pair in b]
        result[phase] = same(flat_sent, got)
        if rank == 1 and phase == "ours":
            result["engine"] = engine_takes(cfg, got)
    for phase, flattened in (("sglang", False), ("sglang_flat", True)):
        for bucket in buckets:
            metas = describe(bucket)  # what the API call carries: names, dtypes, shapes
            if rank == 0:
                broadcast_bucket(bucket, metas, group, flattened=flattened)
            else:
                got = sglang_like_receive([m.name for m in metas], [m.dtype for m in metas],
                                          [list(m.shape) for m in metas], group, flattened)
                result[phase] = result.get(phase, True) and same(bucket, got)
    with open(os.path.join(out_dir, f"rank_{rank}.json"), "w") as f:
        json.dump(result, f)


def engine_takes(cfg, received) -> bool:
    """An engine with other random weights (seed 1), updated from the stream, holds exactly what
    was sent (bf16 tensors widened to the engine's fp32), and held something else before."""
    from megatron_npr.rollout import NPREngine
    from megatron_npr.topology import TagIds

    _, other = model_buckets(1)
    engine = NPREngine(cfg.to_dict(), dict(pair for b in other for pair in b), tags=TagIds(tuple(range(3, 11))),
                       eos_ids=[2], label_ids=lambda j: [20 + j], kv_slots=256)
    held = engine.weights.tensors
    differed = any(not held[name].equal(t.to(held[name].dtype)) for name, t in received)  # norms start at 1
    count = engine.update_weights(received)
    return differed and count == len(received) and all(held[name].equal(t.to(held[name].dtype))
                                                       for name, t in received)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
