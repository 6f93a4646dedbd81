"""Triton kernels of the classification loss (:mod:`mlit.train.loss`): the custom ops
``mlit::classification_loss`` (one program walks the rows in fixed BLOCK_B blocks, so the sums'
order depends on the shape only; the logits read in their own dtype; the metrics vector
[loss, ce, aux, correct] written beside the loss), ``mlit::classification_loss_backward`` (one
program per row block: dlogits = g (softmax(z) − (1 − s) onehot − s / C) / B in the logits' dtype;
program 0 also d aux = w_aux · g) and ``mlit::classification_eval_sums`` (evaluation: the batch's
row count, summed cross-entropy and correct count added to a float64 sums vector in one launch).
No host reads: capturable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

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


def _check(logits: Tensor, labels: Tensor, aux: Tensor | None) -> None:
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a 2-D floating-point tensor (B, C), got {logits.dtype} {tuple(logits.shape)}")
    if labels.shape != logits.shape[:1] or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be int64 / int32 of shape ({logits.shape[0]},), got {labels.dtype} "
                         f"{tuple(labels.shape)}")
    if aux is not None and (aux.dim() != 0 or not aux.is_floating_point()):
        raise ValueError(f"aux must be a 0-d floating-point tensor, got {aux.dtype} {tuple(aux.shape)}")
    if logits.shape[1] > 4096:
        raise ValueError(f"logits: at most 4096 classes (one register tile a row), got {logits.shape[1]}")


@torch.library.custom_op("mlit::classification_loss", mutates_args=())
def _loss_op(logits: Tensor, labels: Tensor, aux: Tensor, smoothing: float, aux_weight: float) -> tuple[Tensor, Tensor]:
    b, c = logits.shape
    loss = logits.new_empty((), dtype=torch.float32)
    metrics = logits.new_empty((4,), dtype=torch.float32)
    _loss_fwd_kernel[(1,)](logits, labels, aux, loss, metrics, b, c, float(smoothing), float(aux_weight),
                           BLOCK_B=BLOCK_B, BLOCK_C=triton.next_power_of_2(c))
    return loss, metrics


@_loss_op.register_fake
def _loss_op_fake(logits, labels, aux, smoothing, aux_weight):
    return logits.new_empty((), dtype=torch.float32), logits.new_empty((4,), dtype=torch.float32)


@torch.library.custom_op("mlit::classification_loss_backward", mutates_args=())
def _loss_backward_op(grad: Tensor, logits: Tensor, labels: Tensor, smoothing: float,
                      aux_weight: float) -> tuple[Tensor, Tensor]:
    b, c = logits.shape
    dlogits = torch.empty_like(logits)
    daux = logits.new_empty((), dtype=torch.float32)
    _loss_bwd_kernel[(max(1, triton.cdiv(b, BLOCK_B)),)](grad, logits, labels, dlogits, daux, b, c, float(smoothing),
                                                         float(aux_weight), BLOCK_B=BLOCK_B,
                                                         BLOCK_C=triton.next_power_of_2(c))
    return dlogits, daux


@_loss_backward_op.register_fake
def _loss_backward_op_fake(grad, logits, labels, smoothing, aux_weight):
    return torch.empty_like(logits), logits.new_empty((), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    logits, labels, aux, smoothing, aux_weight = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero-filled gradient for the metrics
    ctx.save_for_backward(logits, labels)
    ctx.smoothing, ctx.aux_weight, ctx.aux_dtype = smoothing, aux_weight, aux.dtype


def _backward(ctx, grad, _grad_metrics):
    logits, labels = ctx.saved_tensors
    dlogits, daux = _loss_backward_op(grad, logits, labels, ctx.smoothing, ctx.aux_weight)
    return dlogits, None, daux.to(ctx.aux_dtype), None, None


_loss_op.register_autograd(_backward, setup_context=_setup_context)


def fused_classification_loss(logits: Tensor, labels: Tensor, aux: Tensor, smoothing: float,
                              aux_weight: float) -> tuple[Tensor, Tensor]:
    """:func:`mlit.train.loss.classification_loss_reference` in one Triton launch (and one for the backward):
    (loss () fp32, metrics (4,) fp32 = loss, cross-entropy, aux, correct count; no gradient)."""
    if not torch.compiler.is_compiling():
        _check(logits, labels, aux)
    return _loss_op(logits.contiguous(), labels.contiguous(), aux, float(smoothing), float(aux_weight))


@torch.library.custom_op("mlit::classification_eval_sums", mutates_args=("sums",))
def _eval_sums_op(logits: Tensor, labels: Tensor, sums: Tensor) -> None:
    b, c = logits.shape
    _eval_sums_kernel[(1,)](logits, labels, sums, b, c, BLOCK_B=BLOCK_B, BLOCK_C=triton.next_power_of_2(c))


@_eval_sums_op.register_fake
def _eval_sums_fake(logits, labels, sums):
    return None


def add_eval_sums(logits: Tensor, labels: Tensor, sums: Tensor) -> None:
    """sums (3,) float64 += (rows, summed cross-entropy (no smoothing), correct count) of the
    logits (B, C) any float dtype against labels (B,), in one launch."""
    if not torch.compiler.is_compiling():
        _check(logits, labels, None)
        if sums.shape != (3,) or sums.dtype != torch.float64 or not sums.is_contiguous():
            raise ValueError(f"sums must be a contiguous (3,) float64 tensor, got {sums.dtype} {tuple(sums.shape)}")
    _eval_sums_op(logits.contiguous(), labels.contiguous(), sums)


__all__ = ["fused_classification_loss", "add_eval_sums", "BLOCK_B"]
