"""``mlit doctor``: check and clear the kernels on the machine at hand (also ``mlit.doctor.run()``).

1. Versions (Python, torch, Triton, mlit), the device and its compute capability.
2. Every kernel family of :mod:`mlit_kernels.registry`, each in a child process
   (:mod:`mlit_kernels.checks`): its forward and backward against its float64 reference
   (:attr:`~mlit_kernels.common.family.Family.check`) — on a GPU at the shapes of the model at hand
   (:func:`model_shapes`: ``--model``, ``--batch-size``; fp16 under autocast as training runs it,
   fp32 and bf16 too unless ``quick``), without one at small shapes through Triton's interpreter
   (fp32, bf16). A child that faults, hangs, fails to compile or disagrees beyond the per-dtype
   tolerance fails its family, with that cause, and cannot harm this process. Each verdict is
   recorded in the machine cache with the launch configurations the child tuned: from then on
   ``"auto"`` runs the cleared families on this kind of GPU, every process with the same
   configuration (:mod:`mlit_kernels.common.clearance`). ``clear_only``: only the families not yet
   cleared there for their current code.
   On a GPU the kernels the checks launch (every tuning candidate) are first compiled in parallel
   child processes, one a CPU core (:func:`mlit_kernels.checks.warm_checks`), so the checks, one
   family after another on the one GPU, find them in Triton's cache.
3. With ``timing``: the MoE layer forward + backward and a training step of mLiT-XXS (batch 256,
   fp16 autocast, AdamW) per backend (reference, torch.compile(reference), Triton), CUDA events,
   median of 10 after 3 warm-up runs; without a GPU one run each at small shapes, the wall clock.

:func:`run` returns a :class:`Report` whose ``ok`` is False when a family fails or a timing errs
(the command then exits with status 1); ``json`` prints one record per family instead of the table.
"""

from __future__ import annotations

import json
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
from .config import DECODER, ENCODERS, TransformerConfig

HEADER = ("family", "checked", "dtypes", "verdict", "worst error / limit", "seconds")
TIMING_HEADER = ("timing", "shape", "backend", "dtype", "median", "vs reference")
#: The families a run of each task uses.
TASK_FAMILIES = {"train": ("augment", "patch_embed", "attention", "dense", "dispatch", "norm_linear", "loss"),
                 "pretrain": ("augment", "patch_embed", "attention", "dense", "dispatch", "norm_linear", "mae_tokens",
                              "mae_loss")}
TASK_FAMILIES["finetune"] = TASK_FAMILIES["train"]
MAX_CHECK_TOKENS = 4096  # a MoE check runs at the model's token count up to this (+ N mod 16: the same specialisation)


@dataclass
class Report:
    """The doctor's findings: header lines, verdict rows, timing rows, the failures counted."""

    lines: list[str] = field(default_factory=list)
    rows: list[tuple[str, ...]] = field(default_factory=list)
    timings: list[tuple[str, ...]] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)
    failures: int = 0

    @property
    def ok(self) -> bool:
        return self.failures == 0

    def table(self) -> str:
        """The header lines and the markdown tables."""
        parts = self.lines + ["", *_table_head(HEADER)] + [_table_row(row) for row in self.rows]
        if self.timings:
            parts += ["", *_table_head(TIMING_HEADER)] + [_table_row(row) for row in self.timings]
        return "\n".join(parts)


def _table_row(row: tuple[str, ...]) -> str:
    return "| " + " | ".join(row) + " |"


def _table_head(header: tuple[str, ...]) -> list[str]:
    return [_table_row(header), _table_row(tuple("---" for _ in header))]


def model_shapes(cfg: TransformerConfig, batch: int, task: str = "train", num_classes: int = 10,
                 decoder: TransformerConfig = DECODER) -> dict[str, list[dict]]:
    """The shapes each kernel family runs at in a ``task`` run of ``cfg`` at ``batch`` images
    (36×36, 3×3 patches; the MAE keeps 36 of 144), in the families' own shape names."""
    m, tokens = cfg.embed_dim, 145
    moe_tokens = batch * (37 if task == "pretrain" else tokens)
    n_check = moe_tokens if moe_tokens <= MAX_CHECK_TOKENS else MAX_CHECK_TOKENS + moe_tokens % 16
    stacks = [(cfg, n_check)]
    if task == "pretrain":
        dec_tokens = batch * tokens
        stacks.append((decoder, dec_tokens if dec_tokens <= MAX_CHECK_TOKENS else MAX_CHECK_TOKENS + dec_tokens % 16))
    layers = sorted({(c.embed_dim, c.hidden_dim(i), c.num_experts(i), c.top_k, n)
                     for c, n in stacks for i in range(c.depth)})
    moe = [dict(m=a, d_h=d, t=t, k=k, N=n) for a, d, t, k, n in layers]
    shapes = {
        "augment": [dict(B=batch, H=32, S=36)],
        "patch_embed": [dict(B=batch, S=36, P=3, M=m)],
        "attention": [dict(B=batch, n=37 if task == "pretrain" else tokens, D=m, H=cfg.num_heads, G=cfg.num_groups)],
        "dense": [dict(s, norm=True) for s in moe if s["t"] <= 16],
        "dispatch": moe,
        "norm_linear": [dict(B=batch, n=tokens, D=m, E=num_classes)],
        "loss": [dict(B=batch, C=num_classes)],
    }
    if task == "pretrain":
        d = decoder.embed_dim
        shapes["attention"].append(dict(B=batch, n=tokens, D=d, H=decoder.num_heads, G=decoder.num_groups))
        shapes["norm_linear"] = [dict(B=batch, n=37, D=m, E=d), dict(B=batch, n=tokens, D=d, E=27)]
        shapes["mae_tokens"] = [dict(B=batch, P=144, K=36, D=m), dict(B=batch, P=144, K=36, D=d)]
        shapes["mae_loss"] = [dict(B=batch, S=36, P=3)]
        del shapes["loss"]
    return {name: shapes[name] for name in TASK_FAMILIES[task]}


def run(quick: bool = False, timing: bool = True, quiet: bool = False, *, clear_only: bool = False,
        families: tuple[str, ...] | None = None, model: str = "XXS", task: str = "train", batch: int = 256,
        as_json: bool = False, timeout: float | None = None) -> Report:
    """Check (and clear) the kernel families on this machine's device, printing rows as they come
    (to stdout; nothing when ``quiet``); see the module docstring."""
    from mlit_kernels import registry
    from mlit_kernels.checks import DEFAULT_TIMEOUT_S, clear, verdict_row

    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first Triton kernel is defined
    import triton

    device = torch.device("cuda" if cuda else "cpu")
    report = Report(lines=[f"mlit doctor — mlit {__version__}, Python {platform.python_version()}, "
                           f"torch {torch.__version__}, triton {triton.__version__}", _device_line(device)])
    out = None if quiet else sys.stdout
    names = families or (TASK_FAMILIES[task] if cuda else registry.NAMES)
    shapes = model_shapes(ENCODERS[model.upper()], batch, task) if cuda else {}
    if cuda:
        dtypes = (torch.float16,) if quick else (torch.float16, torch.float32, torch.bfloat16)
    else:  # the interpreter is slow (and exact): fp32 and bf16 only
        dtypes = (torch.float32, torch.bfloat16)
    if out is not None and not as_json:
        print("\n".join(report.lines + ["", *_table_head(HEADER)]), file=out, flush=True)

    def add(verdict) -> None:
        record = verdict_row(verdict)
        report.records.append(record)
        report.failures += not verdict.cleared
        worst = record["worst"]
        row = (verdict.family, f"{len(verdict.checked)} shape(s)", "/".join(verdict.checked[0]["dtypes"]),
               "cleared" if verdict.cleared else f"FAILED: {verdict.cause}",
               (f"{worst['error']:.1e} / {worst['limit']:.0e} ({worst['what'].rsplit('/', 1)[-1]})" if worst else "")
               + ("" if verdict.cleared else f"; {_cell(verdict.detail)}"), f"{verdict.seconds:.1f}")
        report.rows.append(row)
        if out is not None:
            print(json.dumps(record) if as_json else _table_row(row), file=out, flush=True)

    def compiled(result) -> None:
        report.lines.append(_compile_line(result))
        if out is not None and not as_json:
            print(report.lines[-1], file=out, flush=True)

    clear([registry.family(name) for name in names], shapes, device, dtypes=dtypes, report=add,
          timeout=timeout or DEFAULT_TIMEOUT_S, only_uncleared=clear_only, jobs=1 if cuda else os.cpu_count() or 1,
          precompile=True, report_compile=compiled)
    if timing and not as_json:
        if out is not None:
            print("\n".join(["", *_table_head(TIMING_HEADER)]), file=out, flush=True)
        for row in _timing_rows(device):
            report.timings.append(row)
            report.failures += row[-1] == "ERROR"
            if out is not None:
                print(_table_row(row), file=out, flush=True)
    if out is not None and not as_json:
        print(f"\n{report.failures} failed check(s)" if report.failures else "\nall checks passed", file=out)
    return report


def clear_for_run(cfg: TransformerConfig, batch: int, task: str, device: torch.device, num_classes: int = 10,
                  log: TextIO | None = sys.stderr) -> list:
    """Before a run's first step on CUDA: check, in child processes, every family the run uses that
    is not cleared on this GPU for its current code, at the run's shapes (fp16 under autocast);
    returns the verdicts (their records in the machine cache decide what ``"auto"`` runs)."""
    from mlit_kernels import registry
    from mlit_kernels.checks import clear

    names = TASK_FAMILIES[task]

    def report(verdict) -> None:
        if log is not None:
            status = "cleared" if verdict.cleared else f"not cleared ({verdict.cause}: {verdict.detail[:200]})"
            print(f"kernels: {verdict.family} {status} in {verdict.seconds:.0f} s", file=log, flush=True)

    def compiled(result) -> None:
        if log is not None:
            print(f"kernels: {_compile_line(result)}", file=log, flush=True)

    return clear([registry.family(name) for name in names], model_shapes(cfg, batch, task, num_classes), device,
                 dtypes=(torch.float16,), only_uncleared=True, report=report, precompile=True,
                 report_compile=compiled)


def _compile_line(result) -> str:
    """One line for a :class:`mlit_kernels.precompile.WarmReport`."""
    failed = f"; {len(result.failures)} failed ({_cell(result.failures[0])})" if result.failures else ""
    return (f"compiled {result.signatures} kernel specialisations in {result.wall_s:.0f} s, {result.jobs} "
            f"processes in parallel{failed}")


def _cell(text: str) -> str:
    return (text.strip().splitlines() or [""])[0][:160].replace("|", "/")


def _device_line(device: torch.device) -> str:
    if device.type != "cuda":
        return "device: cpu (no CUDA device: Triton kernels through the interpreter, small shapes)"
    major, minor = torch.cuda.get_device_capability(device)
    return (f"device: {torch.cuda.get_device_name(device)}, compute capability {major}.{minor} (sm_{major}{minor}), "
            f"CUDA {torch.version.cuda}")


# ---- timings ----------------------------------------------------------------------------------


def _timing_rows(device: torch.device):
    """Rows timing the layer and a training step per backend, with the speed-up over the reference."""
    from mlit_kernels import SharedSwiGLUMoE

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
    for what, shape, make in (("layer fwd+bwd", f"{m}, {d_h}, {t}, {k}; N={n}", layer_step),
                              (f"train step ({cfg.name}, batch {batch})", "AdamW", train_step)):
        times = {}
        for backend in backends:
            try:
                times[backend] = _median_ms(make(backend), device)
            except Exception as err:  # noqa: BLE001 - reported as a row
                yield (what, shape, backend, dtype, f"{type(err).__name__}: {_cell(str(err))}", "ERROR")
                continue
            speedup = times["reference"] / times[backend] if "reference" in times else float("nan")
            yield (what, shape, backend, dtype, f"{times[backend]:.3f} ms", f"{speedup:.2f}x")


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


__all__ = ["Report", "run", "clear_for_run", "model_shapes", "TASK_FAMILIES"]
