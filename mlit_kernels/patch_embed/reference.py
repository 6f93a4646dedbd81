"""The patch embedding in plain PyTorch: the oracle of :mod:`mlit_kernels.patch_embed`'s kernels
(any dtype, float64 included), and what the "reference" backend runs."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) → (B, H·W/p², p·p·C); patches row by row, values ordered (p, p, C) as in MAE."""
    B, C, H, W = images.shape
    if H % patch_size or W % patch_size:
        raise ValueError(f"images of {H}×{W} do not split into {patch_size}×{patch_size} patches")
    h, w = H // patch_size, W // patch_size
    x = images.reshape(B, C, h, patch_size, w, patch_size)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, h * w, patch_size * patch_size * C)


def patch_embed_reference(images: torch.Tensor, weight: torch.Tensor, pos: torch.Tensor,
                          patch_size: int) -> torch.Tensor:
    """tokens (B, patches + 1, m): the patches and an all-zero dummy patch (last) times weightᵀ
    (m, C·p·p), + pos ((1,) patches + 1, m)."""
    patches = F.pad(patchify(images, patch_size), (0, 0, 0, 1))  # + the all-zero dummy patch
    return F.linear(patches, weight) + pos


__all__ = ["patchify", "patch_embed_reference"]
