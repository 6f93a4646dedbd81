"""The classification step's loss — cross-entropy with label smoothing plus the weighted MoE
auxiliary loss, with the step's metrics — and evaluation's batch sums: one Triton launch forward
and one backward (:mod:`.kernels`, :mod:`.ops`) instead of about fourteen, or plain PyTorch
(:mod:`.reference`). Hard labels only (the recipes have no mixup / cutmix).

Importing this package imports no Triton; the kernels are defined on the first call that runs them.
"""

from __future__ import annotations

from torch import Tensor

from ..common.clearance import uses_triton
from .family import FAMILY
from .reference import classification_loss_reference, eval_sums_reference


def classification_loss(logits: Tensor, labels: Tensor, aux: Tensor, smoothing: float, aux_weight: float,
                        backend: str = "auto") -> tuple[Tensor, Tensor]:
    """(loss () fp32, metrics (4,) fp32 = loss, cross-entropy, aux, correct count; detached) of logits
    (B, C) against labels (B,) with label smoothing, + aux_weight · aux (): the kernels where
    ``backend`` takes them (:func:`mlit_kernels.common.clearance.uses_triton`), else the reference."""
    if uses_triton(FAMILY, backend, logits.device):
        from .ops import fused_classification_loss  # defines the kernels (Triton fixes interpret-or-compile then)

        return fused_classification_loss(logits, labels, aux, smoothing, aux_weight)
    return classification_loss_reference(logits, labels, aux, smoothing, aux_weight)


def add_eval_sums(logits: Tensor, labels: Tensor, sums: Tensor, backend: str = "auto") -> None:
    """Evaluation's batch sums: sums (3,) float64 += (rows, summed cross-entropy (no smoothing),
    correct count) of logits (B, C) against labels (B,); one launch where ``backend`` takes the kernels."""
    if uses_triton(FAMILY, backend, logits.device):
        from .ops import fused_eval_sums

        fused_eval_sums(logits, labels, sums)
        return
    eval_sums_reference(logits, labels, sums)


__all__ = ["FAMILY", "classification_loss", "classification_loss_reference", "add_eval_sums", "eval_sums_reference"]
