"""The classification step's loss: cross-entropy with label smoothing plus the weighted MoE
auxiliary loss, with the step's metrics (the cross-entropy, the auxiliary loss, the correct count).

    loss = mean_rows(lse(z) − (1 − s) z_label − s mean(z)) + w_aux · aux,   lse(z) = log Σ_c exp z_c

:func:`classification_loss_reference` is this in torch (``F.cross_entropy(logits.float(), labels,
label_smoothing=s)``); with ``fused`` :func:`classification_loss` runs it as one Triton launch
forward and one backward (:mod:`mlit.train.loss_kernels`, imported on first use: Triton decides
interpret-or-compile when its kernels are defined) instead of about fourteen. Hard labels only
(the recipes have no mixup / cutmix).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def classification_loss_reference(logits: Tensor, labels: Tensor, aux: Tensor, smoothing: float,
                                  aux_weight: float) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """(loss () fp32, (cross-entropy, aux, correct count) 0-d metrics) in torch; logits (B, C)
    any float dtype, labels (B,) int64, aux () the summed MoE auxiliary losses."""
    ce = F.cross_entropy(logits.float(), labels, label_smoothing=smoothing)
    loss = torch.add(ce, aux.float(), alpha=aux_weight)
    return loss, (ce, aux.float(), (logits.argmax(-1) == labels).sum())


def classification_loss(logits: Tensor, labels: Tensor, aux: Tensor, smoothing: float, aux_weight: float,
                        fused: bool = False) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """(loss () fp32, (cross-entropy, aux, correct count) 0-d metrics): the Triton kernels with
    ``fused``, else :func:`classification_loss_reference`."""
    if not fused:
        return classification_loss_reference(logits, labels, aux, smoothing, aux_weight)
    from .loss_kernels import fused_classification_loss

    return fused_classification_loss(logits, labels, aux, smoothing, aux_weight)


__all__ = ["classification_loss", "classification_loss_reference"]
