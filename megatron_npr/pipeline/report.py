"""The pipeline's report: a short table on stdout, report/metrics.json and report/*.png."""
from __future__ import annotations

import json
from pathlib import Path

from ..io import write_json_atomic

ROWS = (("accuracy", "accuracy"), ("format validity", "format_validity"),
        ("parallel trigger rate", "parallel_trigger_rate"), ("ideal speedup", "ideal_speedup"),
        ("measured speedup", "measured_speedup"), ("mean response tokens", "mean_response_tokens"))


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def table(before: dict, after: dict) -> str:
    width = max(len(name) for name, _ in ROWS)
    lines = [f"{'':{width}}  {'before':>8}  {'after':>8}"]
    for name, key in ROWS:
        lines.append(f"{name:{width}}  {_fmt(before.get(key)):>8}  {_fmt(after.get(key)):>8}")
    return "\n".join(lines)


def _plot_bars(before: dict, after: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("accuracy", "accuracy"), ("format validity", "format_validity"), ("trigger rate", "parallel_trigger_rate")]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    xs = range(len(keys))
    ax.bar([x - 0.2 for x in xs], [before.get(k) or 0 for _, k in keys], 0.4, label="after bootstrap")
    ax.bar([x + 0.2 for x in xs], [after.get(k) or 0 for _, k in keys], 0.4, label="after RS + SFT")
    ax.set_xticks(list(xs), [n for n, _ in keys])
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("held-out synthetic problems")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_losses(out: Path, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    boot = out / "bootstrap.json"
    if boot.is_file():
        h = json.loads(boot.read_text())["history"]
        axes[0].plot([r["step"] for r in h], [r["loss"] for r in h])
    axes[0].set_title("bootstrap loss")
    sft = out / "sft" / "metrics.jsonl"
    if sft.is_file():
        h = [json.loads(line) for line in sft.read_text().splitlines() if line.strip()]
        axes[1].plot([r["step"] for r in h], [r["loss"] for r in h], marker=".")
    axes[1].set_title("SFT loss (rejection-sampled data)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path, before: dict, after: dict, rejection: dict, timings: dict) -> dict:
    folder = out / "report"
    folder.mkdir(parents=True, exist_ok=True)
    report = {"before": before, "after": after, "rejection_sampling": rejection, "stage_seconds": timings}
    write_json_atomic(folder / "metrics.json", report, sort_keys=False)
    _plot_bars(before, after, folder / "eval.png")
    _plot_losses(out, folder / "loss.png")
    print(table(before, after))
    print(f"report: {folder}/metrics.json, eval.png, loss.png")
    return report
