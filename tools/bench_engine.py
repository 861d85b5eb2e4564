"""Engine benchmark: parallel vs sequential decoding of the same NPR trajectories; prints JSON.

    python tools/bench_engine.py [--batch 8] [--branches 4] [--branch-len 64] [--layers 2] [--hidden 128]
                                 [--decode-attention sdpa|triton]

Both modes replay identical token sequences (forced replays of fixed trajectories), so they
decode exactly the same number of tokens; the parallel engine forks the branches and decodes them
side by side, the sequential one decodes them one after another. The ideal speedup is total
response tokens / critical-path tokens; the measured one is the ratio of wall-clock times.

`--decode-attention triton` decodes with the split-K kernel (kernels/npr_decode_attention.py).
Without CUDA it runs in Triton's interpreter: the row then says `"interpreted": true`, and its
times measure the interpreter, not the kernel (a correctness run only; use tiny sizes).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

if not torch.cuda.is_available():  # before transformers imports triton (megatron_npr/kernels/triton_sources.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from megatron_npr.rollout import NPREngine, SamplingParams
from megatron_npr.topology import NPR_TAGS, TagIds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8, help="prompts decoded together")
    ap.add_argument("--branches", type=int, default=4)
    ap.add_argument("--branch-len", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--decode-attention", choices=["sdpa", "triton"], default="sdpa")
    args = ap.parse_args()
    interpreted = args.decode_attention == "triton" and args.device != "cuda"
    if interpreted:
        print("bench_engine: the Triton kernel runs in the interpreter here; its times are not performance",
              file=sys.stderr)
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    heads = max(2, args.hidden // 64)
    cfg = Qwen3Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
                      head_dim=args.hidden // heads, max_position_embeddings=1 << 16)
    hf = Qwen3ForCausalLM(cfg)
    tags = TagIds.from_mapping({t: args.vocab - 16 + i for i, t in enumerate(NPR_TAGS)})
    G, g, P, p, S, s, K, k = tags.ids
    eos, label = args.vocab - 1, (lambda j: [args.vocab - 8 + (j % 6)])
    engine = NPREngine(cfg.to_dict(), hf.state_dict(), tags=tags, eos_ids=[eos], label_ids=label,
                       kv_slots=args.batch * (64 + 16 * args.branches * args.branch_len) + 4096, device=args.device,
                       decode_attention=args.decode_attention)
    gen = torch.Generator().manual_seed(1)
    text = lambda n: torch.randint(0, args.vocab - 16, (n,), generator=gen).tolist()  # noqa: E731
    response = text(8) + [G] + sum(([P] + text(6) + [p] for _ in range(args.branches)), []) + [g]
    for j in range(1, args.branches + 1):
        response += [S] + label(j) + text(args.branch_len - 3) + [s]
    response += [K] + text(16) + [k] + text(8) + [eos]
    prompts = [text(32) for _ in range(args.batch)]
    budget = len(response) + 1
    rows = {}
    for parallel in (True, False):
        params = SamplingParams(max_new_tokens=budget, parallel=parallel)
        engine.generate(prompts[:1], params, replay=[response])  # warm-up
        times = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            out = engine.generate(prompts, params, replay=[response] * args.batch)
            times.append(time.perf_counter() - t)
        assert all(r.finish_reason == "stop" for r in out)
        rows[parallel] = (min(times), out[0].stats)
    (tp, stats), (ts, _) = rows[True], rows[False]
    total, critical = stats["response_tokens"], stats["critical_path_tokens"]
    print(json.dumps({
        "bench": "engine", "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.machine(),
        "threads": torch.get_num_threads(), "decode_attention": args.decode_attention, "interpreted": interpreted,
        "batch": args.batch, "branches": args.branches,
        "branch_len": args.branch_len, "layers": args.layers, "hidden": args.hidden,
        "response_tokens": total, "critical_path_tokens": critical, "ideal_speedup": round(total / critical, 3),
        "parallel_s": round(tp, 4), "sequential_s": round(ts, 4), "measured_speedup": round(ts / tp, 3),
        "parallel_tokens_per_s": round(args.batch * total / tp, 1),
        "sequential_tokens_per_s": round(args.batch * total / ts, 1)}))


if __name__ == "__main__":
    main()
