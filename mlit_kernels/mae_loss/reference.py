"""The MAE pre-training loss (Eq. 16) in plain PyTorch: the oracle of :mod:`mlit_kernels.mae_loss`'s
kernels and what the "reference" backend runs.

    mse[b, p] = mean_j (pred[b, p, j] − patch(b, p)[j])²
    loss = Σ mse · mask / Σ mask + α · Σ mse (1 − mask) / Σ (1 − mask) + β · moe_loss
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..patch_embed.reference import patchify


def mae_loss_reference(images: Tensor, pred: Tensor, mask: Tensor, moe_loss: Tensor, patch_size: int, alpha: float,
                       beta: float) -> tuple[Tensor, Tensor]:
    """(loss (), metrics (4,) = loss, masked_mse, unmasked_mse, moe_loss; detached), in fp32 or
    wider: images (B, C, H, W), pred (B, patches, C·p·p), mask (B, patches) 1 where hidden, moe_loss ()."""
    dtype = torch.promote_types(pred.dtype, torch.float32)
    target = patchify(images, patch_size)
    per_patch = ((pred.to(dtype) - target.to(dtype)) ** 2).mean(dim=-1)
    masked_mse = (per_patch * mask).sum() / mask.sum()
    unmasked_mse = (per_patch * (1 - mask)).sum() / (1 - mask).sum()
    loss = masked_mse + alpha * unmasked_mse + beta * moe_loss
    return loss, torch.stack([t.detach().to(dtype) for t in (loss, masked_mse, unmasked_mse, moe_loss)])


__all__ = ["mae_loss_reference"]
