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

Dispatch path (many experts, :mod:`mlit_kernels.gate`, :mod:`mlit_kernels.dispatch`,
:mod:`mlit_kernels.swiglu`):

* ``mlit::gate_fwd(x, w_gate, w_noise, noise?, seed, k, training, noisy, noise_eps)
  -> (topk_gate (N, k) fp32, importance (t,), load (t,), topk_idx (N, k) int32)``, ``mlit::gate_bwd``;
* ``mlit::experts_fwd(x, topk_idx, topk_gate, w1, b1, v, b_v, w2, b2, save)
  -> (y, a, u, sorted_pairs, expert_offsets)`` (with ``save`` the tensors backward needs, as
  outputs of static shape; else empty), ``mlit::experts_bwd``.

Limitation: no double backward (the backward ops have no autograd).
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from .dispatch import Routing
from .fused import fused_backward, fused_forward, split_grads
from .gate import gate_backward, gate_forward
from .swiglu import experts_backward, experts_forward

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


# --------------------------------------------------------------------------------- dispatch: gate


@torch.library.custom_op("mlit::gate_fwd", mutates_args=())
def gate_fwd(x: Tensor, w_gate: Tensor, w_noise: Tensor, noise: Optional[Tensor], seed: Tensor, k: int,
             training: bool, noisy: bool, noise_eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fused noisy top-k gate (see :func:`mlit_kernels.gate.gate_forward`)."""
    noise = None if noise is None else noise.contiguous()
    idx, gate, importance, load = gate_forward(x.contiguous(), w_gate.contiguous(), w_noise.contiguous(), k, training,
                                               noisy, noise, seed, noise_eps)
    return gate, importance, load, idx


@gate_fwd.register_fake
def _gate_fwd_fake(x, w_gate, w_noise, noise, seed, k, training, noisy, noise_eps):
    n, t = x.shape[0], w_gate.shape[1]
    return (x.new_empty((n, k), dtype=torch.float32), x.new_empty((t,), dtype=torch.float32),
            x.new_empty((t,), dtype=torch.float32), x.new_empty((n, k), dtype=torch.int32))


@torch.library.custom_op("mlit::gate_bwd", mutates_args=())
def gate_bwd(x: Tensor, w_gate: Tensor, w_noise: Tensor, noise: Optional[Tensor], seed: Tensor, topk_idx: Tensor,
             k: int, training: bool, noisy: bool, noise_eps: float, d_gate: Tensor, d_importance: Tensor,
             d_load: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`gate_fwd` w.r.t. x (in x's dtype), w_gate and w_noise."""
    noise = None if noise is None else noise.contiguous()
    dx, dwg, dwn = gate_backward(x.contiguous(), w_gate.contiguous(), w_noise.contiguous(), k, training, noisy, noise,
                                 seed, noise_eps, topk_idx, d_gate, d_importance, d_load)
    return dx.to(x.dtype), dwg.to(w_gate.dtype), dwn.to(w_noise.dtype)


@gate_bwd.register_fake
def _gate_bwd_fake(x, w_gate, w_noise, noise, seed, topk_idx, k, training, noisy, noise_eps, d_gate, d_importance,
                   d_load):
    return torch.empty_like(x), torch.empty_like(w_gate), torch.empty_like(w_noise)


def _gate_setup_context(ctx, inputs, output):
    x, w_gate, w_noise, noise, seed, k, training, noisy, noise_eps = inputs
    ctx.save_for_backward(x, w_gate, w_noise, noise, seed, output[3])
    ctx.mark_non_differentiable(output[3])
    ctx.set_materialize_grads(False)
    ctx.options = (k, training, noisy, noise_eps)


def _gate_backward(ctx, d_gate, d_importance, d_load, _d_idx):
    x, w_gate, w_noise, noise, seed, idx = ctx.saved_tensors
    k, training, noisy, _ = ctx.options
    n, t = x.shape[0], w_gate.shape[1]
    d_gate = x.new_zeros((n, k), dtype=torch.float32) if d_gate is None else d_gate
    d_importance = x.new_zeros((t,), dtype=torch.float32) if d_importance is None else d_importance
    if d_load is None or not (training and noisy and k < t):  # the load is then the routing counts
        d_load = x.new_zeros((t,), dtype=torch.float32)
    dx, dwg, dwn = gate_bwd(x, w_gate, w_noise, noise, seed, idx, *ctx.options, d_gate.float().contiguous(),
                            d_importance.float().contiguous(), d_load.float().contiguous())
    return dx, dwg, (dwn if training and noisy else None), None, None, None, None, None, None


gate_fwd.register_autograd(_gate_backward, setup_context=_gate_setup_context)


# ------------------------------------------------------------------------------ dispatch: experts


@torch.library.custom_op("mlit::experts_fwd", mutates_args=())
def experts_fwd(x: Tensor, topk_idx: Tensor, topk_gate: Tensor, w1: Tensor, b1: Tensor, v: Tensor, b_v: Tensor,
                w2: Tensor, b2: Tensor, save: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """y of the shared-V/W2 SwiGLU experts, plus (a, u, sorted_pairs, expert_offsets) when ``save``."""
    x, topk_idx, topk_gate = x.contiguous(), topk_idx.contiguous(), topk_gate.contiguous()
    w1, b1, v, b_v, w2, b2 = (p.contiguous() for p in (w1, b1, v, b_v, w2, b2))
    d = w1.shape[2]
    y, (a, u, routing) = experts_forward(x, topk_idx, topk_gate, w1, b1, v, b_v, w2, b2, save)
    if not save:
        empty = x.new_empty((0,), dtype=torch.int32)
        return y, x.new_empty((0, d)), x.new_empty((0, d)), empty, empty.clone()
    return y, a, u, routing.sorted_pairs, routing.expert_offsets


@experts_fwd.register_fake
def _experts_fwd_fake(x, topk_idx, topk_gate, w1, b1, v, b_v, w2, b2, save):
    n, m = x.shape
    t, _, d = w1.shape
    k = topk_idx.shape[1]
    y = x.new_empty((n, m))
    if not save:
        empty = x.new_empty((0,), dtype=torch.int32)
        return y, x.new_empty((0, d)), x.new_empty((0, d)), empty, empty.clone()
    return (y, x.new_empty((n * k, d)), x.new_empty((n, d)), x.new_empty((n * k,), dtype=torch.int32),
            x.new_empty((t + 1,), dtype=torch.int32))


@torch.library.custom_op("mlit::experts_bwd", mutates_args=())
def experts_bwd(dy: Tensor, x: Tensor, topk_idx: Tensor, topk_gate: Tensor, w1: Tensor, v: Tensor, w2: Tensor,
                a: Tensor, u: Tensor, sorted_pairs: Tensor, expert_offsets: Tensor
                ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, d_topk_gate fp32, dw1, db1, dv, db_v, dw2, db2) of :func:`experts_fwd`."""
    routing = Routing(sorted_pairs.contiguous(), None, expert_offsets.contiguous(), None)
    c = lambda z: z.contiguous()  # noqa: E731
    return experts_backward(dy, c(x), c(topk_idx), c(topk_gate), c(w1), c(v), c(w2), c(a), c(u), routing)


@experts_bwd.register_fake
def _experts_bwd_fake(dy, x, topk_idx, topk_gate, w1, v, w2, a, u, sorted_pairs, expert_offsets):
    n, k = topk_idx.shape
    t, _, d = w1.shape
    m = x.shape[1]
    return (x.new_empty((n, m)), x.new_empty((n, k), dtype=torch.float32), torch.empty_like(w1),
            w1.new_empty((t, d)), torch.empty_like(v), x.new_empty((d,)), torch.empty_like(w2), x.new_empty((m,)))


def _experts_setup_context(ctx, inputs, output):
    x, topk_idx, topk_gate, w1, b1, v, b_v, w2, b2, save = inputs
    _, a, u, sorted_pairs, expert_offsets = output
    ctx.mark_non_differentiable(a, u, sorted_pairs, expert_offsets)
    ctx.set_materialize_grads(False)
    ctx.save = save
    if save:
        ctx.save_for_backward(x, topk_idx, topk_gate, w1, v, w2, a, u, sorted_pairs, expert_offsets)


def _experts_backward(ctx, dy, _da, _du, _dsorted, _doffsets):
    if not ctx.save:
        raise RuntimeError("mlit::experts_fwd was called with save=False; call it with save=True to differentiate")
    x, topk_idx, topk_gate, w1, v, w2, a, u, sorted_pairs, expert_offsets = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(x)
    dx, dgate, dw1, db1, dv, db_v, dw2, db2 = experts_bwd(dy, x, topk_idx, topk_gate, w1, v, w2, a, u,
                                                          sorted_pairs, expert_offsets)
    return dx, None, dgate, dw1, db1, dv, db_v, dw2, db2, None


experts_fwd.register_autograd(_experts_backward, setup_context=_experts_setup_context)


__all__ = ["fused_moe", "fused_moe_backward", "gate_fwd", "gate_bwd", "experts_fwd", "experts_bwd"]
