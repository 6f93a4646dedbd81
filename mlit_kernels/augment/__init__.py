"""The augmentation's training transform — resize + random resized crop + flip, AutoAugment,
normalise — for a batch of uint8 images, every image with its own draws: three Triton launches
(:mod:`.kernels`, :mod:`.ops`) or plain PyTorch (:mod:`.reference`), one semantics.

Importing this package imports no Triton; the kernels are defined on the first call that runs them.
"""

from __future__ import annotations

from torch import Tensor

from ..common.clearance import uses_triton
from .family import FAMILY
from .reference import DRAWS, policy_tables
from .reference import train_transform as train_transform_reference


def train_transform(images: Tensor, u: Tensor, size: int, crop_scale: tuple[float, float], hflip: float,
                    tables: tuple[Tensor, ...] | None, backend: str = "auto") -> Tensor:
    """uint8 (B, 3, H, W) + uniforms u (B, 28) → normalised float32 (B, 3, size, size); tables:
    :func:`policy_tables` (AutoAugment) or None; the kernels where ``backend`` takes them
    (:func:`mlit_kernels.common.clearance.uses_triton`)."""
    if uses_triton(FAMILY, backend, images.device):
        from .ops import fused_train_transform  # defines the kernels (Triton fixes interpret-or-compile then)

        return fused_train_transform(images, u, size, crop_scale, hflip, tables)
    return train_transform_reference(images, u, size, crop_scale, hflip, tables)


__all__ = ["FAMILY", "DRAWS", "policy_tables", "train_transform", "train_transform_reference"]
