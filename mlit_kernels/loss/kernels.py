"""Triton kernels of the classification loss (:mod:`mlit_kernels.loss`):

* ``_loss_fwd_kernel`` — one program walks the rows in fixed BLOCK_B blocks (the sums' order
  depends on the shape only; the logits read in their own dtype): loss () and the metrics vector
  [loss, ce, aux, correct];
* ``_loss_bwd_kernel`` — one program per row block: dlogits = g (softmax(z) − (1 − s) onehot − s / C) / B
  in the logits' dtype; program 0 also d aux = w_aux · g;
* ``_eval_sums_kernel`` — evaluation: the batch's row count, summed cross-entropy and correct count
  added to a float64 sums vector.

No host reads: capturable.
"""

from __future__ import annotations

import triton
import triton.language as tl

BLOCK_B = 32  # rows a program step handles (forward: one program walks them all; backward: one program a block)


@triton.jit
def _row_block(logits_ptr, labels_ptr, r0, B, C, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """Rows [r0, r0 + BLOCK_B) of the logits (fp32, -inf off the C columns, 0 on rows past B),
    their labels, the row and column masks, lse and the first argmax of each row."""
    rows = r0 + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < B
    col_ok = cols < C
    mask = row_ok[:, None] & col_ok[None, :]
    z = tl.load(logits_ptr + rows[:, None].to(tl.int64) * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    z = tl.where(col_ok[None, :], z, float("-inf"))  # rows past B stay finite (zeros): no NaN to mask later
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=0).to(tl.int32)
    top = tl.max(z, axis=1)
    lse = top + tl.log(tl.sum(tl.where(col_ok[None, :], tl.exp(z - top[:, None]), 0.0), axis=1))
    first = tl.min(tl.where((z == top[:, None]) & col_ok[None, :], cols[None, :], BLOCK_C), axis=1)
    return z, labels, rows, row_ok, cols, col_ok, lse, first


@triton.jit
def _row_sums(logits_ptr, labels_ptr, B, C, smoothing, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """(Σ smoothed cross-entropy, correct count) fp32 over the B rows, BLOCK_B at a time."""
    ce = tl.zeros((BLOCK_B,), dtype=tl.float32)
    correct = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for r0 in range(0, B, BLOCK_B):
        z, labels, rows, row_ok, cols, col_ok, lse, first = _row_block(logits_ptr, labels_ptr, r0, B, C, BLOCK_B,
                                                                       BLOCK_C)
        z_label = tl.sum(tl.where(cols[None, :] == labels[:, None], z, 0.0), axis=1)
        z_mean = tl.sum(tl.where(col_ok[None, :], z, 0.0), axis=1) / C
        ce += tl.where(row_ok, lse - (1.0 - smoothing) * z_label - smoothing * z_mean, 0.0)
        correct += tl.where(row_ok & (first == labels), 1.0, 0.0)
    return tl.sum(ce, axis=0), tl.sum(correct, axis=0)


@triton.jit
def _loss_fwd_kernel(logits_ptr, labels_ptr, aux_ptr, loss_ptr, metrics_ptr, B, C, smoothing, aux_weight,
                     BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """One program: loss () and metrics (loss, ce, aux, correct) over the B rows."""
    ce, correct = _row_sums(logits_ptr, labels_ptr, B, C, smoothing, BLOCK_B, BLOCK_C)
    ce_mean = ce / B
    aux = tl.load(aux_ptr).to(tl.float32)
    loss = ce_mean + aux_weight * aux
    tl.store(loss_ptr, loss)
    tl.store(metrics_ptr, loss)
    tl.store(metrics_ptr + 1, ce_mean)
    tl.store(metrics_ptr + 2, aux)
    tl.store(metrics_ptr + 3, correct)


@triton.jit
def _eval_sums_kernel(logits_ptr, labels_ptr, sums_ptr, B, C, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """One program: sums (3,) float64 += (B, Σ cross-entropy, correct count) over the B rows."""
    ce, correct = _row_sums(logits_ptr, labels_ptr, B, C, 0.0, BLOCK_B, BLOCK_C)
    tl.atomic_add(sums_ptr, B + 0.0)  # (a float even where B = 1 is specialised to a constant)
    tl.atomic_add(sums_ptr + 1, ce.to(tl.float64))
    tl.atomic_add(sums_ptr + 2, correct.to(tl.float64))


@triton.jit
def _loss_bwd_kernel(grad_ptr, logits_ptr, labels_ptr, dlogits_ptr, daux_ptr, B, C, smoothing, aux_weight,
                     BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program i: dlogits of rows [i·BLOCK_B, (i+1)·BLOCK_B) (the logits' dtype); program 0 also
    d aux = aux_weight · g."""
    pid = tl.program_id(0)
    g = tl.load(grad_ptr).to(tl.float32)
    z, labels, rows, row_ok, cols, col_ok, lse, _ = _row_block(logits_ptr, labels_ptr, pid * BLOCK_B, B, C, BLOCK_B,
                                                               BLOCK_C)
    target = tl.where(cols[None, :] == labels[:, None], 1.0 - smoothing, 0.0) + smoothing / C
    dz = (g / B) * (tl.exp(z - lse[:, None]) - target)
    mask = row_ok[:, None] & col_ok[None, :]
    tl.store(dlogits_ptr + rows[:, None].to(tl.int64) * C + cols[None, :],
             dz.to(dlogits_ptr.dtype.element_ty), mask=mask)
    if pid == 0:
        tl.store(daux_ptr, aux_weight * g)
