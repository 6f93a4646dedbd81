"""The many-expert path's kernels as ``torch.library`` custom ops, with fake implementations and
autograd, so ``torch.compile`` traces through them and CUDA graphs capture them:

* ``mlit::dispatch_moe(x, w_gate, w_noise, w1, b1, v, b_v, w2, b2, seed, noise?, k, training, noisy,
  dropout, noise_eps, w_importance, w_load, squared_cv, unbiased_cv, dtype)
  -> (y, aux, idx, gates, route, local, o, stats, keep)`` (see :func:`~.launch.dispatch_forward`);
* ``mlit::dispatch_moe_backward(dy, d_aux, <inputs and saved outputs>)
  -> (dx, dW_g, dW_noise, dW1, db1, dV, db_V, dW2, db2)``.

No double backward (the backward op has no autograd).
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..common.custom_op import custom_op
from .kernels import ROUTE_BLOCK_N
from .launch import dispatch_backward, dispatch_forward, route_tiles


def _dispatch_moe_fake(x, w_gate, w_noise, w1, b1, v, b_v, w2, b2, seed, noise, k, training, noisy, dropout,
                       noise_eps, w_importance, w_load, squared_cv, unbiased_cv, dtype):
    n, m = x.shape
    t = w_gate.shape[1]
    rows = route_tiles(n) if isinstance(n, int) else (n + ROUTE_BLOCK_N - 1) // ROUTE_BLOCK_N + 1
    keep_shape = (n, m) if training and dropout > 0 else (0,)
    return (torch.empty_like(x), x.new_empty((), dtype=torch.float32), x.new_empty((n, k), dtype=torch.int32),
            x.new_empty((n, k), dtype=torch.float32), x.new_empty((rows, 2, t), dtype=torch.int32),
            x.new_empty((rows * ROUTE_BLOCK_N * k,), dtype=torch.int32), x.new_empty((n * k, m), dtype=dtype),
            x.new_empty((2, t), dtype=torch.float32), x.new_empty(keep_shape, dtype=torch.uint8))


def _setup_context(ctx, inputs, output):
    (x, w_gate, w_noise, w1, b1, v, b_v, w2, b2, seed, noise, k, training, noisy, dropout, noise_eps, w_importance,
     w_load, squared_cv, unbiased_cv, dtype) = inputs
    saved = output[2:]
    ctx.mark_non_differentiable(*saved)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, w_gate, w_noise, w1, b1, v, b_v, w2, b2, seed, noise, *saved)
    ctx.options = (k, training, noisy, dropout, noise_eps, w_importance, w_load, squared_cv, unbiased_cv, dtype)


def _backward(ctx, dy, d_aux, *_saved_grads):
    x, *rest = ctx.saved_tensors
    _, training, noisy, *_ = ctx.options
    dy = torch.zeros_like(x) if dy is None else dy
    d_aux = x.new_zeros((), dtype=torch.float32) if d_aux is None else d_aux.float()
    grads = list(dispatch_moe_backward(dy, d_aux, x, *rest, *ctx.options))
    if not (training and noisy):
        grads[2] = None  # W_noise is not used without noise
    return (*grads, None, None, None, None, None, None, None, None, None, None, None, None)


@custom_op("dispatch_moe", fake=_dispatch_moe_fake, backward=_backward, setup_context=_setup_context)
def dispatch_moe(x: Tensor, w_gate: Tensor, w_noise: Tensor, w1: Tensor, b1: Tensor, v: Tensor, b_v: Tensor,
                 w2: Tensor, b2: Tensor, seed: Tensor, noise: Optional[Tensor], k: int, training: bool, noisy: bool,
                 dropout: float, noise_eps: float, w_importance: float, w_load: float, squared_cv: bool,
                 unbiased_cv: bool, dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                                                  Tensor, Tensor]:
    """The layer's forward (see :func:`mlit_kernels.dispatch.launch.dispatch_forward`)."""
    return dispatch_forward(x, w_gate, w_noise, w1, b1, v, b_v, w2, b2, seed, noise, k, training, noisy, dropout,
                            noise_eps, w_importance, w_load, squared_cv, unbiased_cv, dtype)


def _dispatch_moe_backward_fake(dy, d_aux, x, w_gate, w_noise, w1, b1, v, b_v, w2, b2, *rest):
    return tuple(torch.empty_like(p) for p in (x, w_gate, w_noise, w1, b1, v, b_v, w2, b2))


@custom_op("dispatch_moe_backward", fake=_dispatch_moe_backward_fake)
def dispatch_moe_backward(dy: Tensor, d_aux: Tensor, x: Tensor, w_gate: Tensor, w_noise: Tensor, w1: Tensor,
                          b1: Tensor, v: Tensor, b_v: Tensor, w2: Tensor, b2: Tensor, seed: Tensor,
                          noise: Optional[Tensor], idx: Tensor, gates: Tensor, route: Tensor, local: Tensor, o: Tensor,
                          stats: Tensor, keep: Tensor, k: int, training: bool, noisy: bool, dropout: float,
                          noise_eps: float, w_importance: float, w_load: float, squared_cv: bool, unbiased_cv: bool,
                          dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                                       Tensor]:
    """(dx, dW_g, dW_noise, dW1, db1, dV, db_V, dW2, db2) of :func:`dispatch_moe`."""
    return dispatch_backward(dy.contiguous(), d_aux, x, w_gate, w_noise, w1, b1, v, b_v, w2, b2, seed, noise, idx,
                             gates, route, local, o, stats, keep, k, training, noisy, dropout, noise_eps, w_importance,
                             w_load, squared_cv, unbiased_cv, dtype)
