"""Autocast's weight casts batched: many fp32 weights cast to the autocast dtype in one launch,
and their gradients cast back in one launch.

Under fp16 autocast every ``F.linear`` casts its fp32 weight and bias (one kernel each) and its
backward casts their gradients back (one more each): 8 launches per attention block. Casting the
weights of a whole stack up front with one ``_foreach_copy_`` (CUDA's multi-tensor copy converts
the dtype in the same launch) and handing the copies to the layers leaves the math unchanged —
the same roundings of the same values, the gradients cast back the same way — in 2 launches.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class _CastAll(torch.autograd.Function):
    """forward(dtype, *weights) → the weights in ``dtype`` (one launch); backward: the gradients
    cast back to the weights' dtype (one launch; a weight without a gradient gets None)."""

    @staticmethod
    def forward(ctx, dtype: torch.dtype, *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.set_materialize_grads(False)
        ctx.source_dtype = weights[0].dtype
        copies = [torch.empty_like(w, dtype=dtype) for w in weights]
        torch._foreach_copy_(copies, list(weights))
        return tuple(copies)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None):
        present = [g for g in grads if g is not None]
        cast = [torch.empty_like(g, dtype=ctx.source_dtype) for g in present]
        if present:
            torch._foreach_copy_(cast, present)
        out, it = [], iter(cast)
        for g in grads:
            out.append(None if g is None else next(it))
        return (None, *out)


def autocast_weights(weights: Sequence[torch.Tensor], device_type: str) -> list[torch.Tensor] | None:
    """``weights`` in the autocast dtype of ``device_type``, cast in one launch (their gradients
    cast back in one), for layers that would each cast them; None when autocast is off there or
    the weights are not all fp32 (the layers then use their own weights, autocast casting them)."""
    if not weights or not torch.is_autocast_enabled(device_type):
        return None
    if any(w.dtype != torch.float32 for w in weights):
        return None
    return list(_CastAll.apply(torch.get_autocast_dtype(device_type), *weights))


__all__ = ["autocast_weights"]
