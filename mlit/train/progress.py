"""What a person watching a run sees: progress bars fed from device-side sums, read only every
``log_every`` steps (a read is a host sync; the steps between them have none)."""

from __future__ import annotations

import sys
import time
from typing import Any

import torch


def default_log_every(steps_per_epoch: int) -> int:
    """Four progress reads per epoch."""
    return max(1, steps_per_epoch // 4)


def bar(total: int, initial: int, desc: str, enabled: bool):
    """A tqdm bar on stderr (a no-op object when disabled)."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True, leave=False,
                file=sys.stderr)


class EpochProgress:
    """The training bar of one epoch: advanced every step (host only), its loss / img/s postfix
    refreshed from the trainer's device-side sums every ``log_every`` steps and at the last step.

    ``sums`` is the trainer's running (K,) float64 vector of the epoch (first entry: the loss sum),
    ``steps_before`` the steps of the epoch already counted in it (a resumed partial epoch).
    """

    def __init__(self, total: int, start: int, desc: str, enabled: bool, log_every: int, batch_size: int,
                 sums: torch.Tensor, names: tuple[str, ...], steps_before: int = 0):
        self.bar = bar(total, start, desc, enabled)
        self.enabled, self.log_every, self.batch_size = enabled, max(1, log_every), batch_size
        self.total, self.sums, self.names = total, sums, names
        self.steps = steps_before  # steps summed in `sums`
        self.steps_here = 0  # steps of this invocation (for img/s)
        self.t0 = time.perf_counter()

    def step(self, step_in_epoch: int, lr: float) -> None:
        """After a step: advance; read the sums if this is a logging step."""
        self.steps += 1
        self.steps_here += 1
        if not self.enabled:
            return
        self.bar.update(1)
        if (step_in_epoch + 1) % self.log_every == 0 or step_in_epoch + 1 == self.total:
            self.bar.set_postfix(self.read(lr), refresh=False)

    def read(self, lr: float) -> dict[str, Any]:
        """The epoch's mean loss so far, the lr and images/s: one host read of the sums."""
        values = self.sums.tolist()
        ips = self.steps_here * self.batch_size / max(1e-9, time.perf_counter() - self.t0)
        return {"loss": f"{values[0] / max(1, self.steps):.4f}", "lr": f"{lr:.2e}", "img_s": f"{ips:.0f}"}

    def close(self) -> None:
        self.bar.close()
