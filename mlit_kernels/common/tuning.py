"""One way to choose a launch configuration: :class:`LaunchTuner`.

A tuner holds the candidate configurations of a group of kernels (the first is the default) and
picks one per key (what the best choice depends on: widths, experts, dtype) and device:

* forced — ``with tuner.force(config):`` (the tests run every candidate this way);
* off CUDA, or under Triton's interpreter — the default;
* already chosen in this process — that choice;
* kept for this kind of device (:mod:`.machine_cache`: tuned where the family was cleared) — that
  configuration, so every process on the machine runs the same one (bit for bit the same results);
* in a process that may time (:func:`allow_timing`: the child process of a clearance check, never
  the caller's, where a bad configuration could break the CUDA context) and not while a CUDA graph
  is captured (timing is forbidden there: the default, one warning, the key stays untuned) — every
  candidate is timed once (``triton.testing.do_bench``), the fastest kept and reported by
  :func:`timed_choices`;
* else — the default.

The choice is made in the custom op's eager implementation, which ``torch.compile`` never traces
(its fake implementation does not tune), so compiled and eager code share it. Every configuration
computes the same result within the per-dtype tolerance (docs/layer.md, "Repeatability"), so
tuning changes speed only.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from typing import Callable, Generic, Hashable, Iterator, Sequence, TypeVar

import torch

from . import machine_cache
from .tiling import interpreting

C = TypeVar("C")
_TUNERS: "weakref.WeakSet[LaunchTuner]" = weakref.WeakSet()
_TIMING = [False]


def allow_timing(allowed: bool = True) -> None:
    """Let this process time candidates (a clearance check's child process calls it)."""
    _TIMING[0] = allowed


def tuners() -> list["LaunchTuner"]:
    """Every tuner defined in this process (by name)."""
    return sorted(_TUNERS, key=lambda t: t.name)


def timed_choices() -> dict[str, dict[str, str]]:
    """{tuner name: {repr(key): repr(configuration)}} of every key timed in this process."""
    return {t.name: dict(t._timed) for t in _TUNERS if t._timed}


class LaunchTuner(Generic[C]):
    """Picks one of ``candidates`` (the first is the default) per key and device; see the module
    docstring. ``repr`` of a candidate names it in the machine cache."""

    def __init__(self, name: str, candidates: Sequence[C]):
        if not candidates:
            raise ValueError("candidates must not be empty")
        self.name = name
        self.candidates = tuple(candidates)
        self._forced: C | None = None
        self._chosen: dict[tuple, C] = {}
        self._timed: dict[str, str] = {}
        self._warned: set[Hashable] = set()
        _TUNERS.add(self)

    @contextlib.contextmanager
    def force(self, config: C) -> Iterator[C]:
        """Within the block every call uses ``config``."""
        previous, self._forced = self._forced, config
        try:
            yield config
        finally:
            self._forced = previous

    def forget(self) -> None:
        """Drop this process's choices (the next call looks in the machine cache again)."""
        self._chosen.clear()
        self._timed.clear()

    def choose(self, key: Hashable, device: torch.device, run: Callable[[C], None],
               allowed: Sequence[C] | None = None) -> C:
        """The configuration for ``key`` on ``device``; ``run(config)`` launches the kernels once
        (timed when tuning). ``allowed``: the candidates this shape admits (in order, the first its
        default); all by default."""
        candidates = tuple(allowed) if allowed else self.candidates
        if self._forced is not None:
            return self._forced
        if device.type != "cuda" or interpreting():
            return candidates[0]
        scoped = (device.index, key)
        if scoped in self._chosen:
            return self._chosen[scoped]
        kept = machine_cache.tuned(self.name, repr(key), device)
        by_name = {repr(c): c for c in candidates}
        if kept in by_name:
            chosen = self._chosen[scoped] = by_name[kept]
            return chosen
        if not _TIMING[0]:
            return candidates[0]
        if torch.cuda.is_current_stream_capturing():
            if key not in self._warned:
                self._warned.add(key)
                warnings.warn(f"{self.name}: first call for {key} inside CUDA-graph capture; using the default "
                              f"configuration {candidates[0]} untimed (warm up eagerly before capturing to tune)",
                              RuntimeWarning, stacklevel=3)
            return candidates[0]
        import triton.testing

        times = {config: triton.testing.do_bench(lambda config=config: run(config), warmup=5, rep=20)
                 for config in candidates}
        chosen = self._chosen[scoped] = min(times, key=times.get)
        self._timed[repr(key)] = repr(chosen)
        return chosen


__all__ = ["LaunchTuner", "allow_timing", "timed_choices", "tuners"]
