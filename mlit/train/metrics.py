"""Per-epoch metrics as JSON lines, and their plots."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

METRICS_NAME = "metrics.jsonl"


class MetricsLog:
    """Appends one JSON object per line to ``run_dir/metrics.jsonl`` (flushed each time)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / METRICS_NAME

    def append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")
            f.flush()

    def truncate_after(self, epoch: int) -> None:
        """On resume: drop records of epochs after ``epoch`` (written after the checkpoint)."""
        if not self.path.exists():
            return
        keep = [r for r in read_metrics(self.path) if r.get("epoch", 0) <= epoch]
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in keep)
        os.replace(tmp, self.path)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    p = Path(path)
    if p.is_dir():
        p = p / METRICS_NAME
    if not p.is_file():
        raise FileNotFoundError(f"no {METRICS_NAME} at {p}")
    with open(p) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_run(run_dir: str | os.PathLike) -> list[Path]:
    """Draw loss (and accuracy) curves of a run to PNG files in the run directory.

    Pre-training: the paper's Fig. 6 style, loss against epoch on log-log axes.
    Returns the files written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    if not records:
        raise ValueError(f"{run_dir / METRICS_NAME} is empty")
    task = records[-1].get("task")
    written = []

    def series(key):
        pts = [(r["epoch"], r[key]) for r in records if r.get(key) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    def marker(xs):  # points stay visible on short runs (a single epoch draws no line)
        return "." if len(xs) < 30 else None

    fig, ax = plt.subplots(figsize=(6, 4))
    if task == "pretrain":
        for key, label in (("train_loss", "train loss (Eq. 16)"), ("train_masked_mse", "masked MSE"),
                           ("train_unmasked_mse", "unmasked MSE"), ("test_masked_mse", "test masked MSE")):
            x, y = series(key)
            if x:
                ax.plot(x, y, label=label, marker=marker(x))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"MAE pre-training ({run_dir.name})")
    else:
        for key, label in (("train_loss", "train loss"), ("test_loss", "test loss")):
            x, y = series(key)
            if x:
                ax.plot(x, y, label=label, marker=marker(x))
        ax.set_title(f"loss ({run_dir.name})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = run_dir / "loss.png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    written.append(out)

    x, y = series("test_top1")
    if x:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(x, y, label="test top-1", marker=marker(x))
        xt, yt = series("train_top1")
        if xt:
            ax.plot(xt, yt, label="train top-1 (augmented)", marker=marker(xt))
        ax.set_xlabel("epoch")
        ax.set_ylabel("top-1 (%)")
        ax.grid(True, alpha=0.3)
        ax.legend()
        ax.set_title(f"accuracy ({run_dir.name})")
        fig.tight_layout()
        out = run_dir / "accuracy.png"
        fig.savefig(out, dpi=120)
        plt.close(fig)
        written.append(out)
    return written
