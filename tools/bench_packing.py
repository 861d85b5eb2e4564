"""Packing efficiency of topology.pack on ORZ-length SFT trajectories; prints one JSON object.

    python tools/bench_packing.py [--data-dir ../shared/data/orz] [--sizes 32768 16384 8192]
                                  [--median 2500 --sigma 0.8 --min-len 200 --max-len 16384] [--seed 0]

Prompt lengths are real: every ORZ question in the data folder, wrapped in the chat template with
the NPR instruction and tokenized with the bundled Qwen3 tokenizer. Response lengths are drawn
from a lognormal (median 2.5k tokens, sigma 0.8: p10 ~ 0.9k, p90 ~ 7k, a long-CoT / NPR-like
spread), clipped to [200, 16k], with a fixed seed. Efficiency = real tokens / (rows * max_tokens);
the lower bound on rows is ceil(total / max_tokens). Samples longer than a row size are left out
at that size (counted in `dropped_overlong`), as the SFT loader's max_tokens does.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import random
import time
from pathlib import Path

import torch

from megatron_npr.topology import Layout, PackSample, pack

REPEATS = 3
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "orz"


def orz_prompt_lengths(data_dir: Path) -> tuple[list[int] | None, list[str]]:
    """Token count of the NPR chat prompt of every ORZ question under data_dir (None if absent)."""
    from megatron_npr.data.problems import load_problems
    from megatron_npr.data.prompts import NPR_INSTRUCTION, chat_prompt_text
    from megatron_npr.data.tokenizer import load_tokenizer

    files = sorted(data_dir.glob("orz*.json")) if data_dir.is_dir() else []
    if not files:
        return None, []
    tokenizer, _ = load_tokenizer()
    questions = [p.question for f in files for p in load_problems(f, skip_bad=True)]
    texts = [chat_prompt_text(q, tokenizer, NPR_INSTRUCTION) for q in questions]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [len(ids) for ids in encoded], [str(f) for f in files]


def synthetic_prompt_lengths(n: int, rng: random.Random) -> list[int]:
    """Fallback: NPR instruction + template (~190 tokens) plus a lognormal question (median 90)."""
    return [190 + int(rng.lognormvariate(math.log(90), 0.7)) for _ in range(n)]


def response_lengths(n: int, median: float, sigma: float, lo: int, hi: int, rng: random.Random) -> list[int]:
    return [min(hi, max(lo, round(rng.lognormvariate(math.log(median), sigma)))) for _ in range(n)]


def as_samples(lengths: list[int]) -> list[PackSample]:
    """Causal documents of the given lengths: packing looks only at lengths, so contents are zeros."""
    return [PackSample(torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.bool), Layout.causal(n))
            for n in lengths]


def measure(samples: list[PackSample], max_tokens: int) -> dict:
    fits = [s for s in samples if s.token_ids.numel() <= max_tokens]
    total = sum(s.token_ids.numel() for s in fits)
    seconds = []
    for _ in range(REPEATS):  # the first run also pays for fresh memory pages
        started = time.perf_counter()
        rows = pack(fits, max_tokens)
        seconds.append(time.perf_counter() - started)
    lower = math.ceil(total / max_tokens)
    return {"max_tokens": max_tokens, "samples": len(fits), "dropped_overlong": len(samples) - len(fits),
            "real_tokens": total, "rows": len(rows), "rows_lower_bound": lower,
            "efficiency": round(total / (len(rows) * max_tokens), 5),
            "efficiency_upper_bound": round(total / (lower * max_tokens), 5),
            "pack_seconds_median": round(sorted(seconds)[REPEATS // 2], 3), "pack_seconds_first": round(seconds[0], 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--sizes", type=int, nargs="+", default=[32768, 16384, 8192])
    ap.add_argument("--median", type=float, default=2500.0)
    ap.add_argument("--sigma", type=float, default=0.8)
    ap.add_argument("--min-len", type=int, default=200)
    ap.add_argument("--max-len", type=int, default=16384)
    ap.add_argument("--synthetic-count", type=int, default=4510, help="questions when the data folder is missing")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    rng = random.Random(args.seed)
    prompts, files = orz_prompt_lengths(args.data_dir)
    source = {"question_lengths": "orz", "files": files}
    if prompts is None:
        source = {"question_lengths": "synthetic", "missing_data_dir": str(args.data_dir),
                  "note": f"no orz*.json under {args.data_dir}; question lengths are synthetic"}
        prompts = synthetic_prompt_lengths(args.synthetic_count, rng)
    responses = response_lengths(len(prompts), args.median, args.sigma, args.min_len, args.max_len, rng)
    lengths = [p + r for p, r in zip(prompts, responses)]
    samples = as_samples(lengths)
    ordered = sorted(lengths)
    print(json.dumps({
        "benchmark": "packing", "date": time.strftime("%Y-%m-%d"), "host": platform.node(),
        "python": platform.python_version(), "torch": torch.__version__,
        "data": source | {"samples": len(lengths), "prompt_tokens_mean": round(sum(prompts) / len(prompts), 1),
                          "prompt_tokens_max": max(prompts)},
        "response_lengths": {"distribution": "lognormal", "median": args.median, "sigma": args.sigma,
                             "clip": [args.min_len, args.max_len], "seed": args.seed,
                             "mean": round(sum(responses) / len(responses), 1)},
        "sample_tokens": {"p10": ordered[len(ordered) // 10], "p50": ordered[len(ordered) // 2],
                          "p90": ordered[9 * len(ordered) // 10], "max": ordered[-1], "total": sum(lengths)},
        "results": [measure(samples, size) for size in args.sizes],
    }, indent=2))


if __name__ == "__main__":
    main()
