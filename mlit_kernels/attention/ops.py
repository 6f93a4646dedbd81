"""The fused attention block as ``torch.library`` custom ops, and :func:`attention_block`, its
checked entry point.

* ``mlit::attention_block(x, ln_w, ln_b, qkv_w, qkv_b, proj_w, proj_b, num_heads, num_groups, eps, dtype)
  -> (y (B, n, D) x's dtype, qkv (N, E) dtype, o (N, D) dtype, lse (N, H) fp32, mean (N,) fp32, rstd (N,) fp32)``
* ``mlit::attention_block_backward(dy, x, ln_w, ln_b, qkv_w, proj_w, qkv, o, lse, mean, rstd, num_heads,
  num_groups, dtype) -> (dx, flat_grads)``, flat_grads holding [dW_qkv, db_qkv, dγ, dβ, dW_proj, db_proj]
  in the weights' dtype.

Each op has a fake implementation and the forward its autograd (no double backward), so
``torch.compile`` traces through them and CUDA graphs capture them.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from ..common.custom_op import custom_op
from ..common.precision import COMPUTE_DTYPES
from .launch import MAX_DIM, MAX_HEAD_DIM, Shape, block_backward, block_forward, split_grads


def _fused_attention_block_fake(x, ln_w, ln_b, qkv_w, qkv_b, proj_w, proj_b, num_heads, num_groups, eps, dtype):
    B, n, D = x.shape
    N, E = B * n, qkv_w.shape[0]
    f32 = torch.float32
    return (torch.empty_like(x), x.new_empty((N, E), dtype=dtype), x.new_empty((N, D), dtype=dtype),
            x.new_empty((N, num_heads), dtype=f32), x.new_empty((N,), dtype=f32), x.new_empty((N,), dtype=f32))


def _setup_context(ctx, inputs, output):
    x, ln_w, ln_b, qkv_w, qkv_b, proj_w, proj_b, num_heads, num_groups, eps, dtype = inputs
    _, qkv, o, lse, mean, rstd = output
    ctx.mark_non_differentiable(qkv, o, lse, mean, rstd)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, ln_w, ln_b, qkv_w, proj_w, qkv, o, lse, mean, rstd)
    ctx.options = (num_heads, num_groups, dtype)


def _backward(ctx, dy, *_unused):
    x, ln_w, ln_b, qkv_w, proj_w, qkv, o, lse, mean, rstd = ctx.saved_tensors
    num_heads, num_groups, dtype = ctx.options
    if dy is None:
        return (None,) * 11
    dx, flat = fused_attention_block_backward(dy, x, ln_w, ln_b, qkv_w, proj_w, qkv, o, lse, mean, rstd, num_heads,
                                              num_groups, dtype)
    B, n, D = x.shape
    d_qkv_w, d_qkv_b, d_ln_w, d_ln_b, d_proj_w, d_proj_b = split_grads(flat, Shape(B, n, D, num_heads, num_groups))
    return dx, d_ln_w, d_ln_b, d_qkv_w, d_qkv_b, d_proj_w, d_proj_b, None, None, None, None


@custom_op("attention_block", fake=_fused_attention_block_fake, backward=_backward, setup_context=_setup_context)
def fused_attention_block(x: Tensor, ln_w: Tensor, ln_b: Tensor, qkv_w: Tensor, qkv_b: Tensor, proj_w: Tensor,
                          proj_b: Tensor, num_heads: int, num_groups: int, eps: float, dtype: torch.dtype
                          ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The block's forward (see :func:`mlit_kernels.attention.launch.block_forward`)."""
    return block_forward(x, ln_w, ln_b, qkv_w, qkv_b, proj_w, proj_b, num_heads, num_groups, eps, dtype)


def _fused_attention_block_backward_fake(dy, x, ln_w, ln_b, qkv_w, proj_w, qkv, o, lse, mean, rstd, num_heads,
                                         num_groups, dtype):
    D = x.shape[-1]
    E = qkv_w.shape[0]
    return torch.empty_like(x), qkv_w.new_empty((E * D + E + 2 * D + D * D + D,))


@custom_op("attention_block_backward", fake=_fused_attention_block_backward_fake)
def fused_attention_block_backward(dy: Tensor, x: Tensor, ln_w: Tensor, ln_b: Tensor, qkv_w: Tensor, proj_w: Tensor,
                                   qkv: Tensor, o: Tensor, lse: Tensor, mean: Tensor, rstd: Tensor, num_heads: int,
                                   num_groups: int, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """(dx, flat weight gradients) of ``mlit::attention_block`` (see :func:`~.launch.block_backward`)."""
    return block_backward(dy.contiguous(), x, ln_w, ln_b, qkv_w, proj_w, qkv, o, lse, mean, rstd, num_heads,
                          num_groups, dtype)


def supports(dim: int, num_heads: int, num_groups: int, dtype: torch.dtype) -> bool:
    """Whether the kernels take this width, head count and compute dtype."""
    return (dim <= MAX_DIM and num_heads > 0 and dim % num_heads == 0 and dim // num_heads <= MAX_HEAD_DIM
            and num_groups > 0 and num_heads % num_groups == 0 and dtype in COMPUTE_DTYPES)


def attention_block(x: Tensor, ln_w: Tensor, ln_b: Tensor, qkv_w: Tensor, qkv_b: Tensor, proj_w: Tensor,
                    proj_b: Tensor, num_heads: int, num_groups: int, eps: float = 1e-5,
                    dtype: torch.dtype | None = None) -> Tensor:
    """``x + proj(GQA(LayerNorm(x)))`` by the fused kernels, differentiable in x and every weight.

    x (B, n, D) fp16 / bf16 / fp32; ln_w, ln_b (D,) the LayerNorm's γ, β; qkv_w (E, D), qkv_b (E,)
    the fused q | k | v projection, E = D + 2·G·D/H; proj_w (D, D), proj_b (D,); the weights share
    one float dtype (any; cast in registers). ``dtype``: the compute dtype of the products (fp32
    accumulation); default the autocast dtype of x's device when autocast is on, else x's dtype.
    Returns y (B, n, D) in x's dtype. Raises ValueError naming the argument a bad input is in."""
    if dtype is None:
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    if x.dim() != 3 or x.dtype not in COMPUTE_DTYPES:
        raise ValueError(f"x must be (B, n, D) in fp16, bf16 or fp32, got {tuple(x.shape)} {x.dtype}")
    D = x.shape[-1]
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"dtype must be fp16, bf16 or fp32, got {dtype}")
    if num_heads < 1 or D % num_heads:
        raise ValueError(f"num_heads must divide the width {D}, got {num_heads}")
    if num_groups < 1 or num_heads % num_groups:
        raise ValueError(f"num_groups must divide num_heads = {num_heads}, got {num_groups}")
    if D > MAX_DIM or D // num_heads > MAX_HEAD_DIM:
        raise ValueError(f"x: width {D} / head dim {D // num_heads} above the kernels' {MAX_DIM} / {MAX_HEAD_DIM}")
    E = D + 2 * num_groups * (D // num_heads)
    expected = dict(ln_w=(D,), ln_b=(D,), qkv_w=(E, D), qkv_b=(E,), proj_w=(D, D), proj_b=(D,))
    weights = dict(ln_w=ln_w, ln_b=ln_b, qkv_w=qkv_w, qkv_b=qkv_b, proj_w=proj_w, proj_b=proj_b)
    for name, w in weights.items():
        if tuple(w.shape) != expected[name]:
            raise ValueError(f"{name} must have shape {expected[name]}, got {tuple(w.shape)}")
        if w.device != x.device:
            raise ValueError(f"{name} is on {w.device}, x on {x.device}")
        if w.dtype != qkv_w.dtype or not w.dtype.is_floating_point:
            raise ValueError(f"{name} is {w.dtype}; every weight must share one float dtype ({qkv_w.dtype})")
    return fused_attention_block(x.contiguous(), *(w.contiguous() for w in weights.values()), num_heads, num_groups,
                                 float(eps), dtype)[0]


__all__ = ["attention_block", "fused_attention_block", "fused_attention_block_backward", "supports"]
