"""Kernel-family descriptors whose checks misbehave on purpose, for the clearance tests: a child
process that imports one of these (``fake_families:NAME``) passes, disagrees, crashes, dies of a
signal, hangs, fails to compile or hits a CUDA fault."""

from __future__ import annotations

import os
import signal
import time

import torch

from mlit_kernels.common.family import Family


class CompilationError(Exception):
    """Named as Triton's compile errors are."""


def _passes(shape, dtype, device):
    return {"y": (1e-6, 1e-4), "dx": (2e-6, 1e-4)}


def _disagrees(shape, dtype, device):
    return {"y": (1e-6, 1e-4), "dx": (0.5, 1e-4)}


def _nan(shape, dtype, device):
    return {"y": (float("nan"), 1e-4)}


def _exits(shape, dtype, device):
    os._exit(3)


def _segfaults(shape, dtype, device):
    os.kill(os.getpid(), signal.SIGSEGV)


def _hangs(shape, dtype, device):
    time.sleep(600)


def _does_not_compile(shape, dtype, device):
    raise CompilationError("at 12:8: PassManager::run failed")


def _faults(shape, dtype, device):
    raise RuntimeError("CUDA error: an illegal memory access was encountered")


def _fake(name: str, check) -> Family:
    return Family(name=f"fake_{name.lower()}", module=f"{__name__}:{name}", summary="a test family", ops=(),
                  sources=(__name__,), kernels={}, launches={}, dtypes=(torch.float32,), limits="",
                  check=check, small_shapes=({"n": 1},))


PASSES = _fake("PASSES", _passes)
DISAGREES = _fake("DISAGREES", _disagrees)
NAN = _fake("NAN", _nan)
EXITS = _fake("EXITS", _exits)
SEGFAULTS = _fake("SEGFAULTS", _segfaults)
HANGS = _fake("HANGS", _hangs)
DOES_NOT_COMPILE = _fake("DOES_NOT_COMPILE", _does_not_compile)
FAULTS = _fake("FAULTS", _faults)
