"""Benchmark of the RL stages: the tiny three-stage pipeline over several seeds, printing JSON.

    python tools/bench_rl.py                       # seeds 0 1 2, examples/tiny/pipeline.yaml
    python tools/bench_rl.py --seeds 0 1 2 3 --out runs/bench_rl dapo.steps=24

The bootstrap (tokenizer, random model, data, bootstrap training and its evaluation) is shared:
it runs once, in the first seed's folder, and is copied into the others. A seed then changes
every sampled stage: DAPO's and PAPO's rollouts (`rl.seed`) and rejection sampling's draws. The
evaluations keep their own fixed seeds, so two models are compared on the same draws.

Per stage, the effect on the metric the stage is for, as mean and population std over seeds:
- stage 1 (DAPO): NPR format rate of the sequentially decoded model, after minus before;
- stage 2 (RS + SFT): parallel trigger rate, parallel-decoded SFT model minus the DAPO model
  decoded sequentially (the same metric, each model decoding as its stage does);
- stage 3 (PAPO): accuracy of the parallel-decoded model, after minus before;
plus every evaluation metric per stage, the RL steps' time split into generate / reward /
train / sync, and each run's stage seconds. `exceeds_std` says whether |mean| > std.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ("tokenizer", "model_init", "data", "model_bootstrap", "bootstrap.json", "eval_bootstrap.json")
EFFECTS = {"dapo": ("npr_format_rate", "bootstrap", "dapo"), "sft": ("parallel_trigger_rate", "dapo", "sft"),
           "papo": ("accuracy", "sft", "papo")}
METRICS = ("accuracy", "npr_format_rate", "parallel_trigger_rate", "ideal_speedup", "measured_speedup")
PHASES = ("generate", "reward", "train", "sync")


def _stats(values: list[float]) -> dict:
    mean = statistics.fmean(values)
    std = statistics.pstdev(values) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "values": values}


@contextlib.contextmanager
def stdout_to_stderr():
    """The pipeline's tables and its child processes' summaries go to stderr (file descriptor
    level, so children inherit it): stdout carries the benchmark's JSON only."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def run_seed(config: Path, out: Path, seed: int, overrides: list[str], shared_from: Path | None) -> dict:
    from megatron_npr.config import load_config
    from megatron_npr.pipeline.config import PipelineConfig
    from megatron_npr.pipeline.run import run_pipeline
    from megatron_npr.training.run_log import read_history

    if shared_from is not None and not (out / "model_bootstrap").exists():
        out.mkdir(parents=True, exist_ok=True)
        for name in SHARED:
            src = shared_from / name
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, out / name)
    seeded = [f"dapo.seed={1234 + seed}", f"papo.seed={4321 + seed}", f"sample.sampling.seed={seed}"]
    cfg = load_config(PipelineConfig, config, [f"out_dir={out}", *overrides, *seeded])
    report = run_pipeline(cfg)
    split = {}
    for stage in ("dapo", "papo"):
        rows = read_history(out / stage)
        split[stage] = {p: statistics.fmean(r[f"time_{p}_s"] for r in rows) for p in PHASES}
        split[stage]["step"] = statistics.fmean(r["step_time_s"] for r in rows)
    return {"eval": report["eval"], "stage_seconds": report["stage_seconds"], "step_time_s": split}


def summarize(runs: dict[int, dict]) -> dict:
    effects = {}
    for stage, (metric, before, after) in EFFECTS.items():
        deltas = [r["eval"][after][metric] - r["eval"][before][metric] for r in runs.values()]
        s = _stats(deltas)
        effects[stage] = {"metric": metric, "before": before, "after": after, **s,
                          "exceeds_std": abs(s["mean"]) > s["std"]}
    evals = {name: {m: _stats([r["eval"][name][m] for r in runs.values() if r["eval"][name].get(m) is not None])
                    for m in METRICS if all(r["eval"][name].get(m) is not None for r in runs.values())}
             for name in ("bootstrap", "dapo", "sft", "papo")}
    split = {}
    for stage in ("dapo", "papo"):
        mean = {p: statistics.fmean(r["step_time_s"][stage][p] for r in runs.values()) for p in (*PHASES, "step")}
        split[stage] = {**{f"{p}_s": v for p, v in mean.items()},
                        **{f"{p}_share": mean[p] / mean["step"] for p in PHASES}}
    return {"effects": effects, "eval": evals, "rl_step_time": split}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "examples/tiny/pipeline.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/bench_rl"))
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the pipeline config")
    args = parser.parse_args(argv)
    if len(args.seeds) < 2:
        parser.error("--seeds needs at least two seeds to measure a seed-to-seed std")
    started, runs, first = time.perf_counter(), {}, None
    for seed in args.seeds:
        out = args.out / f"seed_{seed}"
        with stdout_to_stderr():
            runs[seed] = run_seed(args.config, out, seed, args.overrides, first)
        first = first or out
    result = {"config": str(args.config), "overrides": args.overrides, "seeds": args.seeds,
              **summarize(runs), "runs": runs, "seconds": time.perf_counter() - started}
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
