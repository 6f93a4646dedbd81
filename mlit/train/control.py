"""Stop and save requests that every process acts on at the same step, without a device sync.

SIGINT / SIGTERM set a flag (a second SIGINT interrupts at once); a save clock asks for a
checkpoint every N minutes. One process reads both directly. Several processes agree through a
CPU (gloo) all-reduce started after each step and read one step later, so no rank waits on the
device and all of them stop or save at the same step.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import distributed as D


@dataclass(frozen=True)
class Request:
    """What the processes agreed on after a step: stop with this signal (0: no), save now."""

    signum: int = 0
    save: bool = False


class StopFlag:
    """SIGINT/SIGTERM set ``signum``; a second SIGINT raises KeyboardInterrupt."""

    def __init__(self):
        self.signum = 0
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


class RunControl:
    """Polled after every training step: ``poll()`` → the agreed :class:`Request`.

    save_every_minutes: ask for a checkpoint when that much time passed since the last one
    (rank 0's clock; ``saved()`` restarts it).
    """

    def __init__(self, info: D.DistInfo, save_every_minutes: float | None = None):
        self.info = info
        self.flag = StopFlag()
        self.save_every_s = None if save_every_minutes is None else 60.0 * save_every_minutes
        self._last_save = time.monotonic()
        self._group = None
        self._pending: tuple[torch.Tensor, object] | None = None

    def __enter__(self):
        self.flag.__enter__()
        if self.info.enabled and self.info.device.type != "cpu":
            self._group = dist.new_group(backend="gloo")  # a CPU channel beside NCCL: no device sync
        return self

    def __exit__(self, *exc):
        if self._pending is not None:
            self._pending[1].wait()
            self._pending = None
        return self.flag.__exit__(*exc)

    def saved(self) -> None:
        self._last_save = time.monotonic()

    def _local(self) -> Request:
        due = self.save_every_s is not None and time.monotonic() - self._last_save >= self.save_every_s
        return Request(self.flag.signum, due and self.info.is_main)

    def poll(self) -> Request:
        local = self._local()
        if not self.info.enabled:
            return local
        # agree on the request started after the previous step; start this step's
        agreed = Request()
        if self._pending is not None:
            values, work = self._pending
            work.wait()
            agreed = Request(int(values[0]), bool(values[1]))
        values = torch.tensor([float(local.signum), float(local.save)])
        work = dist.all_reduce(values, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        self._pending = (values, work)
        return agreed

    def flush(self) -> Request:
        """Complete the pending agreement (at the end of an epoch: nothing carries over)."""
        if not self.info.enabled:
            return self._local()
        agreed = Request()
        if self._pending is not None:
            values, work = self._pending
            work.wait()
            self._pending = None
            agreed = Request(int(values[0]), bool(values[1]))
        return agreed
