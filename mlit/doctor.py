"""``mlit doctor``: a self-check for the first run on a machine (also ``mlit.doctor.run()``).

1. Versions (Python, torch, Triton, mlit), the device and its compute capability.
2. Every Triton variant of the MoE layer ("dense": the fused kernels; "dispatch": tokens grouped
   by expert) in fp32, fp16, bf16 and under fp16 autocast (the training loop's configuration),
   forward and backward in training mode, against the float64 reference on the same inputs
   (:func:`mlit_kernels.selfcheck.compare`): the worst per-row relative error over y, the
   auxiliary loss and every gradient, within :data:`mlit_kernels.selfcheck.TOL` of the compute
   dtype (fp32 1e-4, fp16 1e-2, bf16 5e-2). Shapes: the paper's (mLiT-S layer 0, m = d_h = 144,
   t = 3; mLiT-XXS last layer, m = 108, d_h = 27, t = 5) and many-expert dispatch shapes (t = 16,
   t = 64), 4133 tokens (not a multiple of any block). Running them compiles every kernel the
   layer launches for the GPU present; a kernel that fails to compile is a row with its error.
3. Times (CUDA events, median of 10 after 3 warm-up runs) the layer forward + backward and a
   training step of mLiT-XXS (batch 256, fp16 autocast, AdamW) with the Triton backend, the
   reference and torch.compile(reference).

One table; :func:`run` returns a :class:`Report` whose ``ok`` is False on any mismatch or error
(the command then exits with status 1). Without a GPU the kernels run through Triton's
interpreter at small shapes in fp32 and bf16, the timings (one run each of the layer and of a
3-layer model's step, batch 1) use the wall clock and skip torch.compile: under a minute.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, TextIO

import torch
import torch.nn.functional as F

from . import __version__

#: (name, m, d_h, t, k) checked on a GPU: the paper's layers and many-expert dispatch shapes.
GPU_SHAPES = (("mLiT-S layer 0", 144, 144, 3, 2), ("mLiT-XXS last", 108, 27, 5, 2),
              ("dispatch t=16", 144, 144, 16, 2), ("dispatch t=64", 108, 27, 64, 2))
#: ... and through the interpreter on a CPU (small, awkward widths).
CPU_SHAPES = (("small dense", 16, 27, 5, 2), ("small dispatch", 16, 24, 12, 3))
GPU_TOKENS, CPU_TOKENS = 4096 + 37, 37
#: dtype configurations: (label, x and weight dtype, autocast dtype or None).
CONFIGS = (("fp32", torch.float32, None), ("fp16", torch.float16, None), ("bf16", torch.bfloat16, None),
           ("amp-fp16", torch.float32, torch.float16))
HEADER = ("check", "shape (m, d_h, t, k)", "variant / backend", "dtype", "result", "limit", "status")


@dataclass
class Report:
    """The doctor's findings: header lines, table rows, and the number of failed checks."""

    lines: list[str] = field(default_factory=list)
    rows: list[tuple[str, ...]] = field(default_factory=list)
    failures: int = 0

    @property
    def ok(self) -> bool:
        return self.failures == 0

    def table(self) -> str:
        """The header lines and one markdown table."""
        return "\n".join(self.lines + ["", *_table_head()] + [_table_row(row) for row in self.rows])


def _table_row(row: tuple[str, ...]) -> str:
    return "| " + " | ".join(row) + " |"


def _table_head() -> list[str]:
    return [_table_row(HEADER), _table_row(tuple("---" for _ in HEADER))]


def run(quick: bool = False, timing: bool = True, quiet: bool = False) -> Report:
    """Check and time the MoE kernels on this machine's device, printing rows as they come
    (to stdout; nothing when ``quiet``).

    quick: on a GPU, the amp-fp16 configuration only. timing: also time the layer and a training step.
    """
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first Triton kernel is defined
    import triton

    device = torch.device("cuda" if cuda else "cpu")
    report = Report(lines=[f"mlit doctor — mlit {__version__}, Python {platform.python_version()}, "
                           f"torch {torch.__version__}, triton {triton.__version__}", _device_line(device)])
    emit = _printer(report, None if quiet else sys.stdout)
    shapes, tokens = (GPU_SHAPES, GPU_TOKENS) if cuda else (CPU_SHAPES, CPU_TOKENS)
    if cuda:
        configs = [c for c in CONFIGS if c[0] == "amp-fp16"] if quick else list(CONFIGS)
    else:  # the interpreter is slow (and exact): fp32 and bf16 only
        configs = [c for c in CONFIGS if c[0] in ("fp32", "bf16")]
    for name, m, d_h, t, k in shapes:
        for variant in ("dense", "dispatch") if t <= 16 else ("dispatch",):
            for label, dtype, amp in configs:
                emit(_check_row(name, m, d_h, t, k, tokens, variant, label, dtype, amp, device))
    if timing:
        for row in _timing_rows(device):
            emit(row)
    emit(None)
    return report


def _device_line(device: torch.device) -> str:
    if device.type != "cuda":
        return "device: cpu (no CUDA device: Triton kernels through the interpreter, small shapes)"
    major, minor = torch.cuda.get_device_capability(device)
    return (f"device: {torch.cuda.get_device_name(device)}, compute capability {major}.{minor} (sm_{major}{minor}), "
            f"CUDA {torch.version.cuda}")


def _printer(report: Report, out: TextIO | None) -> Callable:
    """emit(row): add a row (counting failures) and print it; emit(None): print the closing line."""
    if out is not None:
        print("\n".join(report.lines + ["", *_table_head()]), file=out, flush=True)

    def emit(row):
        if row is None:
            if out is not None:
                print(f"\n{report.failures} failed check(s)" if report.failures else "\nall checks passed", file=out)
            return
        report.rows.append(row)
        report.failures += row[-1] in ("MISMATCH", "ERROR")
        if out is not None:
            print(_table_row(row), file=out, flush=True)

    return emit


def _check_row(name, m, d_h, t, k, n, variant, label, dtype, amp, device) -> tuple[str, ...]:
    from mlit_kernels.selfcheck import TOL, compare, worst

    shape = f"{name}: {m}, {d_h}, {t}, {k}; N={n}"
    tol = TOL[amp or dtype]
    try:
        with torch.autocast(device.type, dtype=amp or torch.float16, enabled=amp is not None):
            errors = compare(m, d_h, t, k, n, device=device, dtype=dtype, variant=variant)
    except Exception as err:  # noqa: BLE001 - a kernel that does not compile or launch is a finding
        return ("values + gradients", shape, variant, label, f"{type(err).__name__}: {_first_line(err)}",
                f"{tol:.0e}", "ERROR")
    worst_name, error = worst(errors)
    return ("values + gradients", shape, variant, label, f"{error:.1e} ({worst_name})", f"{tol:.0e}",
            "ok" if error <= tol else "MISMATCH")


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [""])[0][:160].replace("|", "/")


# ---- timings ----------------------------------------------------------------------------------


def _timing_rows(device: torch.device):
    """Rows timing the layer and a training step per backend, with the speed-up over the reference."""
    from mlit_kernels import SharedSwiGLUMoE

    from .config import ENCODERS, TransformerConfig
    from .models import MLiTClassifier

    cuda = device.type == "cuda"
    m, d_h, t, k = (144, 144, 3, 2) if cuda else (16, 27, 5, 2)
    n = 256 * 145 if cuda else 37
    cfg = ENCODERS["XXS"] if cuda else TransformerConfig("tiny", embed_dim=24, depth=3, hidden_first=12,
                                                         hidden_last=6, num_heads=4, num_groups=2)
    batch = 256 if cuda else 1
    backends = ("reference", "compile(reference)", "triton") if cuda else ("reference", "triton")
    amp = torch.autocast(device.type, dtype=torch.float16, enabled=cuda)

    def layer_step(backend):
        torch.manual_seed(0)
        layer = SharedSwiGLUMoE(m, d_h, t, k=k, backend="reference" if "reference" in backend else "triton",
                                device=device)
        fn = torch.compile(layer) if backend.startswith("compile") else layer
        x = torch.randn(n, m, device=device, requires_grad=True)

        def step():
            with amp:
                y, aux = fn(x)
            (y.float().square().mean() + aux).backward()
        return step

    def train_step(backend):
        torch.manual_seed(0)
        model = MLiTClassifier(cfg, 10, backend="reference" if "reference" in backend else "triton", device=device)
        fn = torch.compile(model) if backend.startswith("compile") else model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        images = torch.randn(batch, 3, 36, 36, device=device)
        labels = torch.randint(0, 10, (batch,), device=device)

        def step():
            with amp:
                logits, aux = fn(images)
                loss = F.cross_entropy(logits.float(), labels) + aux
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    dtype = "amp-fp16" if cuda else "fp32"
    for what, shape, make in (("time layer fwd+bwd", f"{m}, {d_h}, {t}, {k}; N={n}", layer_step),
                              (f"time train step ({cfg.name}, batch {batch})", "AdamW", train_step)):
        times = {}
        for backend in backends:
            try:
                times[backend] = _median_ms(make(backend), device)
            except Exception as err:  # noqa: BLE001 - reported as a row
                yield (what, shape, backend, dtype, f"{type(err).__name__}: {_first_line(err)}", "", "ERROR")
                continue
            speedup = times["reference"] / times[backend] if "reference" in times else float("nan")
            yield (what, shape, backend, dtype, f"{times[backend]:.3f} ms", "", f"{speedup:.2f}x reference")


def _median_ms(step: Callable[[], None], device: torch.device) -> float:
    """Median milliseconds of ``step``: CUDA events on a GPU (10 runs after 3 warm-up runs), the
    wall clock on a CPU (1 run after 1: the interpreter's timings are only a smoke test)."""
    cuda = device.type == "cuda"
    warmup, runs = (3, 10) if cuda else (1, 1)
    for _ in range(warmup):
        step()
    times = []
    for _ in range(runs):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


__all__ = ["Report", "run", "GPU_SHAPES", "CPU_SHAPES", "CONFIGS"]
