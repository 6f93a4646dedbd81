"""The MAE pre-training loss (Eq. 16): MSE on the hidden patches + α · MSE on the visible ones + β ·
the MoE losses, in two Triton launches forward and one backward (:mod:`.kernels`, :mod:`.ops`), the
target read from the images in place, or in plain PyTorch (:mod:`.reference`).

Importing this package imports no Triton; the kernels are defined on the first call that runs them.
"""

from __future__ import annotations

from torch import Tensor

from ..common.clearance import uses_triton
from .family import FAMILY
from .reference import mae_loss_reference


def mae_loss(images: Tensor, pred: Tensor, mask: Tensor, moe_loss: Tensor, patch_size: int, alpha: float, beta: float,
             backend: str = "auto") -> tuple[Tensor, Tensor]:
    """(loss () fp32, metrics (4,) fp32 = loss, masked_mse, unmasked_mse, moe_loss; detached): images
    (B, C, H, W), pred (B, patches, C·p·p) any strides, mask (B, patches) 1 where hidden, moe_loss ();
    the kernels where ``backend`` takes them (:func:`mlit_kernels.common.clearance.uses_triton`)."""
    if uses_triton(FAMILY, backend, images.device):
        from .ops import fused_mae_loss  # defines the kernels (Triton fixes interpret-or-compile then)

        return fused_mae_loss(images, pred, mask, moe_loss, patch_size, alpha, beta)
    return mae_loss_reference(images, pred, mask, moe_loss, patch_size, alpha, beta)


__all__ = ["FAMILY", "mae_loss", "mae_loss_reference"]
