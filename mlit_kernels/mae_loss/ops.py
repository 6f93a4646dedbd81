"""The MAE loss as ``torch.library`` custom ops over :mod:`.kernels`, and its checked entry.

* ``mlit::mae_loss(pred, images, mask, moe_loss, patch_size, alpha, beta) -> (loss (), metrics (4,), counts (2,))``
* ``mlit::mae_loss_backward(grad, pred, images, mask, counts, patch_size, alpha, beta) -> (dpred, d moe_loss)``
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from ..common.custom_op import custom_op
from .kernels import SUM_BLOCK, TILE, _mae_loss_bwd_kernel, _mae_loss_part_kernel, _mae_loss_sum_kernel


def _blocks(pred: Tensor, tile: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_D): rows a tile of ``tile`` values holds, the patch's values padded."""
    block_d = triton.next_power_of_2(pred.shape[2])
    return max(1, tile // block_d), block_d


def _check(images: Tensor, pred: Tensor, mask: Tensor, moe_loss: Tensor, patch_size: int) -> None:
    if images.dim() != 4 or not images.is_floating_point() or any(n % patch_size for n in images.shape[2:]):
        raise ValueError(f"images must be a floating-point (B, C, H, W) tensor of {patch_size}×{patch_size} patches, "
                         f"got {images.dtype} {tuple(images.shape)}")
    b, c, h, w = images.shape
    expected = (b, (h // patch_size) * (w // patch_size), c * patch_size * patch_size)
    if tuple(pred.shape) != expected or not pred.is_floating_point():
        raise ValueError(f"pred must be a floating-point tensor of shape {expected}, got {pred.dtype} "
                         f"{tuple(pred.shape)}")
    if tuple(mask.shape) != expected[:2] or not mask.is_floating_point():
        raise ValueError(f"mask must be a floating-point tensor of shape {expected[:2]}, got {mask.dtype} "
                         f"{tuple(mask.shape)}")
    if moe_loss.dim() != 0 or not moe_loss.is_floating_point():
        raise ValueError(f"moe_loss must be a 0-d floating-point tensor, got {moe_loss.dtype} {tuple(moe_loss.shape)}")
    if expected[2] > TILE:
        raise ValueError(f"pred: at most {TILE} values a patch (one register tile a row), got {expected[2]}")


def _launch_args(pred: Tensor, images: Tensor) -> tuple:
    """n_rows, H, W and pred's three strides."""
    return (pred.shape[0] * pred.shape[1], images.shape[2], images.shape[3], *pred.stride())


def _mae_loss_backward_op_fake(grad, pred, images, mask, counts, patch_size, alpha, beta):
    return pred.new_empty(pred.shape), pred.new_empty((), dtype=torch.float32)


@custom_op("mae_loss_backward", fake=_mae_loss_backward_op_fake)
def _mae_loss_backward_op(grad: Tensor, pred: Tensor, images: Tensor, mask: Tensor, counts: Tensor, patch_size: int,
                          alpha: float, beta: float) -> tuple[Tensor, Tensor]:
    """(dpred contiguous in pred's shape and dtype, d moe_loss () fp32)."""
    dpred = pred.new_empty(pred.shape)
    dmoe = pred.new_empty((), dtype=torch.float32)
    block_r, block_d = _blocks(pred, TILE)
    n_rows = pred.shape[0] * pred.shape[1]
    _mae_loss_bwd_kernel[(max(1, triton.cdiv(n_rows, block_r)),)](
        grad, pred, images, mask, counts, dpred, dmoe, *_launch_args(pred, images), float(alpha),
        float(beta), C=images.shape[1], P=patch_size, BLOCK_R=block_r, BLOCK_D=block_d)
    return dpred, dmoe


def _mae_loss_op_fake(pred, images, mask, moe_loss, patch_size, alpha, beta):
    return (pred.new_empty((), dtype=torch.float32), pred.new_empty((4,), dtype=torch.float32),
            pred.new_empty((2,), dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    pred, images, mask, moe_loss, patch_size, alpha, beta = inputs
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the metrics and counts
    ctx.save_for_backward(pred, images, mask, output[2])
    ctx.patch_size, ctx.alpha, ctx.beta, ctx.moe_dtype = patch_size, alpha, beta, moe_loss.dtype


def _backward(ctx, grad, _grad_metrics, _grad_counts):
    pred, images, mask, counts = ctx.saved_tensors
    dpred, dmoe = _mae_loss_backward_op(grad, pred, images, mask, counts, ctx.patch_size, ctx.alpha, ctx.beta)
    return dpred, None, None, dmoe.to(ctx.moe_dtype), None, None, None


@custom_op("mae_loss", fake=_mae_loss_op_fake, backward=_backward, setup_context=_setup_context)
def _mae_loss_op(pred: Tensor, images: Tensor, mask: Tensor, moe_loss: Tensor, patch_size: int, alpha: float,
                 beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """(loss (), metrics (4,) = loss, masked, unmasked, moe_loss, counts (2,) = Σ mask, Σ (1 − mask)), fp32."""
    loss = pred.new_empty((), dtype=torch.float32)
    metrics = pred.new_empty((4,), dtype=torch.float32)
    counts = pred.new_empty((2,), dtype=torch.float32)
    block_r, block_d = _blocks(pred, TILE)
    parts = max(1, triton.cdiv(pred.shape[0] * pred.shape[1], block_r))
    part = pred.new_empty((parts, 4), dtype=torch.float32)
    _mae_loss_part_kernel[(parts,)](pred, images, mask, part, *_launch_args(pred, images), C=images.shape[1],
                                    P=patch_size, BLOCK_R=block_r, BLOCK_D=block_d)
    _mae_loss_sum_kernel[(1,)](part, moe_loss, loss, metrics, counts, parts, float(alpha), float(beta),
                               BLOCK=SUM_BLOCK)
    return loss, metrics, counts


def fused_mae_loss(images: Tensor, pred: Tensor, mask: Tensor, moe_loss: Tensor, patch_size: int, alpha: float,
                   beta: float) -> tuple[Tensor, Tensor]:
    """Eq. 16 in two Triton launches (and one for the backward): (loss () fp32, metrics (4,) fp32 =
    loss, masked_mse, unmasked_mse, moe_loss). images (B, C, H, W), pred (B, patches, C·p·p) any
    strides, mask (B, patches) 1 where hidden, moe_loss ()."""
    if not torch.compiler.is_compiling():
        _check(images, pred, mask, moe_loss, patch_size)
    loss, metrics, _ = _mae_loss_op(pred, images.contiguous(), mask.contiguous(), moe_loss, int(patch_size),
                                    float(alpha), float(beta))
    return loss, metrics


__all__ = ["fused_mae_loss"]
