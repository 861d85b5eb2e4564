"""Benchmark of the topology module on realistic sizes; prints one JSON object.

    python tools/bench_topology.py [--tokens 32768] [--branches 4] [--rounds 2] [--samples 20000]

Measures, on the real Qwen3 tag ids: parse + layout of one long trajectory, collecting all
defects, the text-level format reward, the dense reference mask, and packing many samples.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time

import torch

from megatron_npr.topology import (NPR_TAGS, Layout, PackSample, TagIds, build_layout, find_defects,
                                   format_reward, pack)


def trajectory(tags: TagIds, tokens: int, branches: int, rounds: int, rng: random.Random) -> list[int]:
    """Prompt, `rounds` blocks of `branches` equal branches, answer; about `tokens` long."""
    per_round = (tokens - 600) // rounds
    branch_len = (per_round - 40 - 3 * branches) // branches
    text = lambda n: [rng.randrange(1000, 100000) for _ in range(n)]  # noqa: E731
    ids = text(500)
    for _ in range(rounds):
        ids += [tags["<guideline>"]]
        for _ in range(branches):
            ids += [tags["<plan>"]] + text(8) + [tags["</plan>"]]
        ids += [tags["</guideline>"]]
        for _ in range(branches):
            ids += [tags["<step>"]] + text(branch_len - 2) + [tags["</step>"]]
        ids += [tags["<takeaway>"]] + text(30) + [tags["</takeaway>"]]
    return ids + text(max(0, tokens - len(ids)))


def timed(fn, repeat: int) -> float:
    """Median seconds over `repeat` runs."""
    runs = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t)
    return statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--branches", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--samples", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    rng = random.Random(0)
    tags = TagIds.from_mapping({t: 151669 + i for i, t in enumerate(NPR_TAGS)})
    ids = trajectory(tags, args.tokens, args.branches, args.rounds, rng)
    text = "Think.<guideline>" + "<plan>1: part</plan>" * 4 + "</guideline>" + \
           "".join(f"<step>{j}: " + "x = 1 + 2 " * 1000 + "</step>" for j in range(1, 5)) + \
           "<takeaway>done</takeaway> \\boxed{3}"
    short = [rng.randrange(200, 4000) for _ in range(args.samples)]
    samples = [PackSample(torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.bool), Layout.causal(n))
               for n in short]
    small = trajectory(tags, 8192, args.branches, args.rounds, rng)  # the dense mask is O(L^2)
    small_layout = build_layout(small, tags, response_start=500)
    result = {
        "bench": "topology", "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "tokens": len(ids), "branches": args.branches, "rounds": args.rounds,
        "build_layout_ms": 1e3 * timed(lambda: build_layout(ids, tags, response_start=500), args.repeat),
        "find_defects_ms": 1e3 * timed(lambda: find_defects(ids, tags, response_start=500), args.repeat),
        "format_reward_ms": 1e3 * timed(lambda: format_reward(text), args.repeat),
        "format_reward_chars": len(text),
        "dense_mask_tokens": len(small),
        "dense_mask_ms": 1e3 * timed(small_layout.dense_mask, args.repeat),
        "pack_samples": args.samples,
        "pack_s": timed(lambda: pack(samples, 16384), 1),
        "pack_rows": len(pack(samples, 16384)),
        "pack_lower_bound_rows": -(-sum(short) // 16384),
    }
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()
