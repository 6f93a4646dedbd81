"""Compile what a run will launch before it launches it, in parallel child processes, into Triton's
cache — as torch inductor's compile workers do — so the first step finds every kernel compiled.

A kernel specialisation takes Triton seconds to compile (about 20 s per kernel set and dtype on the
first GPU run, one after another); a step launches a few dozen. :func:`record` runs a step under a
dry-run :class:`mlit_kernels.meter.Meter` (no Triton kernel runs; torch ops do) and returns each
distinct :class:`~mlit_kernels.meter.LaunchSignature`; :func:`warm` splits them over ``jobs``
children (``python -m mlit_kernels.precompile FILE``), each compiling its share:

* on the GPU present (``arch`` None): ``kernel.warmup(...)`` with arguments that specialise as the
  real ones do — Triton's own compile path and cache key, so the real launch loads the binary;
* for ``arch`` (e.g. 90) without a GPU: ``triton.compile`` of the same signature for
  ``GPUTarget("cuda", arch, 32)`` (what ``bench/compile_time.py`` times on a CPU machine).

Best effort: a child that fails to compile a kernel reports it and the real launch compiles it
(and fails) as it would have.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

#: A constexpr whose recorded value names one of these is a tl.dtype.
_DTYPE_NAMES = ("fp16", "bf16", "fp32", "fp64", "int32", "int64")
#: Integer arguments as the JIT specialises them: (kind, divisible by 16) -> a value of that class.
_INTS = {("i32", True): 16, ("i32", False): 17, ("i64", True): 2**33, ("i64", False): 2**33 + 1,
         ("u64", True): 2**63 + 16, ("u64", False): 2**63 + 17}
_TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64,
                 "i8": torch.int8, "i16": torch.int16, "i32": torch.int32, "i64": torch.int64, "u8": torch.uint8,
                 "i1": torch.bool}


def record(step: Callable[[], object]) -> list:
    """The distinct launch signatures of ``step()`` run under a dry-run meter, in launch order."""
    from .meter import Meter

    with Meter(dry_run=True) as meter:
        step()
    seen: dict = {}
    for launch in meter.records:
        if launch.signature is not None:
            seen.setdefault(launch.signature, None)
    return list(seen)


def record_every_configuration(step: Callable[[], object]) -> list:
    """:func:`record` once per tuning candidate — every tuner of the package (defined by the time
    ``step`` first runs) forced to its i-th candidate at once — as a process that tunes by timing
    compiles them all."""
    import contextlib

    from .common.tuning import tuners

    found = dict.fromkeys(record(step))
    rounds = max([len(t.candidates) for t in tuners()] + [1])
    for i in range(1, rounds):
        with contextlib.ExitStack() as stack:
            for tuner in tuners():
                stack.enter_context(tuner.force(tuner.candidates[i % len(tuner.candidates)]))
            found.update(dict.fromkeys(record(step)))
    return list(found)


def kernel(path: str):
    """The JIT kernel "module:function"."""
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def _constexpr(value):
    if isinstance(value, str) and value in _DTYPE_NAMES:
        import triton.language as tl

        return tl.dtype(value)
    return value


class _Pointer:
    """A stand-in tensor argument: its dtype, and an address 16-aligned or not (all the JIT reads)."""

    def __init__(self, dtype: torch.dtype, aligned: bool):
        self.dtype, self._address = dtype, 0 if aligned else 8

    def data_ptr(self) -> int:
        return self._address


def warm_one(signature: dict) -> None:
    """Compile one signature (a :class:`LaunchSignature` as a dict) for the GPU present into Triton's
    cache, through the JIT's own path (``warmup``): the real launch's cache key."""
    fn = kernel(signature["kernel"])
    constexprs = {name: _constexpr(value) for name, value in signature["constexprs"]}
    argument_names = [name for name, _, _ in signature["arguments"]]
    args = []
    for name, kind, divisible in signature["arguments"]:
        if kind == "constexpr":
            args.append(constexprs[name])
        elif kind.startswith("*"):
            args.append(_Pointer(_TORCH_DTYPES[kind[1:]], divisible))
        elif kind == "fp32":
            args.append(1.5)
        elif kind == "u1":
            args.append(True)
        else:
            args.append(_INTS[(kind, divisible)])
    declared = {name: value for name, value in constexprs.items() if name not in argument_names}
    fn.warmup(*args, grid=(1,), **declared, **dict(signature["options"]))


def ast_source(signature: dict):
    """``triton.compiler.ASTSource`` of a signature dict: what the JIT builds for such a launch."""
    from triton.compiler import ASTSource

    fn = kernel(signature["kernel"])
    fn = fn.fn if type(fn).__name__ == "Autotuner" else fn
    constexprs = {name: _constexpr(value) for name, value in signature["constexprs"]}
    kinds = {name: kind for name, kind, _ in signature["arguments"]}
    names = [p.name for p in fn.params]
    types = {p.name: "constexpr" if p.is_constexpr else kinds[p.name] for p in fn.params}
    attrs = {(names.index(name),): [["tt.divisibility", 16]]
             for name, kind, divisible in signature["arguments"] if divisible and kind != "constexpr"}
    return ASTSource(fn, types, constexprs, attrs)


def compile_one(signature: dict, arch: int) -> None:
    """Compile one signature for ``GPUTarget("cuda", arch, 32)`` (no GPU needed)."""
    import triton
    from triton.backends.compiler import GPUTarget

    options = dict(signature["options"])
    if signature["kernel"].rsplit(":", 1)[1] in ("_crop_kernel", "_op_kernel"):
        options["enable_fp_fusion"] = False  # as mlit_kernels.augment launches them on CUDA
    triton.compile(ast_source(signature), target=GPUTarget("cuda", arch, 32), options=options)


@dataclasses.dataclass
class WarmReport:
    """What :func:`warm` did: specialisations compiled, failures ("kernel: error"), the wall time
    and each compile's seconds (in the child that did it)."""

    signatures: int
    jobs: int
    wall_s: float
    seconds: list[float]
    failures: list[str]

    def projection(self, workers: int, start_s: float) -> float:
        """The wall time ``workers`` children would take (longest-first onto the least loaded),
        each starting in ``start_s`` seconds."""
        loads = [start_s] * workers
        for s in sorted(self.seconds, reverse=True):
            loads[loads.index(min(loads))] += s
        return max(loads)


def warm(signatures: Sequence, *, jobs: int | None = None, arch: int | None = None, timeout: float = 1800.0,
         env: dict | None = None) -> WarmReport:
    """Compile ``signatures`` (LaunchSignatures or their dicts) in ``jobs`` child processes (default:
    one per CPU core, at most one per signature), round-robin; ``arch`` None for the GPU present."""
    dicts = [dataclasses.asdict(s) if dataclasses.is_dataclass(s) else s for s in signatures]
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(dicts) or 1))
    start = time.monotonic()
    seconds, failures = [], []
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for i in range(jobs):
            share = dicts[i::jobs]
            if not share:
                continue
            path = Path(tmp) / f"share{i}.json"
            path.write_text(json.dumps({"arch": arch, "signatures": share}, default=str))
            environ = dict(env if env is not None else os.environ)
            environ["TRITON_INTERPRET"] = "0"
            procs.append((subprocess.Popen([sys.executable, "-m", "mlit_kernels.precompile", str(path)],
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                           env=environ), path))
        for proc, path in procs:
            try:
                out, err = proc.communicate(timeout=max(1.0, timeout - (time.monotonic() - start)))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                failures.append(f"{path.name}: no answer in {timeout:g} s")
                continue
            lines = [line for line in out.splitlines() if line.startswith("{")]
            if proc.returncode != 0 or not lines:
                failures.append(f"{path.name}: exit status {proc.returncode}: {err.strip()[-300:]}")
                continue
            result = json.loads(lines[-1])
            seconds += result["seconds"]
            failures += result["failures"]
    return WarmReport(len(dicts), jobs, round(time.monotonic() - start, 3), seconds, failures)


def child_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlit_kernels.precompile",
                                     description="compile a share of launch signatures into Triton's cache")
    parser.add_argument("share", help="JSON: {arch, signatures}")
    args = parser.parse_args(argv)
    share = json.loads(Path(args.share).read_text())
    seconds, failures = [], []
    for signature in share["signatures"]:
        start = time.perf_counter()
        try:
            if share["arch"] is None:
                warm_one(signature)
            else:
                compile_one(signature, int(share["arch"]))
        except Exception as err:  # noqa: BLE001 - reported; the real launch compiles it as it would have
            failures.append(f"{signature['kernel']}: {type(err).__name__}: {str(err).strip()[:200]}")
        seconds.append(round(time.perf_counter() - start, 3))
    print(json.dumps({"seconds": seconds, "failures": failures}), flush=True)
    return 0


__all__ = ["record", "record_every_configuration", "warm", "warm_one", "compile_one", "ast_source", "WarmReport"]


if __name__ == "__main__":
    sys.exit(child_main())
