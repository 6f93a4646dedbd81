"""Triton kernels of the MAE pre-training loss (:meth:`mlit.models.mae.MMLiT.loss`, Eq. 16): the
custom ops ``mlit::mae_loss`` (two launches: one program per TILE block of the B · patches rows
writes the block's partial sums, then one program adds them in block order, so the sums' order
depends on the shape only) and ``mlit::mae_loss_backward`` (one program per TILE block of rows;
program 0 also d moe_loss = β · g), instead of the patchify copy and about thirty element-wise
kernels and reductions.

    e[b, p, j] = pred[b, p, j] − patch(b, p)[j]        patch p of image b, values j = (py, px, c)
    mse[b, p] = mean_j e²;   masked = Σ mse · mask / Σ mask;   unmasked = Σ mse (1 − mask) / Σ (1 − mask)
    loss = masked + α · unmasked + β · moe_loss
    dpred = g (2 / D) e (mask / Σ mask + α (1 − mask) / Σ (1 − mask))

The target is read from the images in place; pred is read through its strides (the decoder's
``[:, :-1]`` slice without a copy) in its own dtype. No atomics, no host reads: bitwise
reproducible and capturable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

TILE = 2048  # values (rows × padded patch values) a program takes
SUM_BLOCK = 1024  # partial sums the final program adds a step


@triton.jit
def _patch_rows(pred_ptr, img_ptr, mask_ptr, r0, n_rows, H, W, stride_b, stride_p, stride_d, C: tl.constexpr,
                P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows [r0, r0 + BLOCK_R) of the flattened (B · patches): e = pred − target (BLOCK_R, BLOCK_D)
    fp32 (0 off the rows and the C·P·P values), the mask (0 past the rows), the rows, their mask,
    the value indices and the tile mask."""
    per_row = W // P
    n_patches = (H // P) * per_row
    rows = r0 + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    b = (rows // n_patches).to(tl.int64)
    p = rows % n_patches
    j = tl.arange(0, BLOCK_D)
    ok = row_ok[:, None] & (j < C * P * P)[None, :]
    x = tl.load(pred_ptr + (b * stride_b + p * stride_p)[:, None] + j[None, :] * stride_d, mask=ok,
                other=0.0).to(tl.float32)
    corner = (b * C * H + (p // per_row) * P) * W + (p % per_row) * P  # the patch's top-left pixel, channel 0
    inner = ((j % C) * H + j // (C * P)) * W + (j // C) % P  # value j = (py, px, c) of the patch
    t = tl.load(img_ptr + corner[:, None] + inner[None, :], mask=ok, other=0.0).to(tl.float32)
    m = tl.load(mask_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    return x - t, m, rows, row_ok, j, ok


@triton.jit
def _mae_loss_part_kernel(pred_ptr, img_ptr, mask_ptr, part_ptr, n_rows, H, W, stride_b, stride_p, stride_d,
                          C: tl.constexpr, P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program i: part[i] = (Σ mse · mask, Σ mse (1 − mask), Σ mask, Σ (1 − mask)) over rows
    [i·BLOCK_R, (i+1)·BLOCK_R)."""
    pid = tl.program_id(0)
    e, m, _, row_ok, _, _ = _patch_rows(pred_ptr, img_ptr, mask_ptr, pid * BLOCK_R, n_rows, H, W, stride_b, stride_p,
                                        stride_d, C, P, BLOCK_R, BLOCK_D)
    mse = tl.sum(e * e, axis=1) / (C * P * P)
    tl.store(part_ptr + pid * 4, tl.sum(mse * m, axis=0))
    tl.store(part_ptr + pid * 4 + 1, tl.sum(mse * (1.0 - m), axis=0))
    tl.store(part_ptr + pid * 4 + 2, tl.sum(m, axis=0))
    tl.store(part_ptr + pid * 4 + 3, tl.sum(tl.where(row_ok, 1.0 - m, 0.0), axis=0))


@triton.jit
def _mae_loss_sum_kernel(part_ptr, moe_ptr, loss_ptr, metrics_ptr, counts_ptr, parts, alpha, beta,
                         BLOCK: tl.constexpr):
    """One program: the parts (parts, 4) added in order → loss (), metrics (loss, masked, unmasked,
    moe) and counts (Σ mask, Σ (1 − mask))."""
    acc = tl.zeros((BLOCK, 4), dtype=tl.float32)
    cols = tl.arange(0, 4)
    for i0 in range(0, parts, BLOCK):
        rows = i0 + tl.arange(0, BLOCK)
        acc += tl.load(part_ptr + rows[:, None] * 4 + cols[None, :], mask=(rows < parts)[:, None], other=0.0)
    total = tl.sum(acc, axis=0)
    hidden = tl.sum(tl.where(cols == 0, total, 0.0), axis=0)
    visible = tl.sum(tl.where(cols == 1, total, 0.0), axis=0)
    count_hidden = tl.sum(tl.where(cols == 2, total, 0.0), axis=0)
    count_visible = tl.sum(tl.where(cols == 3, total, 0.0), axis=0)
    masked = hidden / count_hidden
    unmasked = visible / count_visible
    moe = tl.load(moe_ptr).to(tl.float32)
    loss = masked + alpha * unmasked + beta * moe
    tl.store(loss_ptr, loss)
    tl.store(metrics_ptr, loss)
    tl.store(metrics_ptr + 1, masked)
    tl.store(metrics_ptr + 2, unmasked)
    tl.store(metrics_ptr + 3, moe)
    tl.store(counts_ptr, count_hidden)
    tl.store(counts_ptr + 1, count_visible)


@triton.jit
def _mae_loss_bwd_kernel(grad_ptr, pred_ptr, img_ptr, mask_ptr, counts_ptr, dpred_ptr, dmoe_ptr, n_rows, H, W,
                         stride_b, stride_p, stride_d, alpha, beta, C: tl.constexpr, P: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program i: dpred of rows [i·BLOCK_R, (i+1)·BLOCK_R) (contiguous, pred's dtype); program 0
    also d moe_loss = beta · g."""
    pid = tl.program_id(0)
    g = tl.load(grad_ptr).to(tl.float32)
    e, m, rows, _, j, ok = _patch_rows(pred_ptr, img_ptr, mask_ptr, pid * BLOCK_R, n_rows, H, W, stride_b, stride_p,
                                       stride_d, C, P, BLOCK_R, BLOCK_D)
    weight = m / tl.load(counts_ptr) + alpha * (1.0 - m) / tl.load(counts_ptr + 1)
    de = (g * 2.0 / (C * P * P)) * weight[:, None] * e
    tl.store(dpred_ptr + rows[:, None].to(tl.int64) * (C * P * P) + j[None, :], de.to(dpred_ptr.dtype.element_ty),
             mask=ok)
    if pid == 0:
        tl.store(dmoe_ptr, beta * g)


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


@torch.library.custom_op("mlit::mae_loss", mutates_args=())
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


@_mae_loss_op.register_fake
def _mae_loss_op_fake(pred, images, mask, moe_loss, patch_size, alpha, beta):
    return (pred.new_empty((), dtype=torch.float32), pred.new_empty((4,), dtype=torch.float32),
            pred.new_empty((2,), dtype=torch.float32))


@torch.library.custom_op("mlit::mae_loss_backward", mutates_args=())
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


@_mae_loss_backward_op.register_fake
def _mae_loss_backward_op_fake(grad, pred, images, mask, counts, patch_size, alpha, beta):
    return pred.new_empty(pred.shape), pred.new_empty((), dtype=torch.float32)


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


_mae_loss_op.register_autograd(_backward, setup_context=_setup_context)


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


__all__ = ["fused_mae_loss", "TILE"]
