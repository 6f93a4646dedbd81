"""The mLiT encoder: 3×3 patches, a dummy patch, learnable positions, MoE transformer layers."""

from __future__ import annotations

import torch
import torch.nn as nn

from mlit_kernels import registry
from mlit_kernels.common.clearance import uses_triton
from mlit_kernels.patch_embed import patch_embed

from ..config import ImageConfig, TransformerConfig
from .transformer import MoETransformer, biases_and_norms, set_moe_backend


class MLiTEncoder(nn.Module):
    """Patch embedding (no bias) + positional embedding of 145 tokens + layers + final LayerNorm.

    The 145th token is the embedding of an all-zero dummy patch; a classifier reads it.
    embed(images (B, 3, 36, 36)) → tokens (B, 145, m) with positions added (the patch-embedding
    family, :mod:`mlit_kernels.patch_embed`: one kernel with the Triton backend — ``"triton"``, or
    ``"auto"`` on CUDA once cleared, :mod:`mlit_kernels.common.clearance`);
    forward(images, need_aux=True) → (features (B, 145, m), auxiliary loss (); None without
    ``need_aux``). ``device`` / ``dtype``: torch.nn's factory keywords, for every parameter.
    """

    def __init__(self, cfg: TransformerConfig, image: ImageConfig = ImageConfig(), backend: str = "reference", *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.cfg, self.image, self.backend = cfg, image, backend
        self.patch_embed = nn.Linear(image.patch_dim, cfg.embed_dim, bias=False, **factory)
        self.pos_embed = nn.Parameter(torch.empty(1, image.num_patches + 1, cfg.embed_dim, **factory))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = MoETransformer(cfg, backend, **factory)
        self.norm = nn.LayerNorm(cfg.embed_dim, **factory)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        expected = (self.image.in_chans, self.image.image_size, self.image.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images must have shape (B, {', '.join(map(str, expected))}), got {tuple(images.shape)}")
        return patch_embed(images, self.patch_embed.weight, self.pos_embed, self.image.patch_size, backend=self.backend)

    def uses_triton(self, family: str, x: torch.Tensor) -> bool:
        """Whether the kernel family ``family`` (a :mod:`mlit_kernels.registry` name) runs on x with this
        model's backend (:func:`mlit_kernels.common.clearance.uses_triton`)."""
        return uses_triton(registry.family(family), self.backend, x.device)

    def encode(self, tokens: torch.Tensor, final_norm: bool = True,
               need_aux: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Layers (+ the final norm) over already embedded tokens (B, n, m) → (tokens, auxiliary loss
        (), None without ``need_aux``). ``final_norm=False`` leaves the norm to the caller (a fused head)."""
        x, aux_loss = self.blocks(tokens, need_aux=need_aux)
        return (self.norm(x) if final_norm else x), aux_loss

    def forward(self, images: torch.Tensor, need_aux: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.encode(self.embed(images), need_aux=need_aux)

    def set_backend(self, backend: str) -> None:
        """Switch every MoE layer and the patch embedding to ``backend`` ("reference", "triton",
        "auto"); same parameters."""
        set_moe_backend(self, backend)
        self.backend = backend

    def no_weight_decay(self) -> set[str]:
        """Biases, norms and the position table (MAE practice)."""
        return biases_and_norms(self) | {"pos_embed"}
