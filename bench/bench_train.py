"""End-to-end training-step throughput (images/s) of mLiT S, XS, XXS and the mmLiT pre-training step.

One step = gather a uint8 batch on the device, GPUAugment it there (train mode, CIFAR-10
AutoAugment), forward + backward (fp16 autocast + GradScaler on CUDA, fp32 on CPU), fused AdamW
with the layer-wise groups: what `mlit train` does per step (Trainer.train_step). Each mode is
warmed up on the real shapes before its clock starts (Trainer.warm_up). Modes:

    eager-reference   plain PyTorch MoE and augmentation
    eager-triton      the Triton MoE and augmentation kernels
    compiled          eager-triton with the model under torch.compile (CUDA)
    captured          eager-triton with the whole step captured as a CUDA graph (CUDA)
    compiled+captured both

    python bench/bench_train.py                    # CPU: eager-reference, batch 16, a few steps
    python bench/bench_train.py --csv bench/train_results.csv   # CUDA: every mode, the paper's batches
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

#: mode → (backend, torch.compile, CUDA graphs)
MODES = {
    "eager-reference": ("reference", False, False),
    "eager-triton": ("triton", False, False),
    "compiled": ("triton", True, False),
    "captured": ("triton", False, True),
    "compiled+captured": ("triton", True, True),
}


def recipe_for(size: str, task: str):
    """The paper's recipe of the task (Table 6 CIFAR-10 from scratch, Table 3 pre-training)."""
    return get_recipe("table3-cifar100" if task == "pretrain" else "table6-cifar10", size)


def make_step(size: str, task: str, mode: str, device: torch.device, batch: int | None = None, augment: bool = True):
    """A closure running one training step on random (non-zero) uint8 images on the device,
    after the trainer's warm-up (and capture) on these shapes. batch None: the paper's."""
    backend, compiled, captured = MODES[mode]
    recipe = recipe_for(size, task)
    recipe = recipe.replace(batch_size=batch or recipe.batch_size, augment=augment, compile=compiled,
                            cuda_graphs=captured)
    batch = recipe.batch_size
    trainer = Trainer(recipe, None if task == "pretrain" else 10, steps_per_epoch=1000, device=device, backend=backend)
    g = torch.Generator().manual_seed(0)
    pool = torch.randint(1, 256, (4 * batch, 3, 32, 32), dtype=torch.uint8, generator=g).to(device)
    labels = None if task == "pretrain" else torch.randint(0, 10, (4 * batch,), generator=g).to(device)
    order = torch.randperm(4 * batch).to(device)
    trainer.warm_up(*trainer.batch(pool, labels, order[:batch]))
    counter = iter(range(1 << 62))

    def step():
        i = next(counter) % 4
        return trainer.train_step(*trainer.batch(pool, labels, order[i * batch: (i + 1) * batch]))

    return step, batch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_one(size: str, task: str, mode: str, device: torch.device, batch: int | None, steps: int, warmup: int,
              augment: bool = True) -> tuple[float, int]:
    """(images/s of `steps` training steps after `warmup` untimed ones, the batch)."""
    step, batch = make_step(size, task, mode, device, batch, augment)
    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = step()
    out["loss"].item()
    _sync(device)
    return steps * batch / (time.perf_counter() - t0), batch


CUDA = torch.cuda.is_available()


@pytest.mark.parametrize("mode", ["eager-reference", "eager-triton", "captured"])
@pytest.mark.parametrize("size", ["XXS", "XS", "S"])
@pytest.mark.parametrize("task", ["train", "pretrain"])
def test_train_step(benchmark, task, size, mode):
    """pytest-benchmark of one full training step (batch 256 on CUDA; XXS, batch 8, eager reference on CPU)."""
    if mode != "eager-reference" and not CUDA:
        pytest.skip(f"{mode} timings need a CUDA GPU")
    if not CUDA and size != "XXS":
        pytest.skip("without CUDA only XXS runs, small")
    device = torch.device("cuda" if CUDA else "cpu")
    batch = 256 if CUDA else 8
    step, _ = make_step(size, task, mode, device, batch)

    def timed():
        step()
        _sync(device)

    benchmark.pedantic(timed, warmup_rounds=3 if CUDA else 1, rounds=20 if CUDA else 2)
    benchmark.extra_info["images_per_s"] = batch / benchmark.stats.stats.median


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=None, help="default: the paper's on CUDA, 16 on CPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 30 on CUDA, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps after the warm-up (default 5 on CUDA, 1 on CPU)")
    p.add_argument("--sizes", default="XXS,XS,S")
    p.add_argument("--tasks", default="train,pretrain")
    p.add_argument("--modes", default=None, help=f"of {', '.join(MODES)} (default: all on CUDA, eager-reference on CPU)")
    p.add_argument("--no-compile", action="store_true", help="leave out the modes that use torch.compile")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--csv", default=None, help="append rows to this CSV")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default 1 on CPU: on a shared 2-core machine more threads thrash)")
    args = p.parse_args(argv)
    if args.threads or args.device == "cpu":
        torch.set_num_threads(args.threads or 1)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    batch = args.batch_size or (None if cuda else 16)
    steps = args.steps or (30 if cuda else 3)
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    modes = args.modes.split(",") if args.modes else (list(MODES) if cuda else ["eager-reference"])
    unknown = set(modes) - set(MODES)
    if unknown:
        p.error(f"unknown mode(s) {sorted(unknown)}; choose from {', '.join(MODES)}")
    if args.no_compile:
        modes = [mode for mode in modes if not MODES[mode][1]]
    name = torch.cuda.get_device_name(device) if cuda else f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
    print(f"# {name}, torch {torch.__version__}, {steps} timed steps, {'fp16 autocast' if cuda else 'fp32'}, "
          f"augment {not args.no_augment}")
    rows = []
    for task in args.tasks.split(","):
        for size in args.sizes.split(","):
            base = None
            for mode in modes:
                try:
                    ips, used = bench_one(size, task, mode, device, batch, steps, warmup, not args.no_augment)
                    base = base or (ips if mode == modes[0] else None)
                    ratio = f"  {ips / base:5.1f}x {modes[0]}" if base and mode != modes[0] else ""
                    msg = f"{ips:11.1f} images/s (batch {used}){ratio}"
                except Exception as e:  # noqa: BLE001 - a missing backend should not stop the others
                    ips, used, msg = float("nan"), batch, f"failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}"
                print(f"{task:<9} {size:<4} {mode:<18} {msg}", flush=True)
                rows.append({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                             "device": name, "task": task, "mode": mode, "model": size, "batch": used,
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
