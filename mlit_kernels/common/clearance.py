"""Which kernel families may run on a GPU: verdicts keyed to the code they checked, and the one
decision of whether a call runs Triton kernels (:func:`uses_triton`). Triton-free.

The kernels are tested under Triton's CPU interpreter; only a GPU shows what the compiler makes of
them (the dense MoE kernels passed every interpreter test and faulted at their first GPU launch:
NVIDIA H200, Triton 3.6.0, 2026-12-04). A verdict is

    (family, hash of its sources, Triton version, compute capability) → cleared, or failed (+ cause)

so a changed kernel is uncleared until checked again. Two tables hold verdicts: :data:`BUILTIN`,
what this project's GPU runs cleared, and the machine cache (:mod:`.machine_cache`), what this
machine's GPU cleared (``mlit doctor --clear``, or ``mlit train`` before its first step: each
family's check in a child process, :mod:`mlit_kernels.checks`). On CUDA, ``"auto"`` takes a family
only once one of them has cleared its current code there; off CUDA (the interpreter, the meters)
every family may run. ``MLIT_UNCLEARED_KERNELS=1`` lets ``"auto"`` take uncleared families too.
A family asked for by name (``backend="triton"``, ``triton_variant="dense"``) runs whatever this says.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass, field

import torch

from . import machine_cache
from .family import Family, descriptor, source_hash

ENV = "MLIT_UNCLEARED_KERNELS"
BACKENDS = ("auto", "reference", "triton")
#: Why a check failed: its kernels did not compile; the child process crashed, died of a signal or
#: hit a CUDA error (a fault the caller's CUDA context would not survive); a result beyond its
#: tolerance; no answer in time; any other exception.
CAUSES = ("compile error", "fault", "disagreement", "timeout", "error")
CLEAR_COMMAND = "mlit doctor --clear"


@dataclass(frozen=True)
class Verdict:
    """What a check of one family found on one kind of device (a record of either table).

    errors: {what: [error, limit]} of the checked outputs and gradients; checked: the shapes and
    dtypes run; detail: the first lines of a failure (its exception, signal or exit status)."""

    family: str
    source_hash: str
    triton: str
    capability: str
    cleared: bool
    cause: str | None = None
    detail: str = ""
    device: str = ""
    date: str = ""
    seconds: float = 0.0
    errors: dict = field(default_factory=dict)
    checked: list = field(default_factory=list)

    def __post_init__(self):
        if self.cleared != (self.cause is None) or (self.cause is not None and self.cause not in CAUSES):
            raise ValueError(f"a verdict is cleared with no cause, or failed with one of {CAUSES}; "
                             f"got cleared={self.cleared}, cause={self.cause!r}")

    def matches(self, family: Family, capability: str, triton: str) -> bool:
        """Whether this verdict is about the family's current code on this kind of device."""
        return (self.family, self.source_hash, self.capability, self.triton) == (
            family.name, source_hash(family), capability, triton)


#: Verdicts of this project's GPU runs (bench/RESULTS.md, "GPU runs") on the current code. Empty:
#: no family's current code has run on a GPU (the one run, 2026-12-04, predates every kernel now here).
BUILTIN: tuple[Verdict, ...] = ()


_PARSED: list = [None, []]  # [the cache contents last parsed, their verdicts]


def machine_verdicts() -> list[Verdict]:
    """The verdicts in this machine's cache (records that do not parse are skipped); parsed once
    per version of the file."""
    contents = machine_cache.read()
    if _PARSED[0] is not contents:
        verdicts = []
        for record in contents["verdicts"]:
            try:
                verdicts.append(Verdict(**record))
            except (TypeError, ValueError):
                continue
        _PARSED[:] = [contents, verdicts]
    return list(_PARSED[1])


def verdict(family: Family, device: torch.device | str) -> Verdict | None:
    """The verdict on ``family``'s current code on ``device``'s kind: the machine's newest if it has
    one (a later check there overrides), else the built-in table's; None when neither checked it."""
    cap, version = machine_cache.capability(device), machine_cache.triton_version()
    for table in (machine_verdicts()[::-1], BUILTIN):
        for found in table:
            if found.matches(family, cap, version):
                return found
    return None


def cleared(family: Family, device: torch.device | str) -> bool:
    """Whether ``family``'s current code is cleared on ``device``'s kind of GPU."""
    found = verdict(family, device)
    return found is not None and found.cleared


def uncleared_allowed() -> bool:
    """``MLIT_UNCLEARED_KERNELS=1``: automatic choices may take uncleared families."""
    value = os.environ.get(ENV, "0")
    if value not in ("0", "1"):
        raise ValueError(f"{ENV} must be 0 or 1, got {value!r}")
    return value == "1"


_DECIDED: dict[tuple[str, str, str], bool] = {}  # (family, device, MLIT_UNCLEARED_KERNELS) -> may run
_WARNED: set[tuple[str, str]] = set()


def may_run(family: Family, device: torch.device | str | None) -> bool:
    """Whether an automatic choice may run ``family``'s kernels on ``device`` (None: not CUDA):
    always off CUDA; on CUDA when cleared there (or ``MLIT_UNCLEARED_KERNELS=1``), decided once a
    process for each family and device (:func:`record` and :func:`forget` decide again)."""
    if device is None or torch.device(device).type != "cuda":
        return True
    return _may_run_on_cuda(family.name, str(torch.device(device)))


@torch.compiler.assume_constant_result
def _may_run_on_cuda(name: str, device: str) -> bool:
    """:func:`may_run` on a CUDA device: a constant to torch.compile (it reads the machine cache,
    which a traced graph cannot)."""
    key = (name, device, os.environ.get(ENV, "0"))
    if key not in _DECIDED:
        _DECIDED[key] = uncleared_allowed() or cleared(descriptor(name), device)
    return _DECIDED[key]


def forget() -> None:
    """Decide again at the next call (after this machine's cache changed in another process)."""
    _DECIDED.clear()


def uses_triton(family: Family, backend: str, device: torch.device | str) -> bool:
    """The one decision of whether a call runs ``family``'s Triton kernels: ``backend="triton"``
    always, ``"reference"`` never, ``"auto"`` on CUDA once the family is cleared there (with one
    warning per family and device naming :data:`CLEAR_COMMAND` when it is not)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend == "triton"
    device = torch.device(device)
    if device.type != "cuda":
        return False
    return _auto_on_cuda(family.name, str(device))


@torch.compiler.assume_constant_result
def _auto_on_cuda(name: str, device: str) -> bool:
    """:func:`uses_triton` with "auto" on a CUDA device (a constant to torch.compile), warning once
    when the family may not run there."""
    allowed = _may_run_on_cuda(name, device)
    if not allowed and (name, device) not in _WARNED:
        _WARNED.add((name, device))
        warnings.warn(f"mlit_kernels: the {name!r} Triton kernels are not cleared on this GPU "
                      f"({machine_cache.capability(device)}, Triton {machine_cache.triton_version()}) for their "
                      f"current code; running the torch path. `{CLEAR_COMMAND}` checks them in child processes "
                      f"({ENV}=1 runs them unchecked)", RuntimeWarning, stacklevel=4)
    return allowed


def record(verdicts: list[Verdict], tuned: dict[str, dict[str, str]] | None = None,
           device: torch.device | str | None = None) -> None:
    """Add ``verdicts`` to the machine cache (replacing older ones for the same family, code and
    device kind) and ``tuned`` {tuner: {key: configuration}} under ``device``'s kind."""
    forget()
    with machine_cache.update() as contents:
        new = {(v.family, v.source_hash, v.capability, v.triton) for v in verdicts}
        kept = [r for r in contents["verdicts"]
                if (r.get("family"), r.get("source_hash"), r.get("capability"), r.get("triton")) not in new]
        contents["verdicts"] = kept + [asdict(v) for v in verdicts]
        if tuned:
            per_device = contents["tuned"].setdefault(machine_cache.machine_key(device), {})
            for tuner, choices in tuned.items():
                per_device.setdefault(tuner, {}).update(choices)


__all__ = ["ENV", "BACKENDS", "CAUSES", "CLEAR_COMMAND", "Verdict", "BUILTIN", "machine_verdicts", "verdict",
           "cleared", "may_run", "uses_triton", "uncleared_allowed", "record", "forget"]
