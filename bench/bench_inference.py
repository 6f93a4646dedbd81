"""Inference throughput (images/s) of mLiT XXS, XS, S: torch eager, torch.compile, onnxruntime.

The eval forward of a 10-class classifier on normalised 36×36 images, reference MoE backend,
fp32, under torch.inference_mode (torch) or an onnxruntime CPU session of the file `mlit export`
writes (same graph, dynamic batch). torch.compile is inductor's default mode, compiled once per
batch size (its compile time is reported apart, not in the rate).

    python bench/bench_inference.py                         # the table: batch 1 and 256, all engines
    python bench/bench_inference.py --sizes XXS --batches 1 16 --engines eager onnxruntime
    pytest bench/bench_inference.py --benchmark-only        # small CPU cases (XXS, batch 1 and 8)
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlit  # noqa: E402
from mlit.export import ClassifierLogits, export_model  # noqa: E402

ENGINES = ("eager", "compile", "onnxruntime")


def make_runner(engine: str, size: str, batch: int, threads: int, workdir: Path):
    """A function running one forward of ``batch`` images, and the seconds its setup took."""
    torch.manual_seed(0)
    model = mlit.create_model(f"mlit_{size.lower()}", num_classes=10, backend="reference").eval()
    with torch.no_grad():  # trained-like routing: gate weights off zero (no ties)
        for m in model.modules():
            if hasattr(m, "w_gate"):
                m.w_gate.normal_(0, 0.1)
    net = ClassifierLogits(model).eval()
    x = torch.rand(batch, 3, 36, 36) * 2 - 1
    t0 = time.perf_counter()
    if engine == "eager":
        def run():
            with torch.inference_mode():
                return net(x)
    elif engine == "compile":
        compiled = torch.compile(net)
        with torch.inference_mode():
            compiled(x)  # compile now

        def run():
            with torch.inference_mode():
                return compiled(x)
    elif engine == "onnxruntime":
        import onnxruntime as ort

        path = export_model(model, workdir / f"mlit_{size.lower()}.onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {"images": x.numpy()}

        def run():
            return session.run(None, feed)
    else:
        raise ValueError(f"unknown engine {engine!r}; choose from {ENGINES}")
    return run, time.perf_counter() - t0


def images_per_second(run, batch: int, min_time: float, rounds: int) -> float:
    """Median over ``rounds`` of the rate of back-to-back calls lasting at least ``min_time`` s each."""
    run()  # warm-up
    rates = []
    for _ in range(rounds):
        n, t0 = 0, time.perf_counter()
        while True:
            run()
            n += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= min_time:
                break
        rates.append(n * batch / elapsed)
    return statistics.median(rates)


# --- pytest-benchmark: small CPU cases -------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx")


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("engine", ENGINES)
def test_inference(benchmark, workdir, engine, batch):
    """XXS eval forward; torch.compile only with MLIT_BENCH_COMPILE=1 (a minute of compiling on a CPU)."""
    if engine == "compile" and os.environ.get("MLIT_BENCH_COMPILE") != "1":
        pytest.skip("set MLIT_BENCH_COMPILE=1 to include torch.compile (compiles for about a minute on a CPU)")
    if engine == "onnxruntime":
        pytest.importorskip("onnxruntime", reason="pip install -e '.[deploy]'")
    run, _ = make_runner(engine, "XXS", batch, torch.get_num_threads(), workdir)
    run()
    benchmark.pedantic(run, warmup_rounds=1, rounds=5)
    benchmark.extra_info["images_per_s"] = batch / benchmark.stats.stats.median


# --- the table --------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["XXS", "XS", "S"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 256])
    p.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch and onnxruntime threads")
    p.add_argument("--min-time", type=float, default=2.0, help="seconds per timed round")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import onnxruntime

    print(f"# {cpu_model()}, {args.threads} threads; torch {torch.__version__}, onnxruntime {onnxruntime.__version__}; "
          f"{datetime.date.today().isoformat()}; fp32, reference MoE path, eval; median of {args.rounds} rounds "
          f"of >= {args.min_time:g} s")
    print("| model | batch | engine | images/s | setup s |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            for batch in args.batches:
                for engine in args.engines:
                    try:
                        run, setup = make_runner(engine, size, batch, args.threads, Path(tmp))
                        rate = f"{images_per_second(run, batch, args.min_time, args.rounds):,.1f}"
                    except Exception as e:  # noqa: BLE001 - one failing engine should not stop the table
                        rate, setup = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}", float("nan")
                    print(f"| mLiT-{size} | {batch} | {engine} | {rate} | {setup:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
