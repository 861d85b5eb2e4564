"""Per-step metrics of a training run: metrics.jsonl (the record resumes trust), TensorBoard
scalars, and a PNG of the curves at the end."""
from __future__ import annotations

import json
from pathlib import Path

from ..io import append_jsonl, write_jsonl_atomic

PLOTTED = ("loss", "lr", "grad_norm", "tokens_per_s")
METRICS_FILE = "metrics.jsonl"


def read_history(out_dir: str | Path, upto: int | None = None) -> list[dict]:
    """Metrics of steps <= upto (every step when None) from an earlier (possibly killed) run;
    later lines are dropped."""
    path = Path(out_dir) / METRICS_FILE
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if upto is None or r["step"] <= upto]


class MetricsLogger:
    """Rewrites metrics.jsonl with the kept `history` (steps of a killed run after the resumed
    checkpoint are dropped, so the file is one consistent curve), then appends one line a step.
    TensorBoard scalars are named `scalar_prefix + key`."""

    def __init__(self, out_dir: str | Path, history: list[dict], enabled: bool = True, tensorboard: bool = True,
                 scalar_prefix: str = "train/"):
        self.history, self.enabled, self.writer = list(history), enabled, None
        self.scalar_prefix = scalar_prefix
        if not enabled:
            return
        out = Path(out_dir)
        self.path = write_jsonl_atomic(out / METRICS_FILE, self.history)
        self.file = self.path.open("a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=len(self.history) + 1)
            except Exception as e:  # tensorboard is optional at run time; the JSONL record is not
                print(f"tensorboard logging off: {e}")

    def log(self, metrics: dict) -> None:
        self.history.append(metrics)
        if not self.enabled:
            return
        append_jsonl(self.file, [metrics])
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                    self.writer.add_scalar(f"{self.scalar_prefix}{key}", value, metrics["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.writer is not None:
                self.writer.close()


def plot_curves(history: list[dict], out: str | Path, title: str = "", keys=PLOTTED) -> Path | None:
    """One panel per metric against the step."""
    if not history:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if k in history[0]]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    steps = [r["step"] for r in history]
    for ax, key in zip(axes[0], keys):
        ax.plot(steps, [r[key] for r in history], lw=1.2)
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)
