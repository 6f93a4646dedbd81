"""Time to the first step: how many kernel specialisations an mLiT-XXS training run compiles before
its first step, and how long compiling them takes one after another and in parallel child processes
(:mod:`mlit_kernels.precompile`, what ``mlit train`` and ``mlit doctor`` do on a GPU).

    python bench/compile_time.py [--recipe table6-fashion_mnist] [--model XXS] [--batch 256]
                                 [--jobs 1 2] [--project 16] [--markdown OUT]

The launches are those of a rehearsed training step and evaluation batch (the run's first step and
first evaluation, default tuning configurations) at the recipe's batch, recorded through Triton's
interpreter without running a kernel; they are compiled for sm_90 (``GPUTarget("cuda", 90, 32)``,
Triton's bundled ptxas: no GPU needed) into a fresh Triton cache per measurement. The projection for
a host of N cores schedules the measured compile times longest-first onto N children, each starting
after the measured start-up of a child process (importing torch, Triton and the kernels).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # recording runs the kernels' launch code through the interpreter

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import step_meters  # noqa: E402

from mlit_kernels import precompile  # noqa: E402

ARCH = 90


def launches(recipe: str, model: str, batch: int) -> list:
    """The distinct launch signatures of a rehearsed training step and evaluation batch."""
    trainer, images, labels = step_meters.make_trainer(recipe, model, batch)
    return precompile.record(lambda: trainer.rehearse_launches(images, labels))


def child_start_seconds() -> float:
    """Seconds a compile child takes to start: import torch, Triton and the kernel modules."""
    code = ("import torch, triton, mlit_kernels.precompile; import mlit_kernels.ops")
    env = dict(os.environ, TRITON_INTERPRET="0")
    start = time.monotonic()
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    return time.monotonic() - start


def measure(signatures: list, jobs: int) -> precompile.WarmReport:
    with tempfile.TemporaryDirectory() as cache:
        return precompile.warm(signatures, jobs=jobs, arch=ARCH, env=dict(os.environ, TRITON_CACHE_DIR=cache))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="table6-fashion_mnist")
    parser.add_argument("--model", default="XXS")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 2], help="children compiling at once")
    parser.add_argument("--project", type=int, default=16, help="cores of the projected GPU host")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    signatures = launches(args.recipe, args.model, args.batch)
    kernels = sorted({s.name for s in signatures})
    start_s = child_start_seconds()
    import triton

    lines = [f"Compiling what an mLiT-{args.model} run ({args.recipe}, batch {args.batch}) launches before "
             f"its first step: {len(signatures)} kernel specialisations of {len(kernels)} kernels, for sm_90.",
             "",
             f"- date {datetime.date.today().isoformat()}; {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} cores; torch {torch.__version__}, triton {triton.__version__}; "
             f"a child process starts in {start_s:.1f} s",
             f"- command: `python bench/compile_time.py {' '.join(argv or sys.argv[1:])}`".rstrip(),
             "",
             "| children | wall s | Σ compile s | longest s | failures |",
             "| --- | --- | --- | --- | --- |"]
    reports = {}
    for jobs in args.jobs:
        report = reports[jobs] = measure(signatures, jobs)
        lines.append(f"| {report.jobs} | {report.wall_s:.1f} | {sum(report.seconds):.1f} | "
                     f"{max(report.seconds, default=0):.1f} | {len(report.failures)} |")
        print(lines[-1], file=sys.stderr, flush=True)
    serial = reports[min(reports)]
    lines += ["", f"Projected for {args.project} cores (the serial run's compile times, longest first onto "
                  f"{args.project} children starting in {start_s:.1f} s): "
                  f"{serial.projection(args.project, start_s):.1f} s against {serial.wall_s:.1f} s one after another."]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    return 0 if not any(r.failures for r in reports.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
