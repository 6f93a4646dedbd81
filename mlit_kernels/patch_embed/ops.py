"""The patch embedding as ``torch.library`` custom ops over :mod:`.kernels`, and its checked entry.

* ``mlit::patch_embed(images, weight, pos, patch_size) -> tokens (B, patches + 1, m)``
* ``mlit::patch_embed_backward(grad, images, weight, pos, patch_size) -> (dweight, dpos)``

:func:`fused_patch_embed` checks its arguments and calls the forward op (autograd registered; no
double backward). No host reads: capturable.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from ..common.custom_op import custom_op
from ..common.split_sum import split_sum
from .kernels import BLOCK_B, BLOCK_T, K_PAD, _embed_bwd_kernel, _embed_fwd_kernel

MAX_FEATURES = 256  # output features a forward program's register tile holds (one row)


def _tokens(images: Tensor, patch_size: int) -> int:
    return (images.shape[2] // patch_size) * (images.shape[3] // patch_size) + 1


def _patch_embed_backward_fake(grad, images, weight, pos, patch_size):
    return torch.empty_like(weight), torch.empty_like(pos)


@custom_op("patch_embed_backward", fake=_patch_embed_backward_fake)
def patch_embed_backward(grad: Tensor, images: Tensor, weight: Tensor, pos: Tensor,
                         patch_size: int) -> tuple[Tensor, Tensor]:
    """(dweight in weight's dtype, dpos in pos's dtype) of :func:`patch_embed`."""
    b, c, h, w = images.shape
    m, k = weight.shape
    n_tok = _tokens(images, patch_size)
    dweight = torch.empty_like(weight)
    dpos_acc = torch.empty(n_tok, m, device=grad.device, dtype=torch.float32)
    part = torch.empty(n_tok, m * k, device=grad.device, dtype=torch.float32)
    _embed_bwd_kernel[(n_tok,)](grad, images, dpos_acc, part, b, c, h, w, m, P=patch_size, BLOCK_B=BLOCK_B,
                                BLOCK_M=triton.next_power_of_2(m), K_PAD=K_PAD)
    split_sum(part, dweight)
    return dweight, dpos_acc.to(pos.dtype)


def _patch_embed_fake(images, weight, pos, patch_size):
    return images.new_empty((images.shape[0], _tokens(images, patch_size), weight.shape[0]),
                            dtype=torch.promote_types(weight.dtype, pos.dtype))


def _setup_context(ctx, inputs, output):
    images, weight, pos, patch_size = inputs
    ctx.save_for_backward(images, weight, pos)
    ctx.patch_size = patch_size


def _backward(ctx, grad):
    images, weight, pos = ctx.saved_tensors
    dweight, dpos = patch_embed_backward(grad.contiguous(), images, weight, pos, ctx.patch_size)
    return None, dweight, dpos, None


@custom_op("patch_embed", fake=_patch_embed_fake, backward=_backward, setup_context=_setup_context)
def patch_embed(images: Tensor, weight: Tensor, pos: Tensor, patch_size: int) -> Tensor:
    """tokens (B, patches + 1, m) = the patches (and the dummy) times weightᵀ + pos; images
    (B, C, H, W), weight (m, C·p·p), pos (patches + 1, m)."""
    b, c, h, w = images.shape
    m = weight.shape[0]
    n_tok = _tokens(images, patch_size)
    out = images.new_empty((b, n_tok, m), dtype=torch.promote_types(weight.dtype, pos.dtype))
    if out.numel():
        _embed_fwd_kernel[(triton.cdiv(b * n_tok, BLOCK_T),)](images, weight, pos, out, b, h, w, m, C=c, P=patch_size,
                                                              BLOCK_T=BLOCK_T, BLOCK_M=triton.next_power_of_2(m))
    return out


def fused_patch_embed(images: Tensor, weight: Tensor, pos: Tensor, patch_size: int) -> Tensor:
    """:func:`patch_embed` on contiguous inputs; pos (1, patches + 1, m) or (patches + 1, m)."""
    if images.dim() != 4 or weight.shape[1] != images.shape[1] * patch_size * patch_size:
        raise ValueError(f"images (B, C, H, W) with weight (m, C·{patch_size}²) expected, got images "
                         f"{tuple(images.shape)}, weight {tuple(weight.shape)}")
    if weight.shape[0] > MAX_FEATURES:
        raise ValueError(f"weight: at most {MAX_FEATURES} output features (one register tile a row), "
                         f"got {weight.shape[0]}")
    return patch_embed(images.contiguous(), weight.contiguous(), pos.reshape(pos.shape[-2:]).contiguous(),
                       patch_size)


__all__ = ["fused_patch_embed", "patch_embed", "patch_embed_backward", "MAX_FEATURES"]
