"""The mLiT patch embedding — P×P patches, an all-zero dummy patch, the linear projection (no bias)
and the positional table — in one Triton launch forward and two backward (:mod:`.kernels`,
:mod:`.ops`), or plain PyTorch (:mod:`.reference`).

Importing this package imports no Triton; the kernels are defined on the first call that runs them.
"""

from __future__ import annotations

from torch import Tensor

from ..common.clearance import uses_triton
from .family import FAMILY
from .reference import patch_embed_reference, patchify


def patch_embed(images: Tensor, weight: Tensor, pos: Tensor, patch_size: int, backend: str = "auto") -> Tensor:
    """tokens (B, patches + 1, m): the patches of images (B, C, H, W) and the dummy times weightᵀ
    (m, C·P·P), + pos ((1,) patches + 1, m); the kernels where ``backend`` takes them
    (:func:`mlit_kernels.common.clearance.uses_triton`)."""
    if uses_triton(FAMILY, backend, images.device):
        from .ops import fused_patch_embed  # defines the kernels (Triton fixes interpret-or-compile then)

        return fused_patch_embed(images, weight, pos, patch_size)
    return patch_embed_reference(images, weight, pos, patch_size)


__all__ = ["FAMILY", "patch_embed", "patch_embed_reference", "patchify"]
