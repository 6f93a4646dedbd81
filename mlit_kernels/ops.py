"""The Triton kernels as ``torch.library`` custom ops: the only callers of the kernels.

Each op has a fake (meta) implementation with exact output shapes and dtypes and, for the forward
ops, autograd registered with :func:`torch.library.register_autograd`, so ``torch.compile``
traces a model through them without graph breaks and CUDA graphs capture them (no host reads:
the Philox seed is a device tensor the kernels load).

Fused path (few experts, :mod:`mlit_kernels.fused`):

* ``mlit::fused_moe(x, w_gate, w_noise, w1, b1, v, b_v, w2, b2, seed, noise?, k, training, noisy,
  dropout, noise_eps, w_importance, w_load, squared_cv, unbiased_cv, dtype)
  -> (y (N, m) x's dtype, aux_loss () fp32, topk_idx (N, k) int32, stats (2, t) fp32, keep (N, m) uint8)``
  (stats = importance and load; keep = the dropout mask, (0,) without dropout)
* ``mlit::fused_moe_backward(dy, d_aux, <forward inputs and saved outputs>) -> (dx, flat_grads)``,
  flat_grads holding [dW_g, dW_noise, dW_1, db_1, dV, db_V, dW_2, db_2] in the parameters' dtype.

Dispatch path (many experts, :mod:`mlit_kernels.dispatch`; registered in
:mod:`mlit_kernels.dispatch.ops`, re-exported here): ``mlit::dispatch_moe`` and
``mlit::dispatch_moe_backward``.

Limitation: no double backward (the backward ops have no autograd).
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from .dispatch.ops import dispatch_moe, dispatch_moe_backward
from .fused import fused_backward, fused_forward, split_grads

# ----------------------------------------------------------------------------------------- fused


@torch.library.custom_op("mlit::fused_moe", mutates_args=())
def fused_moe(x: Tensor, w_gate: Tensor, w_noise: Tensor, w1: Tensor, b1: Tensor, v: Tensor, b_v: Tensor, w2: Tensor,
              b2: Tensor, seed: Tensor, noise: Optional[Tensor], k: int, training: bool, noisy: bool, dropout: float,
              noise_eps: float, w_importance: float, w_load: float, squared_cv: bool, unbiased_cv: bool,
              dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The whole layer, forward (see :func:`mlit_kernels.fused.fused_forward`)."""
    return fused_forward(x, w_gate, w_noise, w1, b1, v, b_v, w2, b2, seed, noise, k, training, noisy, dropout,
                         noise_eps, w_importance, w_load, squared_cv, unbiased_cv, dtype)


@fused_moe.register_fake
def _fused_moe_fake(x, w_gate, w_noise, w1, b1, v, b_v, w2, b2, seed, noise, k, training, noisy, dropout, noise_eps,
                    w_importance, w_load, squared_cv, unbiased_cv, dtype):
    n, m = x.shape
    t = w_gate.shape[1]
    keep_shape = (n, m) if training and dropout > 0 else (0,)
    return (torch.empty_like(x), x.new_empty((), dtype=torch.float32),
            x.new_empty((n, k), dtype=torch.int32), x.new_empty((2, t), dtype=torch.float32),
            x.new_empty(keep_shape, dtype=torch.uint8))


@torch.library.custom_op("mlit::fused_moe_backward", mutates_args=())
def fused_moe_backward(dy: Tensor, d_aux: Tensor, x: Tensor, w_gate: Tensor, w_noise: Tensor, w1: Tensor, b1: Tensor,
                       v: Tensor, b_v: Tensor, w2: Tensor, seed: Tensor, noise: Optional[Tensor], topk_idx: Tensor,
                       stats: Tensor, keep: Tensor, k: int, training: bool, noisy: bool, dropout: float,
                       noise_eps: float, w_importance: float, w_load: float, squared_cv: bool, unbiased_cv: bool,
                       dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """(dx, flat parameter gradients) of :func:`fused_moe` (see :func:`mlit_kernels.fused.fused_backward`)."""
    return fused_backward(dy.contiguous(), d_aux, x, w_gate, w_noise, w1, b1, v, b_v, w2, seed, noise, topk_idx, stats,
                          keep, k, training, noisy, dropout, noise_eps, w_importance, w_load, squared_cv, unbiased_cv,
                          dtype)


@fused_moe_backward.register_fake
def _fused_moe_backward_fake(dy, d_aux, x, w_gate, w_noise, w1, b1, v, b_v, w2, seed, noise, topk_idx, stats, keep,
                             k, training, noisy, dropout, noise_eps, w_importance, w_load, squared_cv, unbiased_cv,
                             dtype):
    numel = sum(p.numel() for p in (w_gate, w_noise, w1, b1, v, b_v, w2)) + w2.shape[1]
    return torch.empty_like(x), w1.new_empty((numel,))


def _fused_setup_context(ctx, inputs, output):
    (x, w_gate, w_noise, w1, b1, v, b_v, w2, b2, seed, noise, k, training, noisy, dropout, noise_eps, w_importance,
     w_load, squared_cv, unbiased_cv, dtype) = inputs
    _, _, idx, stats, keep = output
    ctx.mark_non_differentiable(idx, stats, keep)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the outputs nobody differentiates
    ctx.save_for_backward(x, w_gate, w_noise, w1, b1, v, b_v, w2, seed, noise, idx, stats, keep)
    ctx.options = (k, training, noisy, dropout, noise_eps, w_importance, w_load, squared_cv, unbiased_cv, dtype)


def _fused_backward(ctx, dy, d_aux, _d_idx, _d_stats, _d_keep):
    x, w_gate, w_noise, w1, b1, v, b_v, w2, seed, noise, idx, stats, keep = ctx.saved_tensors
    _, training, noisy, *_ = ctx.options
    if dy is None:
        dy = torch.zeros_like(x)
    if d_aux is None:
        d_aux = x.new_zeros((), dtype=torch.float32)
    dx, flat = fused_moe_backward(dy, d_aux.float(), x, w_gate, w_noise, w1, b1, v, b_v, w2, seed, noise, idx, stats,
                                  keep, *ctx.options)
    t, m, d_h = w1.shape
    grads = split_grads(flat, m, d_h, t)
    if not (training and noisy):
        grads[1] = None  # W_noise is not used without noise
    return (dx, *grads, None, None, None, None, None, None, None, None, None, None, None, None)


fused_moe.register_autograd(_fused_backward, setup_context=_fused_setup_context)


__all__ = ["fused_moe", "fused_moe_backward", "dispatch_moe", "dispatch_moe_backward"]
