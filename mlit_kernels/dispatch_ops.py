"""The dispatch variant's custom ops (many experts), and :func:`moe_dispatch`, its entry in
:data:`mlit_kernels.variants.IMPLEMENTATIONS`: a gate kernel, tokens grouped by expert (histogram,
prefix sum, scatter) and grouped GEMMs (:mod:`mlit_kernels.gate`, :mod:`mlit_kernels.dispatch`,
:mod:`mlit_kernels.swiglu`), with the balancing loss and dropout in torch.

* ``mlit::gate_fwd(x, w_gate, w_noise, noise?, seed, k, training, noisy, noise_eps)
  -> (topk_gate (N, k) fp32, importance (t,), load (t,), topk_idx (N, k) int32)``, ``mlit::gate_bwd``;
* ``mlit::experts_fwd(x, topk_idx, topk_gate, w1, b1, v, b_v, w2, b2, save)
  -> (y, a, u, sorted_pairs, expert_offsets)`` (with ``save`` the tensors backward needs, as
  outputs of static shape; else empty), ``mlit::experts_bwd``.

Each op has a fake (meta) implementation and the forward ops their autograd (no double backward).
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import reference
from .common.options import MoEOptions
from .common.seed import philox_seed
from .common.tiling import interpreting
from .dispatch import Routing
from .gate import gate_backward, gate_forward
from .swiglu import experts_backward, experts_forward

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


def moe_dispatch(x: Tensor, params: tuple, seed, noise: Optional[Tensor], options: MoEOptions) -> tuple[Tensor, Tensor]:
    """(y, aux_loss) of the dispatch variant; the arguments as :func:`mlit_kernels.functional.moe_triton`
    prepares them (x and params contiguous, noise fp32 or None, seed as given)."""
    w_gate, w_noise, *experts = params
    seed = philox_seed(seed, options.noisy and noise is None, x.device)
    gate, importance, load, idx = gate_fwd(x, w_gate, w_noise, noise, seed, options.k, options.training,
                                           options.noisy, float(options.noise_eps))
    aux = options.w_importance * reference.coefficient_of_variation(importance, options.squared_cv,
                                                                    options.unbiased_cv) + (
        options.w_load * reference.coefficient_of_variation(load, options.squared_cv, options.unbiased_cv))
    # Triton 3.9's interpreter computes tl.dot on bfloat16 operands wrongly: there, run the
    # grouped kernels on fp32 copies of the bf16-rounded values.
    dtype = options.dtype
    work = torch.float32 if dtype == torch.bfloat16 and interpreting() else dtype
    experts = [p.to(dtype).to(work) for p in (x, *experts)]
    save = torch.is_grad_enabled() and any(p.requires_grad for p in (x, gate, *params[2:]))
    y = experts_fwd(experts[0], idx, gate, *experts[1:], save)[0].to(x.dtype)
    return F.dropout(y, options.dropout, options.training), aux


__all__ = ["gate_fwd", "gate_bwd", "experts_fwd", "experts_bwd", "moe_dispatch"]
