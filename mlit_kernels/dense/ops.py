"""The dense variant as ``torch.library`` custom ops, and :func:`moe_dense`, its entry in
:data:`mlit_kernels.variants.IMPLEMENTATIONS`.

* ``mlit::fused_moe(x, w_gate, w_noise, w1, b1, v, b_v, w2, b2, seed, noise?, k, training, noisy,
  dropout, noise_eps, w_importance, w_load, squared_cv, unbiased_cv, dtype, need_aux)
  -> (y (N, m) x's dtype, aux_loss () fp32, topk_idx (N, k) int32, stats (2, t) fp32, keep (N, m) uint8)``
  (aux_loss and stats unset in evaluation without need_aux: the aux kernel is skipped)
  (stats = importance and load; keep = the dropout mask, (0,) without dropout); the scalars after
  ``noise`` are the fields of :class:`~mlit_kernels.common.options.MoEOptions`, in order.
* ``mlit::fused_moe_backward(dy, d_aux, <forward inputs and saved outputs>, <options>) -> (dx, flat_grads)``,
  flat_grads holding [dW_g, dW_noise, dW_1, db_1, dV, db_V, dW_2, db_2] in the parameters' dtype.
* ``mlit::fused_norm_moe(x, ln_weight, ln_bias, ln_eps, residual, w_gate, ..., <options>)``: the
  layer on LayerNorm(x), the norm folded into the kernels (no launch of its own), and with
  ``residual`` x added to the output in the kernel's store (the pre-norm block x + MoE(LN(x)));
  outputs as ``fused_moe`` plus ln_stats (2, N) fp32 (the norm's mean and rstd per token);
  ``mlit::fused_norm_moe_backward`` its gradients, flat_grads ending with the norm's dweight, dbias.

Each op has a fake (meta) implementation and the forward its autograd (no double backward), so
``torch.compile`` traces through them without graph breaks and CUDA graphs capture them.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..common.custom_op import custom_op
from ..common.options import MoEOptions
from ..common.seed import philox_seed
from .launch import fused_backward, fused_forward, split_grads


def _fused_moe_fake(x, w_gate, w_noise, w1, b1, v, b_v, w2, b2, seed, noise, *flat_options):
    options = MoEOptions(*flat_options)
    n, m = x.shape
    t = w_gate.shape[1]
    keep_shape = (n, m) if options.training and options.dropout > 0 else (0,)
    return (torch.empty_like(x), x.new_empty((), dtype=torch.float32),
            x.new_empty((n, options.k), dtype=torch.int32), x.new_empty((2, t), dtype=torch.float32),
            x.new_empty(keep_shape, dtype=torch.uint8))


def _fused_setup_context(ctx, inputs, output):
    x, w_gate, w_noise, w1, b1, v, b_v, w2, b2, seed, noise, *flat_options = inputs
    _, _, idx, stats, keep = output
    ctx.mark_non_differentiable(idx, stats, keep)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the outputs nobody differentiates
    ctx.save_for_backward(x, w_gate, w_noise, w1, b1, v, b_v, w2, seed, noise, idx, stats, keep)
    ctx.options = MoEOptions(*flat_options)


def _fused_backward(ctx, dy, d_aux, _d_idx, _d_stats, _d_keep):
    x, w_gate, w_noise, w1, b1, v, b_v, w2, seed, noise, idx, stats, keep = ctx.saved_tensors
    options: MoEOptions = ctx.options
    if dy is None:
        dy = torch.zeros_like(x)
    if d_aux is None:
        d_aux = x.new_zeros((), dtype=torch.float32)
    dx, flat = fused_moe_backward(dy, d_aux.float(), x, w_gate, w_noise, w1, b1, v, b_v, w2, seed, noise, idx, stats,
                                  keep, *options)
    t, m, d_h = w1.shape
    grads = split_grads(flat, m, d_h, t)
    if not (options.training and options.noisy):
        grads[1] = None  # W_noise is not used without noise
    return (dx, *grads, None, None, *([None] * len(options)))


@custom_op("fused_moe", fake=_fused_moe_fake, backward=_fused_backward, setup_context=_fused_setup_context)
def fused_moe(x: Tensor, w_gate: Tensor, w_noise: Tensor, w1: Tensor, b1: Tensor, v: Tensor, b_v: Tensor, w2: Tensor,
              b2: Tensor, seed: Tensor, noise: Optional[Tensor], k: int, training: bool, noisy: bool, dropout: float,
              noise_eps: float, w_importance: float, w_load: float, squared_cv: bool, unbiased_cv: bool,
              dtype: torch.dtype, need_aux: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The whole layer, forward (see :func:`mlit_kernels.dense.launch.fused_forward`)."""
    options = MoEOptions(k, training, noisy, dropout, noise_eps, w_importance, w_load, squared_cv, unbiased_cv, dtype,
                         need_aux)
    return fused_forward(x, w_gate, w_noise, w1, b1, v, b_v, w2, b2, seed, noise, options)[:5]


def _fused_moe_backward_fake(dy, d_aux, x, w_gate, w_noise, w1, b1, v, b_v, w2, seed, noise, topk_idx, stats, keep,
                             *flat_options):
    numel = sum(p.numel() for p in (w_gate, w_noise, w1, b1, v, b_v, w2)) + w2.shape[1]
    return torch.empty_like(x), w1.new_empty((numel,))


@custom_op("fused_moe_backward", fake=_fused_moe_backward_fake)
def fused_moe_backward(dy: Tensor, d_aux: Tensor, x: Tensor, w_gate: Tensor, w_noise: Tensor, w1: Tensor, b1: Tensor,
                       v: Tensor, b_v: Tensor, w2: Tensor, seed: Tensor, noise: Optional[Tensor], topk_idx: Tensor,
                       stats: Tensor, keep: Tensor, k: int, training: bool, noisy: bool, dropout: float,
                       noise_eps: float, w_importance: float, w_load: float, squared_cv: bool, unbiased_cv: bool,
                       dtype: torch.dtype, need_aux: bool) -> Tuple[Tensor, Tensor]:
    """(dx, flat parameter gradients) of :func:`fused_moe` (see :func:`mlit_kernels.dense.launch.fused_backward`)."""
    options = MoEOptions(k, training, noisy, dropout, noise_eps, w_importance, w_load, squared_cv, unbiased_cv, dtype,
                         need_aux)
    return fused_backward(dy.contiguous(), d_aux, x, w_gate, w_noise, w1, b1, v, b_v, w2, seed, noise, topk_idx, stats,
                          keep, options)


def _fused_norm_moe_fake(x, ln_weight, ln_bias, ln_eps, residual, w_gate, w_noise, w1, b1, v, b_v, w2, b2, seed, noise,
                         *flat_options):
    outs = _fused_moe_fake(x, w_gate, w_noise, w1, b1, v, b_v, w2, b2, seed, noise, *flat_options)
    return (*outs, x.new_empty((2, x.shape[0]), dtype=torch.float32))


def _fused_norm_setup_context(ctx, inputs, output):
    x, ln_weight, ln_bias, ln_eps, residual, w_gate, w_noise, w1, b1, v, b_v, w2, _, seed, noise, *flat_options = inputs
    _, _, idx, stats, keep, ln_stats = output
    ctx.mark_non_differentiable(idx, stats, keep, ln_stats)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, ln_weight, ln_bias, w_gate, w_noise, w1, b1, v, b_v, w2, seed, noise, idx, stats, keep,
                          ln_stats)
    ctx.ln_eps, ctx.residual = ln_eps, residual
    ctx.options = MoEOptions(*flat_options)


def _fused_norm_backward(ctx, dy, d_aux, _d_idx, _d_stats, _d_keep, _d_ln_stats):
    x, ln_weight, ln_bias, w_gate, w_noise, w1, b1, v, b_v, w2, seed, noise, idx, stats, keep, ln_stats = \
        ctx.saved_tensors
    options: MoEOptions = ctx.options
    if dy is None:
        dy = torch.zeros_like(x)
    if d_aux is None:
        d_aux = x.new_zeros((), dtype=torch.float32)
    dx, flat = fused_norm_moe_backward(dy, d_aux.float(), x, ln_weight, ln_bias, ctx.ln_eps, ctx.residual, w_gate,
                                       w_noise, w1, b1, v, b_v, w2, seed, noise, idx, stats, keep, ln_stats, *options)
    t, m, d_h = w1.shape
    grads = split_grads(flat, m, d_h, t, norm=True)
    if not (options.training and options.noisy):
        grads[1] = None  # W_noise is not used without noise
    d_ln_weight, d_ln_bias = (g.to(ln_weight.dtype) for g in grads[8:])
    return (dx, d_ln_weight, d_ln_bias, None, None, *grads[:8], None, None, *([None] * len(options)))


@custom_op("fused_norm_moe", fake=_fused_norm_moe_fake, backward=_fused_norm_backward,
           setup_context=_fused_norm_setup_context)
def fused_norm_moe(x: Tensor, ln_weight: Tensor, ln_bias: Tensor, ln_eps: float, residual: bool, w_gate: Tensor,
                   w_noise: Tensor, w1: Tensor, b1: Tensor, v: Tensor, b_v: Tensor, w2: Tensor, b2: Tensor,
                   seed: Tensor, noise: Optional[Tensor], k: int, training: bool, noisy: bool, dropout: float,
                   noise_eps: float, w_importance: float, w_load: float, squared_cv: bool, unbiased_cv: bool,
                   dtype: torch.dtype, need_aux: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The whole layer on LayerNorm(x) (+ x with ``residual``), forward (see
    :func:`mlit_kernels.dense.launch.fused_forward`)."""
    options = MoEOptions(k, training, noisy, dropout, noise_eps, w_importance, w_load, squared_cv, unbiased_cv, dtype,
                         need_aux)
    return fused_forward(x, w_gate, w_noise, w1, b1, v, b_v, w2, b2, seed, noise, options,
                         norm=(ln_weight, ln_bias, ln_eps), residual=residual)


def _fused_norm_moe_backward_fake(dy, d_aux, x, ln_weight, ln_bias, ln_eps, residual, w_gate, w_noise, w1, b1, v,
                                  b_v, w2, seed, noise, topk_idx, stats, keep, ln_stats, *flat_options):
    dx, flat = _fused_moe_backward_fake(dy, d_aux, x, w_gate, w_noise, w1, b1, v, b_v, w2, seed, noise, topk_idx,
                                        stats, keep)
    return dx, w1.new_empty((flat.numel() + 2 * x.shape[1],))


@custom_op("fused_norm_moe_backward", fake=_fused_norm_moe_backward_fake)
def fused_norm_moe_backward(dy: Tensor, d_aux: Tensor, x: Tensor, ln_weight: Tensor, ln_bias: Tensor, ln_eps: float,
                            residual: bool, w_gate: Tensor, w_noise: Tensor, w1: Tensor, b1: Tensor, v: Tensor,
                            b_v: Tensor, w2: Tensor, seed: Tensor, noise: Optional[Tensor], topk_idx: Tensor,
                            stats: Tensor, keep: Tensor, ln_stats: Tensor, k: int, training: bool, noisy: bool,
                            dropout: float, noise_eps: float, w_importance: float, w_load: float, squared_cv: bool,
                            unbiased_cv: bool, dtype: torch.dtype, need_aux: bool) -> Tuple[Tensor, Tensor]:
    """(dx, flat parameter gradients, the norm's last) of :func:`fused_norm_moe`."""
    options = MoEOptions(k, training, noisy, dropout, noise_eps, w_importance, w_load, squared_cv, unbiased_cv, dtype,
                         need_aux)
    return fused_backward(dy.contiguous(), d_aux, x, w_gate, w_noise, w1, b1, v, b_v, w2, seed, noise, topk_idx, stats,
                          keep, options, norm=(ln_weight, ln_bias, ln_eps), ln_stats=ln_stats, residual=residual)


def moe_dense(x: Tensor, params: tuple, seed, noise: Optional[Tensor], options: MoEOptions,
              norm: Optional[tuple] = None, residual: bool = False) -> tuple[Tensor, Tensor]:
    """(y, aux_loss) of the dense variant; the arguments as :func:`mlit_kernels.functional.moe_triton`
    prepares them (x and params contiguous, noise fp32 or None, seed as given); ``norm`` None or
    (weight (m,), bias (m,), eps) of a LayerNorm folded in before the layer; ``residual`` (with
    ``norm``): y = x + the layer's output."""
    seed = philox_seed(seed, (options.noisy and noise is None) or options.dropout > 0, x.device)
    if norm is None:
        y, aux, _, _, _ = fused_moe(x, *params, seed, noise, *options)
    else:
        y, aux, _, _, _, _ = fused_norm_moe(x, *norm, residual, *params, seed, noise, *options)
    return y, aux


__all__ = ["fused_moe", "fused_moe_backward", "fused_norm_moe", "fused_norm_moe_backward", "moe_dense"]
