"""``Linear(LayerNorm(x))`` as ``torch.library`` custom ops over the attention block's LayerNorm +
projection kernels, and :func:`norm_linear`, the checked entry: one launch forward and two backward.

* ``mlit::norm_linear(x, ln_w, ln_b, w, b?, eps, dtype) -> (y (M, E) dtype, mean, rstd (M,) fp32)``:
  the attention block's LayerNorm + projection kernel (:func:`mlit_kernels.attention.kernels._ln_qkv_fwd_kernel`)
  on x (M, D), whose rows may lie any stride apart (the dummy tokens of a (B, n, D) batch are
  ``x[:, -1]``: no copy).
* ``mlit::norm_linear_backward(dy, x, ln_w, ln_b, w, mean, rstd, dtype) -> (dx (M, D), flat_grads)``:
  its LayerNorm + projection backward kernel without the residual (per-token dx; the partial
  dW, db, dγ, dβ of few long programs), then the ordered split sum — flat_grads holding dW (E, D),
  db (E,), dγ, dβ (D,) in w's dtype.

Tiles follow the shape alone (the attention block's BLOCK_M, BLOCK_E and splits) and the warps are
fixed, so no tuned choice is involved. No host reads: capturable.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
from torch import Tensor

from ..attention.kernels import _ln_qkv_bwd_kernel, _ln_qkv_fwd_kernel
from ..attention.launch import BLOCK_E, BLOCK_M, CONFIGS, MAX_DIM, SPLIT_KERNEL_STAGES, weight_splits
from ..common.custom_op import custom_op
from ..common.precision import COMPUTE_DTYPES, dot_precision
from ..common.split_sum import split_sum

NUM_WARPS = CONFIGS[0].num_warps  # the attention block's default (8): the warps are not tuned here


def _norm_linear_backward_fake(dy, x, ln_w, ln_b, w, mean, rstd, dtype):
    d, e = x.shape[1], w.shape[0]
    return torch.empty_like(x, memory_format=torch.contiguous_format), w.new_empty((e * d + e + 2 * d,))


@custom_op("norm_linear_backward", fake=_norm_linear_backward_fake)
def _norm_linear_backward_op(dy: Tensor, x: Tensor, ln_w: Tensor, ln_b: Tensor, w: Tensor, mean: Tensor, rstd: Tensor,
                             dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    m, d = x.shape
    e = w.shape[0]
    dx = torch.empty(m, d, device=x.device, dtype=x.dtype)
    numel = e * d + e + 2 * d
    grads = torch.empty(numel, device=x.device, dtype=w.dtype)
    if not m:
        return dx, grads.zero_()
    splits, rows_per_split = weight_splits(m)
    part = torch.empty(splits, numel, device=x.device, dtype=torch.float32)
    _ln_qkv_bwd_kernel[(splits + triton.cdiv(m, BLOCK_M),)](
        x, x, ln_w, ln_b, w, mean, rstd, dy, dx, part, m, d, e, splits, rows_per_split, numel, x.stride(0),
        D_PAD=max(16, triton.next_power_of_2(d)), BLOCK_M=BLOCK_M, BLOCK_E=BLOCK_E, **dot_precision(dtype),
        HAS_RESIDUAL=False, num_warps=NUM_WARPS, num_stages=SPLIT_KERNEL_STAGES)
    split_sum(part, grads)
    return dx, grads


def _norm_linear_fake(x, ln_w, ln_b, w, b, eps, dtype):
    m = x.shape[0]
    return (x.new_empty((m, w.shape[0]), dtype=dtype), x.new_empty((m,), dtype=torch.float32),
            x.new_empty((m,), dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    x, ln_w, ln_b, w, b, eps, dtype = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for mean, rstd
    ctx.save_for_backward(x, ln_w, ln_b, w, mean, rstd)
    ctx.dtype, ctx.has_bias = dtype, b is not None


def _backward(ctx, dy, _d_mean, _d_rstd):
    x, ln_w, ln_b, w, mean, rstd = ctx.saved_tensors
    dx, flat = _norm_linear_backward_op(dy.to(ctx.dtype).contiguous(), x, ln_w, ln_b, w, mean, rstd, ctx.dtype)
    e, d = w.shape
    dw, db, dgamma, dbeta = flat.split([e * d, e, d, d])
    return (dx, dgamma.to(ln_w.dtype), dbeta.to(ln_b.dtype), dw.view(e, d), db if ctx.has_bias else None, None, None)


@custom_op("norm_linear", fake=_norm_linear_fake, backward=_backward, setup_context=_setup_context)
def _norm_linear_op(x: Tensor, ln_w: Tensor, ln_b: Tensor, w: Tensor, b: Optional[Tensor], eps: float,
                    dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor]:
    m, d = x.shape
    e = w.shape[0]
    y = torch.empty(m, e, device=x.device, dtype=dtype)
    mean = torch.empty(m, device=x.device, dtype=torch.float32)
    rstd = torch.empty(m, device=x.device, dtype=torch.float32)
    if m:
        _ln_qkv_fwd_kernel[(triton.cdiv(m, BLOCK_M),)](
            x, ln_w, ln_b, w, w if b is None else b, y, mean, rstd, m, d, e, float(eps), x.stride(0),
            D_PAD=max(16, triton.next_power_of_2(d)), BLOCK_M=BLOCK_M, BLOCK_E=BLOCK_E, **dot_precision(dtype),
            HAS_BIAS=b is not None, num_warps=NUM_WARPS)
    return y, mean, rstd


def supports(dim: int, dtype: torch.dtype) -> bool:
    """Whether the kernels take this width and compute dtype."""
    return 0 < dim <= MAX_DIM and dtype in COMPUTE_DTYPES


def norm_linear(x: Tensor, ln_w: Tensor, ln_b: Tensor, w: Tensor, b: Tensor | None = None, eps: float = 1e-5,
                dtype: torch.dtype | None = None) -> Tensor:
    """``F.linear(F.layer_norm(x, (D,), ln_w, ln_b, eps), w, b)`` by the Triton kernels,
    differentiable in x and every weight.

    x (..., D) fp16 / bf16 / fp32 whose last dimension is contiguous (rows of any stride, e.g.
    ``tokens[:, -1]``); ln_w, ln_b (D,); w (E, D), b (E,) or None, sharing one float dtype (cast
    in registers). ``dtype``: the compute dtype of the product and of y (fp32 accumulation);
    default the autocast dtype of x's device when autocast is on, else x's dtype. Returns y
    (..., E). Raises ValueError naming the argument a bad input is in."""
    if dtype is None:
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    if x.dim() < 1 or x.dtype not in COMPUTE_DTYPES:
        raise ValueError(f"x must be (..., D) in fp16, bf16 or fp32, got {tuple(x.shape)} {x.dtype}")
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"dtype must be fp16, bf16 or fp32, got {dtype}")
    d = x.shape[-1]
    if not 0 < d <= MAX_DIM:
        raise ValueError(f"x: width {d} outside the kernels' 1..{MAX_DIM}")
    if w.dim() != 2 or w.shape[1] != d:
        raise ValueError(f"w must have shape (E, {d}), got {tuple(w.shape)}")
    e = w.shape[0]
    weights = dict(ln_w=(ln_w, (d,)), ln_b=(ln_b, (d,)), w=(w, (e, d)), **({} if b is None else dict(b=(b, (e,)))))
    for name, (t, shape) in weights.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")
        if t.dtype != w.dtype or not t.dtype.is_floating_point:
            raise ValueError(f"{name} is {t.dtype}; every weight must share one float dtype ({w.dtype})")
    lead = x.shape[:-1]
    rows = x.reshape(-1, d) if x.dim() != 2 else x  # a view where the layout allows (x[:, -1] stays one)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    y, _, _ = _norm_linear_op(rows, ln_w.contiguous(), ln_b.contiguous(), w.contiguous(),
                              None if b is None else b.contiguous(), float(eps), dtype)
    return y.view(*lead, e)


__all__ = ["norm_linear", "supports"]
