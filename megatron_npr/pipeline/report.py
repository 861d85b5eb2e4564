"""The pipeline's report: a table of every stage's evaluation on stdout, report/metrics.json,
report/eval.png (the evaluations side by side) and report/curves.png (each stage's training)."""
from __future__ import annotations

import json
from pathlib import Path

from ..io import write_json_atomic
from ..training.run_log import read_history

# evaluation column -> (title, decoding): the model after each stage, as it is meant to decode
STAGES = {"bootstrap": ("bootstrap", "seq"), "dapo": ("DAPO", "seq"), "sft": ("RS+SFT", "par"),
          "papo": ("PAPO", "par")}
ROWS = (("accuracy", "accuracy"), ("NPR format rate", "npr_format_rate"), ("format validity", "format_validity"),
        ("parallel trigger rate", "parallel_trigger_rate"), ("ideal speedup", "ideal_speedup"),
        ("measured speedup", "measured_speedup"), ("mean response tokens", "mean_response_tokens"))


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def table(evals: dict[str, dict]) -> str:
    names = [n for n in STAGES if n in evals]
    width = max(len(name) for name, _ in ROWS)
    head = "".join(f"  {STAGES[n][0]:>9}" for n in names)
    lines = [f"{'':{width}}{head}", f"{'decoding':{width}}" + "".join(f"  {STAGES[n][1]:>9}" for n in names)]
    for name, key in ROWS:
        lines.append(f"{name:{width}}" + "".join(f"  {_fmt(evals[n].get(key)):>9}" for n in names))
    return "\n".join(lines)


def _plot_evals(evals: dict[str, dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("accuracy", "accuracy"), ("NPR format rate", "npr_format_rate"), ("trigger rate", "parallel_trigger_rate")]
    names = [n for n in STAGES if n in evals]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    width = 0.8 / max(len(names), 1)
    for k, name in enumerate(names):
        xs = [x + (k - (len(names) - 1) / 2) * width for x in range(len(keys))]
        ax.bar(xs, [evals[name].get(key) or 0 for _, key in keys], width, label=f"after {STAGES[name][0]}")
    ax.set_xticks(list(range(len(keys))), [n for n, _ in keys])
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("held-out synthetic problems")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_curves(out: Path, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    boot = out / "bootstrap.json"
    panels = [("bootstrap loss", json.loads(boot.read_text())["history"] if boot.is_file() else [], ("loss",)),
              ("stage 1: DAPO", read_history(out / "dapo"), ("npr_format_rate", "accuracy")),
              ("stage 2: SFT loss", read_history(out / "sft"), ("loss",)),
              ("stage 3: PAPO", read_history(out / "papo"), ("accuracy", "npr_format_rate"))]
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.2))
    for ax, (title, rows, keys) in zip(axes, panels):
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker="." if len(points) < 50 else None, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path, evals: dict[str, dict], stages: dict[str, dict], timings: dict) -> dict:
    folder = out / "report"
    folder.mkdir(parents=True, exist_ok=True)
    report = {"eval": evals, "stages": stages, "stage_seconds": timings}
    write_json_atomic(folder / "metrics.json", report, sort_keys=False)
    _plot_evals(evals, folder / "eval.png")
    _plot_curves(out, folder / "curves.png")
    print(table(evals))
    print(f"report: {folder}/metrics.json, eval.png, curves.png")
    return report
