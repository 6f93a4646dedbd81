"""What a family's check does with its kernels and its reference: run both on the same values,
forward and backward, and hold every output and gradient to a per-row limit (Triton-free)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .precision import max_row_error


def forward_backward(fn: Callable, args: Sequence, grad_wrt: Sequence[int], grad_out: torch.Tensor,
                     **kwargs) -> list[torch.Tensor]:
    """[y, dy/d args[i] for i in grad_wrt]: y = fn(*args, **kwargs) with those arguments made
    fresh leaves, backpropagating ``grad_out`` (cast to y's device and dtype)."""
    args = list(args)
    leaves = []
    for i in grad_wrt:
        args[i] = args[i].detach().clone().requires_grad_()
        leaves.append(args[i])
    y = fn(*args, **kwargs)
    return [y] + list(torch.autograd.grad(y, leaves, grad_out.to(y.device, y.dtype)))


def row_errors(names: Sequence[str], got: Sequence[torch.Tensor], want: Sequence[torch.Tensor],
               limit: float) -> dict[str, tuple[float, float]]:
    """{name: (worst per-row relative error of got against want, limit)}."""
    return {name: (max_row_error(a, w), limit) for name, a, w in zip(names, got, want)}


__all__ = ["forward_backward", "row_errors"]
