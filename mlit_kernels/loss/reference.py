"""The classification loss in plain PyTorch: the oracle of :mod:`mlit_kernels.loss`'s kernels and
what the "reference" backend runs.

    loss = mean_rows(lse(z) − (1 − s) z_label − s mean(z)) + w_aux · aux,   lse(z) = log Σ_c exp z_c
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


def eval_sums_reference(logits: Tensor, labels: Tensor, sums: Tensor) -> None:
    """sums (3,) float64 += (rows, summed cross-entropy (no smoothing), correct count)."""
    ce = F.cross_entropy(logits.float(), labels, reduction="sum")
    correct = (logits.argmax(-1) == labels).sum()
    sums[0] += len(labels)
    sums[1:] += torch.stack([ce.double(), correct.double()])


__all__ = ["classification_loss_reference", "eval_sums_reference"]
