"""CUDA-graph capture of a whole step: whether it can run here, the lr schedule as device data,
and the capture itself.

A captured step replays the kernels recorded once: inputs must live at fixed addresses (the
caller copies each batch into :attr:`StepGraph.inputs`), shapes must not change (the loop drops
the ragged last batch) and nothing may read a device value on the host. Randomness stays fresh
per replay: torch's CUDA generator (augmentation draws, dropout, MAE masks, the MoE gate-noise
seed) is graph-safe: each replay advances its offset as the eager step would.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Callable

import torch

from . import distributed as D
from .optim import WarmupCosine

_logger = logging.getLogger(__name__)


def capture_unavailable(device: torch.device, info: D.DistInfo | None = None) -> str | None:
    """Why a step cannot be captured here (a sentence), or None when it can."""
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device; running the step uncaptured on {device}"
    if info is not None and info.enabled:
        return "CUDA graphs are not used with several processes (DDP) yet; running the step uncaptured"
    return None


class DeviceSchedule:
    """The lr of every optimizer step as a device table and the step counter on the device, so a
    step sets its own lr without the host (a captured step replays the schedule).

    ``advance()`` sets every param group's lr tensor (a view into one (G,) buffer) to
    schedule.lr_at(step) x the group's lr_scale and counts the step; steps past the table keep
    its last lr.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: WarmupCosine, device: torch.device):
        self.optimizer, self.schedule = optimizer, schedule
        n = schedule.total_steps + 1
        self.table = torch.tensor([schedule.lr_at(i) for i in range(n)], dtype=torch.float32, device=device)
        self.scales = torch.tensor([g.get("lr_scale", 1.0) for g in optimizer.param_groups], dtype=torch.float32,
                                   device=device)
        self.lrs = torch.zeros_like(self.scales)
        self.step = torch.zeros((), dtype=torch.int64, device=device)

    def install(self, step: int) -> None:
        """Point the param groups' lr at the device buffer; the next step is ``step``."""
        self.step.fill_(step)
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = self.lrs[i]

    def advance(self) -> None:
        i = self.step.clamp(max=len(self.table) - 1)
        torch.mul(self.scales, self.table[i], out=self.lrs)
        self.step.add_(1)


class StepGraph:
    """``fn(*inputs)`` captured once as a CUDA graph over static input buffers.

    ``capture(*example)`` allocates :attr:`inputs` like the examples and records ``fn`` on them
    (nothing runs); ``replay(*args)`` copies args into the inputs (skipped for the buffers
    themselves) and replays; it returns the outputs of the capture (overwritten by each replay).
    Warm up ``fn`` eagerly (autotuning, lazy initialisation, optimizer state) before capturing.
    """

    def __init__(self, fn: Callable[..., object]):
        self.fn = fn
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: tuple[torch.Tensor, ...] = ()
        self.outputs: object = None

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def capture(self, *example: torch.Tensor) -> None:
        self.inputs = tuple(t.detach().clone() for t in example)
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = self.fn(*self.inputs)

    def replay(self, *args: torch.Tensor) -> object:
        for buffer, value in zip(self.inputs, args):
            if value is not buffer:
                buffer.copy_(value)
        self.graph.replay()
        return self.outputs


@contextlib.contextmanager
def side_stream(device: torch.device):
    """Run warm-up work on a side stream on CUDA (as torch's capture recipe asks), else in place."""
    if device.type != "cuda":
        yield
        return
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        yield
    torch.cuda.current_stream(device).wait_stream(stream)


@contextlib.contextmanager
def quiet_capturable_warning():
    """An optimizer built capturable warns when stepped outside a capture (the warm-up does)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*capturable=True.*")
        yield
