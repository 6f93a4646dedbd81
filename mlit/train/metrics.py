"""Per-epoch metrics as JSON lines, and their plots."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from ..atomic import atomic_write

METRICS_NAME = "metrics.jsonl"


class MetricsLog:
    """Appends one JSON object per line to ``run_dir/metrics.jsonl`` (flushed each time).

    A run writes an epoch's record inside its checkpoint first and appends it here after, so a
    kill between the two loses nothing: :meth:`resume` puts the checkpoint's record back.
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / METRICS_NAME

    def append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")
            f.flush()

    def resume(self, epoch: int, record: dict[str, Any] | None = None, log=print) -> list[dict[str, Any]]:
        """Make the file hold exactly the records of epochs 1..``epoch`` (a resumed run continues
        after them): drop a last line cut by a kill (saying so), records of later or unfinished
        epochs, and put back ``record`` (the checkpoint's copy) when its epoch is missing."""
        records = read_metrics(self.path, log=log) if self.path.exists() else []
        keep = [r for r in records if not r.get("partial") and r.get("epoch", 0) <= epoch]
        if record and not record.get("partial") and record.get("epoch") == epoch and \
                not any(r.get("epoch") == epoch for r in keep):
            keep.append(record)
            log(f"{self.path}: epoch {epoch}'s record was missing; restored it from the checkpoint")
        text = "".join(json.dumps(r, default=float) + "\n" for r in keep)
        atomic_write(self.path, lambda f: f.write(text.encode()))
        return keep


def read_metrics(path: str | os.PathLike, log=None) -> list[dict[str, Any]]:
    """The records of a run (dir or metrics.jsonl). A last line cut short (a killed write) is
    dropped, with a note to ``log`` (default: a warning); a bad line elsewhere is an error."""
    p = Path(path)
    if p.is_dir():
        p = p / METRICS_NAME
    if not p.is_file():
        raise FileNotFoundError(f"no {METRICS_NAME} at {p}")
    with open(p) as f:
        lines = [(i + 1, line) for i, line in enumerate(f) if line.strip()]
    records = []
    for n, (number, line) in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if n + 1 < len(lines):
                raise ValueError(f"{p}: line {number} is not a JSON record: {line[:80]!r}") from None
            note = f"{p}: dropped its last line (cut short, probably by a kill): {line.strip()[:80]!r}"
            if log is None:
                warnings.warn(note, stacklevel=2)
            else:
                log(note)
    return records


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
