"""The classification step's loss: cross-entropy with label smoothing plus the weighted MoE
auxiliary loss, with the step's metrics (the cross-entropy, the auxiliary loss, the correct count).

    loss = mean_rows(lse(z) − (1 − s) z_label − s mean(z)) + w_aux · aux,   lse(z) = log Σ_c exp z_c

:func:`classification_loss_reference` is this in torch (``F.cross_entropy(logits.float(), labels,
label_smoothing=s)``); with ``fused`` :func:`classification_loss` runs it as one Triton launch
forward and one backward (:mod:`mlit.train.loss_kernels`, imported on first use: Triton decides
interpret-or-compile when its kernels are defined) instead of about fourteen. Hard labels only
(the recipes have no mixup / cutmix). :func:`add_eval_sums` adds an evaluation batch's sums (one
Triton launch with ``fused``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def classification_loss_reference(logits: Tensor, labels: Tensor, aux: Tensor, smoothing: float,
                                  aux_weight: float) -> tuple[Tensor, Tensor]:
    """(loss () fp32, metrics (4,) fp32 = loss, cross-entropy, aux, correct count; detached) in
    torch; logits (B, C) any float dtype, labels (B,) int64, aux () the summed MoE auxiliary losses."""
    ce = F.cross_entropy(logits.float(), labels, label_smoothing=smoothing)
    loss = torch.add(ce, aux.float(), alpha=aux_weight)
    correct = (logits.argmax(-1) == labels).sum()
    return loss, torch.stack([loss, ce, aux.float(), correct.float()]).detach()


def classification_loss(logits: Tensor, labels: Tensor, aux: Tensor, smoothing: float, aux_weight: float,
                        fused: bool = False) -> tuple[Tensor, Tensor]:
    """(loss () fp32, metrics (4,) fp32 = loss, cross-entropy, aux, correct count; detached): the
    Triton kernels with ``fused``, else :func:`classification_loss_reference`."""
    if not fused:
        return classification_loss_reference(logits, labels, aux, smoothing, aux_weight)
    from .loss_kernels import fused_classification_loss

    return fused_classification_loss(logits, labels, aux, smoothing, aux_weight)


def add_eval_sums(logits: Tensor, labels: Tensor, sums: Tensor, fused: bool = False) -> None:
    """Evaluation's batch sums: sums (3,) float64 += (rows, summed cross-entropy (no smoothing),
    correct count) of logits (B, C) against labels (B,); one Triton launch with ``fused``."""
    if fused:
        from .loss_kernels import add_eval_sums as fused_eval_sums

        fused_eval_sums(logits, labels, sums)
        return
    ce = F.cross_entropy(logits.float(), labels, reduction="sum")
    correct = (logits.argmax(-1) == labels).sum()
    sums[0] += len(labels)
    sums[1:] += torch.stack([ce.double(), correct.double()])


__all__ = ["add_eval_sums", "classification_loss", "classification_loss_reference"]
