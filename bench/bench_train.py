"""End-to-end training-step throughput (images/s) of mLiT S, XS, XXS.

One step = index a uint8 batch on the device, GPUAugment it there (train mode, CIFAR-10
AutoAugment), forward + backward (fp16 autocast + GradScaler on CUDA, fp32 on CPU), AdamW step
with the layer-wise groups: what `mlit train` does per step (Trainer.train_step).
Backends: reference, and triton when CUDA is available. Also the MAE pre-training step.

    python bench/bench_train.py                    # CPU: batch 16, a few steps (< 1 min)
    python bench/bench_train.py --batch-size 256 --steps 30 --csv bench/train_results.csv   # GPU
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlit.train.loop import Trainer
from mlit.train.recipes import get_recipe


def make_step(size: str, task: str, backend: str, device: torch.device, batch: int, augment: bool = True):
    """A closure running one Trainer.train_step on random (non-zero) uint8 images on the device."""
    recipe = get_recipe("table3-cifar100" if task == "pretrain" else "table6-cifar10", size)
    recipe = recipe.replace(batch_size=batch, augment=augment)
    trainer = Trainer(recipe, None if task == "pretrain" else 10, steps_per_epoch=1000, device=device, backend=backend)
    g = torch.Generator().manual_seed(0)
    pool = torch.randint(1, 256, (4 * batch, 3, 32, 32), dtype=torch.uint8, generator=g).to(device)
    labels = torch.randint(0, 10, (4 * batch,), generator=g).to(device)
    counter = iter(range(1 << 62))

    def step():
        i = next(counter) % 4
        images = pool[i * batch : (i + 1) * batch]
        return trainer.train_step(images, None if task == "pretrain" else labels[i * batch : (i + 1) * batch])

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_one(size: str, task: str, backend: str, device: torch.device, batch: int, steps: int, warmup: int,
              augment: bool = True) -> float:
    """Images/s of `steps` training steps after `warmup` untimed ones."""
    step = make_step(size, task, backend, device, batch, augment)
    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = step()
    out["loss"].item()
    _sync(device)
    return steps * batch / (time.perf_counter() - t0)


CUDA = torch.cuda.is_available()


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("size", ["XXS", "XS", "S"])
@pytest.mark.parametrize("task", ["train", "pretrain"])
def test_train_step(benchmark, task, size, backend):
    """pytest-benchmark of one full training step (batch 256 on CUDA; XXS, batch 8 on CPU)."""
    if backend == "triton" and not CUDA:
        pytest.skip("the Triton backend's timings need a CUDA GPU")
    if not CUDA and size != "XXS":
        pytest.skip("without CUDA only XXS runs, small")
    device = torch.device("cuda" if CUDA else "cpu")
    batch = 256 if CUDA else 8
    step = make_step(size, task, backend, device, batch)

    def timed():
        step()
        _sync(device)

    benchmark.pedantic(timed, warmup_rounds=3 if CUDA else 1, rounds=20 if CUDA else 2)
    benchmark.extra_info["images_per_s"] = batch / benchmark.stats.stats.median


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=None, help="default 256 on CUDA, 16 on CPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 30 on CUDA, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5 on CUDA, 1 on CPU)")
    p.add_argument("--sizes", default="XXS,XS,S")
    p.add_argument("--tasks", default="train,pretrain")
    p.add_argument("--backends", default=None, help="default: reference (+ triton on CUDA)")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--csv", default=None, help="append rows to this CSV")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default 1 on CPU: on a shared 2-core machine more threads thrash)")
    args = p.parse_args(argv)
    if args.threads or args.device == "cpu":
        torch.set_num_threads(args.threads or 1)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    batch = args.batch_size or (256 if cuda else 16)
    steps = args.steps or (30 if cuda else 3)
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    backends = args.backends.split(",") if args.backends else (["reference", "triton"] if cuda else ["reference"])
    name = torch.cuda.get_device_name(device) if cuda else f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
    print(f"# {name}, torch {torch.__version__}, batch {batch}, {steps} timed steps, "
          f"{'fp16 autocast' if cuda else 'fp32'}, augment {not args.no_augment}")
    rows = []
    for task in args.tasks.split(","):
        for backend in backends:
            for size in args.sizes.split(","):
                try:
                    ips = bench_one(size, task, backend, device, batch, steps, warmup, not args.no_augment)
                    msg = f"{ips:9.1f} images/s"
                except Exception as e:  # noqa: BLE001 - a missing backend should not stop the others
                    ips, msg = float("nan"), f"failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}"
                print(f"{task:<9} {backend:<10} {size:<4} {msg}", flush=True)
                rows.append({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                             "device": name, "task": task, "backend": backend, "model": size, "batch": batch,
                             "images_per_s": round(ips, 2)})
    if args.csv:
        new = not os.path.exists(args.csv)
        with open(args.csv, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            if new:
                w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
