"""Bounds and initialisation checks for Triton kernels under the CPU interpreter.

A GPU stops a kernel that reads or writes outside its tensors with an illegal-address error (the
interpreter reads whatever host memory is there), and hands out recycled memory from
``torch.empty`` (the CPU's fresh pages are mostly zeros). :func:`checked_kernels` makes the
interpreter strict on both counts:

* every masked-in load and store of an interpreted launch must fall inside the extent of one of
  that launch's tensor arguments (else AssertionError naming the kernel);
* ``torch.empty`` / ``empty_like`` / ``Tensor.new_empty`` return memory filled with NaN (floats)
  or 0x5A bytes (integers), so a kernel that reads what nobody wrote gives NaN or a wild index.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import torch


def _extent(t: torch.Tensor) -> tuple[int, int] | None:
    """[first byte, one past the last byte] that a view addresses, or None when empty."""
    if t.numel() == 0:
        return None
    span = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) + 1
    return t.data_ptr(), t.data_ptr() + span * t.element_size()


def _poisoned(t: torch.Tensor) -> torch.Tensor:
    if t.numel():
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype == torch.bool:
            t.fill_(True)
        else:
            t.view(torch.uint8).fill_(0x5A)
    return t


@contextlib.contextmanager
def checked_kernels() -> Iterator[None]:
    """Within the block: interpreted launches checked for out-of-range accesses, empties poisoned."""
    import triton.runtime.interpreter as interp

    executor, builder = interp.GridExecutor, interp.InterpreterBuilder
    originals = (executor._init_args_hst, builder.create_masked_load, builder.create_masked_store,
                 torch.empty, torch.empty_like, torch.Tensor.new_empty)
    launch = {"kernel": None, "ranges": []}

    def init_args(self, args_dev, kwargs):
        args_hst, kwargs_hst = originals[0](self, args_dev, kwargs)
        tensors = [a for a in [*args_hst, *kwargs_hst.values()] if isinstance(a, torch.Tensor)]
        launch.update(kernel=self.fn.__name__, ranges=[e for e in map(_extent, tensors) if e])
        return args_hst, kwargs_hst

    def check(kind, ptrs, mask):
        itemsize = interp._get_np_dtype(ptrs.get_element_ty()).itemsize
        active = np.broadcast_to(mask.data, ptrs.data.shape).astype(bool)
        addresses = ptrs.data[active].astype(np.uint64)
        inside = np.zeros(addresses.shape, dtype=bool)
        for lo, hi in launch["ranges"]:
            inside |= (addresses >= lo) & (addresses + itemsize <= hi)
        if not inside.all():
            raise AssertionError(f"{launch['kernel']}: {kind} of {int((~inside).sum())} element(s) outside every "
                                 f"tensor argument")

    def load(self, ptrs, mask, other, *rest):
        check("load", ptrs, mask)
        return originals[1](self, ptrs, mask, other, *rest)

    def store(self, ptrs, value, mask, *rest):
        check("store", ptrs, mask)
        return originals[2](self, ptrs, value, mask, *rest)

    executor._init_args_hst, builder.create_masked_load, builder.create_masked_store = init_args, load, store
    torch.empty = lambda *a, **kw: _poisoned(originals[3](*a, **kw))
    torch.empty_like = lambda *a, **kw: _poisoned(originals[4](*a, **kw))
    torch.Tensor.new_empty = lambda self, *a, **kw: _poisoned(originals[5](self, *a, **kw))
    try:
        yield
    finally:
        (executor._init_args_hst, builder.create_masked_load, builder.create_masked_store,
         torch.empty, torch.empty_like, torch.Tensor.new_empty) = originals
