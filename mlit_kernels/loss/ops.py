"""The classification loss as ``torch.library`` custom ops over :mod:`.kernels`, and their checked
entries.

* ``mlit::classification_loss(logits, labels, aux, smoothing, aux_weight) -> (loss (), metrics (4,))``
* ``mlit::classification_loss_backward(grad, logits, labels, smoothing, aux_weight) -> (dlogits, daux)``
* ``mlit::classification_eval_sums(logits, labels, sums)`` (mutates sums)
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from ..common.custom_op import custom_op
from .kernels import BLOCK_B, _eval_sums_kernel, _loss_bwd_kernel, _loss_fwd_kernel

MAX_CLASSES = 4096  # classes a row's register tile holds


def _check(logits: Tensor, labels: Tensor, aux: Tensor | None) -> None:
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a 2-D floating-point tensor (B, C), got {logits.dtype} {tuple(logits.shape)}")
    if labels.shape != logits.shape[:1] or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be int64 / int32 of shape ({logits.shape[0]},), got {labels.dtype} "
                         f"{tuple(labels.shape)}")
    if aux is not None and (aux.dim() != 0 or not aux.is_floating_point()):
        raise ValueError(f"aux must be a 0-d floating-point tensor, got {aux.dtype} {tuple(aux.shape)}")
    if logits.shape[1] > MAX_CLASSES:
        raise ValueError(f"logits: at most {MAX_CLASSES} classes (one register tile a row), got {logits.shape[1]}")


def _loss_backward_op_fake(grad, logits, labels, smoothing, aux_weight):
    return torch.empty_like(logits), logits.new_empty((), dtype=torch.float32)


@custom_op("classification_loss_backward", fake=_loss_backward_op_fake)
def _loss_backward_op(grad: Tensor, logits: Tensor, labels: Tensor, smoothing: float,
                      aux_weight: float) -> tuple[Tensor, Tensor]:
    b, c = logits.shape
    dlogits = torch.empty_like(logits)
    daux = logits.new_empty((), dtype=torch.float32)
    _loss_bwd_kernel[(max(1, triton.cdiv(b, BLOCK_B)),)](grad, logits, labels, dlogits, daux, b, c, float(smoothing),
                                                         float(aux_weight), BLOCK_B=BLOCK_B,
                                                         BLOCK_C=triton.next_power_of_2(c))
    return dlogits, daux


def _loss_op_fake(logits, labels, aux, smoothing, aux_weight):
    return logits.new_empty((), dtype=torch.float32), logits.new_empty((4,), dtype=torch.float32)


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


@custom_op("classification_loss", fake=_loss_op_fake, backward=_backward, setup_context=_setup_context)
def _loss_op(logits: Tensor, labels: Tensor, aux: Tensor, smoothing: float, aux_weight: float) -> tuple[Tensor, Tensor]:
    b, c = logits.shape
    loss = logits.new_empty((), dtype=torch.float32)
    metrics = logits.new_empty((4,), dtype=torch.float32)
    _loss_fwd_kernel[(1,)](logits, labels, aux, loss, metrics, b, c, float(smoothing), float(aux_weight),
                           BLOCK_B=BLOCK_B, BLOCK_C=triton.next_power_of_2(c))
    return loss, metrics


def fused_classification_loss(logits: Tensor, labels: Tensor, aux: Tensor, smoothing: float,
                              aux_weight: float) -> tuple[Tensor, Tensor]:
    """:func:`mlit_kernels.loss.classification_loss_reference` in one Triton launch (and one for the
    backward): (loss () fp32, metrics (4,) fp32 = loss, cross-entropy, aux, correct count; no gradient)."""
    if not torch.compiler.is_compiling():
        _check(logits, labels, aux)
    return _loss_op(logits.contiguous(), labels.contiguous(), aux, float(smoothing), float(aux_weight))


def _eval_sums_fake(logits, labels, sums):
    return None


@custom_op("classification_eval_sums", fake=_eval_sums_fake, mutates_args=("sums",))
def _eval_sums_op(logits: Tensor, labels: Tensor, sums: Tensor) -> None:
    b, c = logits.shape
    _eval_sums_kernel[(1,)](logits, labels, sums, b, c, BLOCK_B=BLOCK_B, BLOCK_C=triton.next_power_of_2(c))


def fused_eval_sums(logits: Tensor, labels: Tensor, sums: Tensor) -> None:
    """sums (3,) float64 += (rows, summed cross-entropy (no smoothing), correct count) of the
    logits (B, C) any float dtype against labels (B,), in one launch."""
    if not torch.compiler.is_compiling():
        _check(logits, labels, None)
        if sums.shape != (3,) or sums.dtype != torch.float64 or not sums.is_contiguous():
            raise ValueError(f"sums must be a contiguous (3,) float64 tensor, got {sums.dtype} {tuple(sums.shape)}")
    _eval_sums_op(logits.contiguous(), labels.contiguous(), sums)


__all__ = ["fused_classification_loss", "fused_eval_sums", "MAX_CLASSES"]
