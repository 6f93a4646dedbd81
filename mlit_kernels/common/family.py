"""What a kernel family is: the :class:`Family` descriptor every family folder declares in its
``family.py`` (Triton-free, so reading a descriptor compiles and interprets nothing), and the hash
of the sources that decide what the family launches (:func:`source_hash`).

A family folder ``mlit_kernels/<name>/`` has the same parts in each: ``kernels.py`` (the Triton
kernels), the launch code, the ``torch.library`` ops (``ops.py``), ``reference.py`` (the same math
in plain PyTorch: the oracle of its tests and of its check) and ``family.py``.
:mod:`mlit_kernels.registry` lists the families; clearance, the meter, ``mlit doctor``, the GPU
report and the parametrised tests read it.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch

#: A family's check: check(shape, dtype, device) -> {what: (error, limit)}: the forward and the
#: backward against the family's reference on random inputs of ``shape`` (a dict of the family's
#: own shape names), computing in ``dtype``; an error above its limit (or not finite) fails.
Check = Callable[[Mapping, torch.dtype, torch.device], Mapping[str, tuple[float, float]]]
#: A kernel's FLOP model: the matmul work of one launch from its arguments by parameter name
#: (tensors and ints), 2 FLOPs a multiply-add.
FlopModel = Callable[[Mapping], int]


@dataclass(frozen=True)
class Family:
    """A kernel family.

    name: the registry's name ("dense", "attention", ...). module: the descriptor's module
    (``mlit_kernels.<folder>.family``, whose ``FAMILY`` it is; or ``module:NAME``): what a child
    process imports to check the family.
    summary: one line of what it computes.
    ops: its ``torch.library`` ops ("mlit::fused_moe", ...), the only callers of its kernels.
    sources: the modules whose text decides what it launches (its kernels and launch code, and the
    shared device functions they call): their hash keys its clearance (:func:`source_hash`).
    kernels: every Triton kernel it launches → its FLOP model, or None for element-wise and
    reduction work (bound by bytes; the meter's :class:`~mlit_kernels.meter.Meter` reads these).
    launches: launches of one call of the family's entry: {"forward": n, "backward": n} in
    training, and {"eval": n} for a forward without gradients.
    dtypes: the compute dtypes it takes. limits: the shapes it takes, in words.
    check: :data:`Check`, or its "module:function" (run it with :meth:`run_check`). small_shapes: shapes its check runs at under Triton's CPU interpreter
    (seconds each); gpu_shapes: at the paper's sizes, where no model gives its own.
    """

    name: str
    module: str
    summary: str
    ops: tuple[str, ...]
    sources: tuple[str, ...]
    kernels: Mapping[str, FlopModel | None]
    launches: Mapping[str, int]
    dtypes: tuple[torch.dtype, ...]
    limits: str
    check: Check | str
    small_shapes: tuple[Mapping, ...]
    gpu_shapes: tuple[Mapping, ...] = field(default=())

    def __post_init__(self):
        if not self.small_shapes:
            raise ValueError(f"family {self.name!r}: small_shapes must not be empty")
        _DESCRIPTORS[self.name] = self

    def run_check(self, shape: Mapping, dtype: torch.dtype, device: torch.device) -> Mapping[str, tuple[float, float]]:
        """The family's :data:`Check` at ``shape`` in ``dtype`` on ``device`` (a ``check`` given as
        "module:function" is imported here: a descriptor imports nothing above it)."""
        check = self.check
        if isinstance(check, str):
            module, _, name = check.partition(":")
            check = getattr(importlib.import_module(module), name)
        return check(shape, dtype, device)


_DESCRIPTORS: dict[str, Family] = {}  # every descriptor made in this process, by name


def descriptor(name: str) -> Family:
    """The descriptor named ``name`` made in this process (its family module imported)."""
    return _DESCRIPTORS[name]


def source_path(module: str) -> Path:
    """The file of ``module``, found without importing it (nothing is compiled or interpreted)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ValueError(f"source module {module!r} not found")
    return Path(spec.origin)


_HASHES: dict[tuple, str] = {}


def source_hash(family: Family) -> str:
    """sha256 (hex, first 16 digits) of the family's sources, in order, each with its name: a
    changed kernel, launch setting or shared device function gives a new hash, so the family is
    uncleared until checked again. Read once a process (:func:`forget_hashes` reads again)."""
    key = (family.name, family.sources)
    if key not in _HASHES:
        digest = hashlib.sha256()
        for module in family.sources:
            digest.update(module.encode() + b"\0" + source_path(module).read_bytes() + b"\0")
        _HASHES[key] = digest.hexdigest()[:16]
    return _HASHES[key]


def forget_hashes() -> None:
    """Hash the sources again at the next :func:`source_hash` (after a source file changed)."""
    _HASHES.clear()


__all__ = ["Family", "Check", "FlopModel", "descriptor", "source_hash", "source_path", "forget_hashes"]
