"""Clear kernel families on the machine at hand: each family's check (its forward and backward
against its reference, :attr:`mlit_kernels.common.family.Family.check`) in a child process, so a
fault — an illegal address, a crash, a hang — never reaches the caller's CUDA context; the verdict,
with its cause, recorded in the machine cache (:mod:`mlit_kernels.common.clearance`) together with
the launch configurations the child tuned (the one process that may time candidates), so every
later process on the machine runs the same ones.

    verdicts = clear([registry.family("dense")], {"dense": [shape, ...]}, "cuda", dtypes=(torch.float16,))

The child is ``python -m mlit_kernels.checks <descriptor module> --device D --dtypes ... --shapes JSON
[--tune]``; its last stdout line ``MLIT_CHECK {json}`` carries what it found. Without CUDA the
child runs the kernels through Triton's interpreter (the verdict's capability is "interpreter").
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import importlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from typing import Iterable, Mapping, Sequence

import torch

from .common import clearance, machine_cache
from .common.family import Family, source_hash

MARKER = "MLIT_CHECK "
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: Exception texts of a CUDA error after which a process's CUDA context is unusable.
FAULTS = ("illegal memory access", "illegal instruction", "misaligned address", "unspecified launch failure",
          "device-side assert", "CUDA error")
#: Exception types and texts of a kernel that does not compile (Triton's front end, its passes, ptxas).
COMPILE_ERRORS = ("CompilationError", "PassManager::run failed", "ptxas", "LLVM ERROR", "MLIR")
DEFAULT_TIMEOUT_S = 900.0


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


# ---- the child --------------------------------------------------------------------------------


def classify(err: BaseException) -> str:
    """The cause a check's exception stands for (:data:`mlit_kernels.common.clearance.CAUSES`)."""
    text = f"{type(err).__name__}: {err}"
    if any(marker in text for marker in FAULTS):
        return "fault"
    if any(marker in text for marker in COMPILE_ERRORS):
        return "compile error"
    return "error"


def run_checks(family: Family, shapes: Sequence[Mapping], dtypes: Sequence[torch.dtype],
               device: torch.device) -> dict:
    """Run ``family``'s check at every (shape, dtype) in this process: {"cleared", "cause", "detail",
    "errors": {"<shape>/<dtype>/<what>": [error, limit]}}; stops at the first exception."""
    errors: dict[str, list[float]] = {}
    worst = None
    for shape in shapes:
        label = ",".join(f"{k}={v}" for k, v in shape.items())
        for dtype in dtypes:
            try:
                found = family.run_check(shape, dtype, device)
            except Exception as err:  # noqa: BLE001 - any failure is the verdict's cause
                detail = f"{label} {dtype_name(dtype)}: {type(err).__name__}: {str(err).strip()[:400]}"
                return {"cleared": False, "cause": classify(err), "detail": detail, "errors": errors}
            for what, (error, limit) in found.items():
                errors[f"{label}/{dtype_name(dtype)}/{what}"] = [float(error), float(limit)]
                if not float(error) <= float(limit) and worst is None:  # NaN fails
                    worst = f"{label} {dtype_name(dtype)}: {what} {float(error):.2e} > {float(limit):.0e}"
    if worst is not None:
        return {"cleared": False, "cause": "disagreement", "detail": worst, "errors": errors}
    return {"cleared": True, "cause": None, "detail": "", "errors": errors}


def child_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlit_kernels.checks",
                                     description="one kernel family's check, in this process (a child of clear())")
    parser.add_argument("module", help="the family's descriptor: its module (defining FAMILY), or module:NAME")
    parser.add_argument("--device", required=True)
    parser.add_argument("--dtypes", required=True, help="comma-separated: fp32, fp16, bf16")
    parser.add_argument("--shapes", required=True, help="a JSON list of shape dicts")
    parser.add_argument("--tune", action="store_true", help="time the tuning candidates (keep the fastest)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cuda":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first kernel is defined
    from .common import tuning

    tuning.allow_timing(args.tune)
    module, _, attr = args.module.partition(":")
    family = getattr(importlib.import_module(module), attr or "FAMILY")
    start = time.monotonic()
    result = run_checks(family, json.loads(args.shapes), [DTYPES[d] for d in args.dtypes.split(",")], device)
    result.update(source_hash=source_hash(family), seconds=round(time.monotonic() - start, 3),
                  tuned=tuning.timed_choices(), device=_device_name(device))
    print(MARKER + json.dumps(result), flush=True)
    return 0


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton's interpreter)"


# ---- the parent -------------------------------------------------------------------------------


def _tail(text: str, lines: int = 3) -> str:
    return " / ".join(line.strip() for line in text.strip().splitlines()[-lines:])[:500]


def check_in_child(family: Family, shapes: Sequence[Mapping], dtypes: Sequence[torch.dtype],
                   device: torch.device | str, *, tune: bool = True, timeout: float = DEFAULT_TIMEOUT_S,
                   env: Mapping[str, str] | None = None) -> tuple[clearance.Verdict, dict]:
    """Run ``family``'s check in a child process: (the verdict, the configurations it tuned).
    A child that dies (a signal, a non-zero exit without a result, a CUDA fault) is a "fault", one
    that outlives ``timeout`` seconds a "timeout" (its process group is killed)."""
    device = torch.device(device)
    argv = [sys.executable, "-m", "mlit_kernels.checks", family.module, "--device", str(device),
            "--dtypes", ",".join(dtype_name(d) for d in dtypes), "--shapes", json.dumps(list(shapes))]
    if tune:
        argv.append("--tune")
    base = dict(family=family.name, source_hash=source_hash(family), triton=machine_cache.triton_version(),
                capability=machine_cache.capability(device), date=datetime.date.today().isoformat(),
                checked=[{"shape": dict(s), "dtypes": [dtype_name(d) for d in dtypes]} for s in shapes])
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(env if env is not None else os.environ), start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return clearance.Verdict(**base, cleared=False, cause="timeout", seconds=round(time.monotonic() - start, 3),
                                 detail=f"no answer in {timeout:g} s"), {}
    seconds = round(time.monotonic() - start, 3)
    results = [line[len(MARKER):] for line in out.splitlines() if line.startswith(MARKER)]
    if proc.returncode != 0 or not results:
        if proc.returncode < 0:
            detail = f"killed by {signal.Signals(-proc.returncode).name}"
        else:
            detail = f"exit status {proc.returncode} without a result"
        return clearance.Verdict(**base, cleared=False, cause="fault", seconds=seconds,
                                 detail=f"{detail}: {_tail(err) or _tail(out)}"), {}
    found = json.loads(results[-1])
    base["source_hash"] = found["source_hash"]  # what the child read
    verdict = clearance.Verdict(**base, cleared=found["cleared"], cause=found["cause"], detail=found["detail"],
                                device=found["device"], seconds=seconds, errors=found["errors"])
    return verdict, (found["tuned"] if verdict.cleared else {})


def clear(families: Iterable[Family], shapes: Mapping[str, Sequence[Mapping]], device: torch.device | str, *,
          dtypes: Sequence[torch.dtype] = (torch.float16,), tune: bool = True, timeout: float = DEFAULT_TIMEOUT_S,
          record: bool = True, only_uncleared: bool = False, jobs: int = 1, report=None, precompile: bool = False,
          report_compile=None) -> list[clearance.Verdict]:
    """Check each family in its own child process at ``shapes[name]`` (default: its ``gpu_shapes`` on
    CUDA, ``small_shapes`` elsewhere) in each of ``dtypes`` it takes (else its widest); record each
    verdict and the tuned configurations in the machine cache (``record``). ``only_uncleared``: skip
    families already cleared on this device. ``jobs`` children at a time (1 on a GPU: the tuning
    times candidates). ``report(verdict)`` is called as each one ends; returns the verdicts in the
    families' order. ``precompile`` (on CUDA): first compile, in parallel child processes, every
    kernel the checks launch (every tuning candidate), so the checks find them in Triton's cache
    (:func:`warm_checks`; ``report_compile(report)``)."""
    device = torch.device(device)
    todo = [f for f in families if not (only_uncleared and clearance.cleared(f, device))]
    if precompile and device.type == "cuda" and todo:
        warm_checks(todo, shapes, device, dtypes, report_compile)

    def one(family: Family) -> clearance.Verdict:
        fam_shapes, fam_dtypes = _shapes_and_dtypes(family, shapes, device, dtypes)
        verdict, tuned = check_in_child(family, fam_shapes, fam_dtypes, device, tune=tune, timeout=timeout)
        if record:
            clearance.record([verdict], tuned, device)
        if report is not None:
            report(verdict)
        return verdict

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(one, todo))


def _shapes_and_dtypes(family: Family, shapes: Mapping[str, Sequence[Mapping]], device: torch.device,
                       dtypes: Sequence[torch.dtype]) -> tuple[Sequence[Mapping], list[torch.dtype]]:
    """The shapes (``shapes[name]``, else the family's GPU or small shapes) and dtypes a check runs."""
    fam_shapes = shapes.get(family.name) or (family.gpu_shapes if device.type == "cuda" else family.small_shapes)
    return fam_shapes, [d for d in dtypes if d in family.dtypes] or [family.dtypes[-1]]


def warm_checks(families: Sequence[Family], shapes: Mapping[str, Sequence[Mapping]], device: torch.device,
                dtypes: Sequence[torch.dtype], report=None):
    """Compile every kernel the checks of ``families`` launch (each tuning candidate too) into
    Triton's cache, in parallel child processes (:mod:`mlit_kernels.precompile`): the launches are
    recorded by running the checks under a dry-run meter here, where no Triton kernel runs."""
    from . import precompile

    signatures: dict = {}
    for family in families:
        fam_shapes, fam_dtypes = _shapes_and_dtypes(family, shapes, device, dtypes)
        for shape in fam_shapes:
            for dtype in fam_dtypes:
                try:
                    found = precompile.record_every_configuration(lambda: family.run_check(shape, dtype, device))
                except Exception:  # noqa: BLE001 - a check that cannot even be recorded fails in its child
                    continue
                signatures.update(dict.fromkeys(found))
    result = precompile.warm(list(signatures))
    if report is not None:
        report(result)
    return result


def _ratio(error: float, limit: float) -> float:
    """error / limit, the worst first (NaN is infinitely bad; a zero limit allows only zero)."""
    if error != error:
        return math.inf
    return error / limit if limit > 0 else (math.inf if error > 0 else 0.0)


def verdict_row(verdict: clearance.Verdict) -> dict:
    """A verdict as one JSON-able record (``mlit doctor --json``), with its worst error."""
    worst = max(verdict.errors.items(), key=lambda item: _ratio(*item[1]), default=None)
    return dict(family=verdict.family, verdict="cleared" if verdict.cleared else "failed", cause=verdict.cause,
                detail=verdict.detail, source_hash=verdict.source_hash, triton=verdict.triton,
                capability=verdict.capability, device=verdict.device, seconds=verdict.seconds,
                worst=None if worst is None else {"what": worst[0], "error": worst[1][0], "limit": worst[1][1]})


if __name__ == "__main__":
    sys.exit(child_main())
