"""Scaling grid on what is here (CPU gloo ranks; CUDA when present): throughput and peak memory of
`MegatronTrainer.step` per model size, layout (DP, TP, PP), packed row length and rank count, each
point one run of tools/measure_memory.py under torchrun; plus `npr plan`'s projection for
8 nodes x 8 H100 with Qwen3-4B PAPO (labelled "projection"). Prints the JSON summary; writes OUT/scaling.json and PNGs.

    python tools/scaling.py --out runs/scaling [--ranks 1,2,4] [--quick] [--config PAPO.yaml]

weak scaling: each DP rank trains one microbatch (tokens per rank fixed);
strong scaling: a fixed global batch of `max(ranks)` rows, split over the DP ranks.
TP and PP layouts have dp = 1: weak runs one microbatch, strong the whole global batch.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))


def grid(quick: bool, ranks: list[int]) -> list[dict]:
    """The points to run: (model, layout, max_tokens, ranks, mode)."""
    sizes = {"tiny": [128]} if quick else {"tiny": [256, 1024], "cpu-large": [512]}
    limits = {"tiny": {"tp": 2, "pp": 2}, "cpu-large": {"tp": 4, "pp": 8}}  # kv heads, layers
    modes = ["weak"] if quick else ["weak", "strong"]
    layouts = ["dp"] if quick else ["dp", "tp", "pp"]
    points = []
    for model, lengths in sizes.items():
        for length in lengths:
            for n in ranks:
                for layout in (["dp"] if n == 1 else layouts):
                    if layout != "dp" and n > limits[model][layout]:
                        continue
                    points += [dict(model=model, layout=layout, max_tokens=length, ranks=n, mode=m) for m in modes]
    return points


def run_point(p: dict, model_dir: Path, work: Path, steps: int, global_rows: int) -> dict:
    dp = p["ranks"] if p["layout"] == "dp" else 1
    microbatches = 1 if p["mode"] == "weak" else max(global_rows // dp, 1)
    layout = {"dp": [], "tp": [f"parallel.tp={p['ranks']}"], "pp": [f"parallel.pp={p['ranks']}"]}[p["layout"]]
    out = work / f"{p['model']}_{p['layout']}{p['ranks']}_{p['max_tokens']}_{p['mode']}"
    from megatron_npr.distributed import free_port
    launch = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={p['ranks']}",
              f"--master_port={free_port()}"]
    cmd = [*launch, str(ROOT / "tools" / "measure_memory.py"), "--hf-dir", str(model_dir), "--steps", str(steps),
           "--microbatches", str(microbatches), "--results", str(out), f"data.max_tokens={p['max_tokens']}", *layout]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    if res.returncode != 0:
        return {**p, "error": res.stderr[-1500:]}
    ranks = [json.loads(f.read_text()) for f in sorted(out.glob("rank_*.json"))]
    return {**p, "kind": "measured", "device": "cpu", "microbatches_per_rank": microbatches,
            "tokens_per_step": ranks[0]["tokens_per_step"],
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in ranks),
            "peak_mib": [round(r["peak_mib"], 1) for r in ranks],
            "estimate_mib": [round(r["estimate_mib"], 1) for r in ranks]}


def projection(config: Path, overrides: list[str]) -> dict:
    """`npr plan`'s estimate for 8 x 8 H100 with Qwen3-4B dims of an RL config (by default the
    PAPO example, whose 8-GPU layout tp 2 x pp 1 becomes dp 32 on 64 GPUs)."""
    from megatron_npr.config import load_config
    from megatron_npr.launch.estimate import estimate
    from megatron_npr.launch.estimate_model import PRESETS
    from megatron_npr.rl.config import RLConfig

    cfg = load_config(RLConfig, config, overrides)
    est = estimate(cfg, 8, 8, "h100", model_config=dict(PRESETS["qwen3-4b"]))
    train_s = est.time_s["train step (forward+backward)"]
    return {"kind": "projection", "device": "8x8 H100 (estimate)", "model": "qwen3-4b", "config": str(config),
            "overrides": overrides, "ranks": 64, "layout": f"tp{est.tp} dp{est.dp}",
            "tokens_per_step": est.tokens_per_step, "tokens_per_s": est.tokens_per_step / train_s,
            "rl_step_s": est.time_s.get("RL step (rollout + train)"), "memory_gib_per_gpu": est.total_gib,
            "fits": est.fits, "warnings": est.warnings}


def plot(points: list[dict], proj: dict, out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for metric, ylabel, name in (("tokens_per_s", "tokens/s per step", "throughput.png"),
                                 ("peak_mib", "peak MiB (max over ranks)", "memory.png")):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=metric == "peak_mib")
        for ax, mode in zip(axes, ("weak", "strong")):
            series = {}
            for p in points:
                if p.get("kind") == "measured" and p["mode"] == mode:
                    key = f"{p['model']} {p['layout']} s={p['max_tokens']}"
                    y = p[metric] if metric == "tokens_per_s" else max(p[metric])
                    series.setdefault(key, []).append((p["ranks"], y, max(p["estimate_mib"])))
            for key, xs in sorted(series.items()):
                xs.sort()
                line, = ax.plot([x for x, _, _ in xs], [y for _, y, _ in xs], marker="o", label=key)
                if metric == "peak_mib":
                    ax.plot([x for x, _, _ in xs], [e for _, _, e in xs], ls="--", color=line.get_color())
            if metric == "tokens_per_s":
                ax.plot([proj["ranks"]], [proj["tokens_per_s"]], marker="*", ms=14, ls="",
                        label="projection: 8x8 H100 Qwen3-4B PAPO (npr plan)")
            else:
                ax.plot([proj["ranks"]], [proj["memory_gib_per_gpu"] * 1024], marker="*", ms=14, ls="",
                        label="projection: 8x8 H100 Qwen3-4B PAPO, MiB/GPU")
            ax.set(xscale="log", yscale="log", xlabel="ranks", ylabel=ylabel,
                   title=f"{mode} scaling (CPU gloo measured; dashed: estimate)")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        files.append(str(out / name))
    return files


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--ranks", default="1,2,4")
    p.add_argument("--quick", action="store_true", help="tiny model, 128-token rows, DP only, weak only")
    p.add_argument("--steps", type=int, default=None, help="steps per point (the first is the warm-up)")
    p.add_argument("--config", default=str(ROOT / "examples" / "qwen3_4b" / "papo_64gpu.yaml"))
    p.add_argument("--override", action="append", default=[], help="key=value for the projection's config")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ranks = [int(r) for r in args.ranks.split(",")]
    steps = args.steps or (3 if args.quick else 4)
    from measure_memory import write_model
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        points = grid(args.quick, ranks)
        models = {m: write_model(m, work / m) for m in {pt["model"] for pt in points}}
        results = [run_point(pt, models[pt["model"]], work, steps, max(ranks)) for pt in points]
    proj = projection(Path(args.config), args.override)
    summary = {"device": "cpu (gloo, OMP_NUM_THREADS=1 per rank)", "steps": steps, "points": results,
               "projection": proj}
    summary["plots"] = plot(results, proj, out)
    (out / "scaling.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
