"""One way to choose a launch configuration: :class:`LaunchTuner`.

A tuner holds the candidate configurations of a group of kernels (the first is the default) and
picks one per key (what the best choice depends on: widths, experts, dtype, device):

* forced — ``with tuner.force(config):`` (the tests run every candidate this way);
* off CUDA, or under Triton's interpreter — the default;
* already chosen in this process — that choice;
* while a CUDA graph is being captured — the default, with one warning per key (timing kernels
  during capture is forbidden; warm up eagerly before capturing, as ``mlit.train`` does); the key
  stays untuned, so the next eager call tunes it;
* else — every candidate is timed once (``triton.testing.do_bench``) and the fastest kept.

The choice is made in the custom op's eager implementation, which ``torch.compile`` never traces
(its fake implementation does not tune), so compiled and eager code share it. A kernel's results
must not depend on the configuration chosen (the dense kernels' reduction boundaries are fixed
by the shape: :mod:`mlit_kernels.common.settings`), so tuning changes speed only.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Generic, Hashable, Iterator, Sequence, TypeVar

import torch

from .tiling import interpreting

C = TypeVar("C")


class LaunchTuner(Generic[C]):
    """Picks one of ``candidates`` (the first is the default) per key; see the module docstring."""

    def __init__(self, name: str, candidates: Sequence[C]):
        if not candidates:
            raise ValueError("candidates must not be empty")
        self.name = name
        self.candidates = tuple(candidates)
        self._forced: C | None = None
        self._chosen: dict[Hashable, C] = {}
        self._warned: set[Hashable] = set()

    @contextlib.contextmanager
    def force(self, config: C) -> Iterator[C]:
        """Within the block every call uses ``config``."""
        previous, self._forced = self._forced, config
        try:
            yield config
        finally:
            self._forced = previous

    def choose(self, key: Hashable, device: torch.device, run: Callable[[C], None],
               allowed: Sequence[C] | None = None) -> C:
        """The configuration for ``key``; ``run(config)`` launches the kernels once (timed when tuning).
        ``allowed``: the candidates this shape admits (in order, the first its default); all by default."""
        candidates = tuple(allowed) if allowed else self.candidates
        if self._forced is not None:
            return self._forced
        if device.type != "cuda" or interpreting():
            return candidates[0]
        if key in self._chosen:
            return self._chosen[key]
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
        chosen = self._chosen[key] = min(times, key=times.get)
        return chosen


__all__ = ["LaunchTuner"]
