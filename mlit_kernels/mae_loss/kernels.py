"""Triton kernels of the MAE pre-training loss (Eq. 16, :mod:`mlit_kernels.mae_loss`): the forward
in two launches (``_mae_loss_part_kernel``: one program per TILE block of the B · patches rows
writes the block's partial sums; ``_mae_loss_sum_kernel``: one program adds them in block order,
so the sums' order depends on the shape only) and the backward in one (``_mae_loss_bwd_kernel``:
one program per TILE block of rows; program 0 also d moe_loss = β · g), instead of the patchify
copy and about thirty element-wise kernels and reductions.

    e[b, p, j] = pred[b, p, j] − patch(b, p)[j]        patch p of image b, values j = (py, px, c)
    mse[b, p] = mean_j e²;   masked = Σ mse · mask / Σ mask;   unmasked = Σ mse (1 − mask) / Σ (1 − mask)
    loss = masked + α · unmasked + β · moe_loss
    dpred = g (2 / D) e (mask / Σ mask + α (1 − mask) / Σ (1 − mask))

The target is read from the images in place; pred is read through its strides (the decoder's
``[:, :-1]`` slice without a copy) in its own dtype. No atomics, no host reads: bitwise
reproducible and capturable.
"""

from __future__ import annotations

import triton
import triton.language as tl

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
