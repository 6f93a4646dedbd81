"""One way to make a Triton launcher a ``torch.library`` custom op: :func:`custom_op`.

Every kernel of the package is reached through exactly one such op (``torch.ops.mlit.<name>``), so
``torch.compile`` traces through it (the fake gives exact output shapes and dtypes), CUDA graphs
capture it (the ops make no host reads) and autograd differentiates it (the forward op's backward
calls the family's backward op; no double backward).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

NAMESPACE = "mlit"


def custom_op(name: str, *, fake: Callable, backward: Callable | None = None, setup_context: Callable | None = None,
              mutates_args: Iterable[str] = ()) -> Callable:
    """Decorator: register ``fn`` as ``torch.ops.mlit.<name>`` with its fake implementation and, with
    ``backward`` (and ``setup_context``), its autograd; returns the op (callable like ``fn``)."""
    if (backward is None) != (setup_context is None):
        raise ValueError(f"{name}: give backward and setup_context together, or neither")

    def register(fn: Callable):
        op = torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=tuple(mutates_args))(fn)
        op.register_fake(fake)
        if backward is not None:
            op.register_autograd(backward, setup_context=setup_context)
        return op

    return register


__all__ = ["custom_op", "NAMESPACE"]
