"""DistributedDataParallel setup from torchrun's environment variables (NCCL on CUDA, gloo on CPU)."""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def setup(device: str | None = None) -> DistInfo:
    """Initialise the process group when WORLD_SIZE > 1 (env:// rendezvous, as torchrun sets it).

    Each rank uses ``cuda:LOCAL_RANK`` on CUDA; ``device`` "cpu" uses gloo.
    """
    device = device or default_device()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        dev = torch.device(device)
        if dev.type == "cuda":
            if dev.index is None:
                dev = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(dev)
        return DistInfo(device=dev)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://", world_size=world, rank=rank,
                                **({"device_id": dev} if backend == "nccl" else {}))
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def cleanup() -> None:
    """Destroy the process group; free every DistributedDataParallel wrapper first
    (:meth:`mlit.train.step.Trainer.close`).

    A DDP reducer that outlives the group becomes its last owner, and when the reducer is freed it
    destroys the group holding the GIL: ~ProcessGroupGloo joins gloo's worker threads while one of
    them may still be freeing a finished collective whose tensors need the GIL — a deadlock
    (pytorch/pytorch#56297). Freed here through the Python handle, the group is destroyed with the
    GIL released. ``gc.collect()`` first frees wrappers that only reference cycles keep alive.
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_object(obj, info: DistInfo) -> list:
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
