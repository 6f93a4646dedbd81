"""mmLiT: the mLiT encoder pre-trained as a masked auto-encoder (SPEC §6, Eq. 16)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from mlit_kernels.mae_loss import mae_loss
from mlit_kernels.mae_tokens import decoder_input, encoder_input

from ..config import DECODER, ImageConfig, TransformerConfig
from .encoder import MLiTEncoder
from .transformer import MoETransformer, biases_and_norms, set_moe_backend


@dataclass
class MAEOutput:
    """loss (): Eq. 16; pred (B, 144, 27) predicted patches; mask (B, 144) 1 where hidden;
    masked_mse, unmasked_mse (detached), moe_loss (): its three parts before weighting; metrics (4,)
    fp32, detached: (loss, masked_mse, unmasked_mse, moe_loss)."""

    loss: torch.Tensor
    pred: torch.Tensor
    mask: torch.Tensor
    masked_mse: torch.Tensor
    unmasked_mse: torch.Tensor
    moe_loss: torch.Tensor
    metrics: torch.Tensor


def random_masking(num_images: int, num_patches: int, num_keep: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A random subset of num_keep patches per image, drawn from torch's RNG.

    Returns keep (B, num_keep) patch indices in drawn order, and mask (B, num_patches): 0 kept, 1 hidden.
    """
    order = torch.rand(num_images, num_patches, device=device).argsort(dim=1)
    keep = order[:, :num_keep]
    mask = torch.ones(num_images, num_patches, device=device)
    mask.scatter_(1, keep, 0.0)
    return keep, mask


class MMLiT(nn.Module):
    """Masked auto-encoder: mLiT encoder on the visible patches (+ the dummy), MoE decoder.

    Args:
        encoder_cfg, decoder_cfg: the encoder (S, XS, XXS) and decoder (Table 2) configurations.
        mask_ratio: share of the 144 image patches hidden per image (0.75); the dummy stays visible.
        decoder_pos_embed: a learnable (145, decoder width) position table added at the decoder
            input (default; the paper's count of 0.34M includes it). Without it the decoder sees
            positions only through the encoder's tokens.
        alpha, beta: weights of the unmasked-patch loss and of the MoE loss in Eq. 16.

    forward(images (B, 3, 36, 36), normalised) → MAEOutput. Targets are the normalised pixels.
    ``set_backend(b)`` switches every MoE layer, the decoder's included; ``no_weight_decay()``.
    ``device`` / ``dtype``: torch.nn's factory keywords, for every parameter.
    """

    def __init__(
        self,
        encoder_cfg: TransformerConfig,
        decoder_cfg: TransformerConfig = DECODER,
        image: ImageConfig = ImageConfig(),
        mask_ratio: float = 0.75,
        decoder_pos_embed: bool = True,
        alpha: float = 0.1,
        beta: float = 0.5,
        backend: str = "reference",
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self.image = image
        self.mask_ratio, self.alpha, self.beta = mask_ratio, alpha, beta
        self.encoder = MLiTEncoder(encoder_cfg, image, backend, **factory)
        self.decoder_embed = nn.Linear(encoder_cfg.embed_dim, decoder_cfg.embed_dim, bias=False, **factory)
        self.mask_token = nn.Parameter(torch.empty(1, 1, decoder_cfg.embed_dim, **factory))
        nn.init.normal_(self.mask_token, std=0.02)
        if decoder_pos_embed:
            self.decoder_pos_embed = nn.Parameter(torch.empty(1, image.num_patches + 1, decoder_cfg.embed_dim, **factory))
            nn.init.trunc_normal_(self.decoder_pos_embed, std=0.02)
        else:
            self.decoder_pos_embed = None
        self.decoder = MoETransformer(decoder_cfg, backend, **factory)
        self.decoder_norm = nn.LayerNorm(decoder_cfg.embed_dim, **factory)
        self.decoder_pred = nn.Linear(decoder_cfg.embed_dim, image.patch_dim, bias=False, **factory)

    def set_backend(self, backend: str) -> None:
        """Switch every MoE layer (encoder and decoder), the patch embedding and the loss to
        ``backend``; same parameters."""
        set_moe_backend(self, backend)
        self.encoder.backend = backend

    def no_weight_decay(self) -> set[str]:
        """Biases, norms, both position tables and the mask token (MAE practice)."""
        names = biases_and_norms(self) | {f"encoder.{n}" for n in self.encoder.no_weight_decay()} | {"mask_token"}
        if self.decoder_pos_embed is not None:
            names.add("decoder_pos_embed")
        return names

    @property
    def num_keep(self) -> int:
        return int(self.image.num_patches * (1 - self.mask_ratio))

    def forward(self, images: torch.Tensor) -> MAEOutput:
        tokens = self.encoder.embed(images)  # (B, 145, m): 144 patches, then the dummy
        B, n, m = tokens.shape
        keep, mask = random_masking(B, n - 1, self.num_keep, images.device)
        backend = self.encoder.backend
        visible = encoder_input(tokens, keep, backend=backend)  # the kept patches' tokens, the dummy last
        fused = self.encoder.uses_triton("norm_linear", images)  # final norms + projections: one launch each
        latent, encoder_loss = self.encoder.encode(visible, final_norm=not fused)
        latent = (self._norm_linear(latent, self.encoder.norm, self.decoder_embed) if fused
                  else self.decoder_embed(latent))
        x = decoder_input(latent, keep, self.mask_token, self.decoder_pos_embed, n - 1, backend=backend)
        x, decoder_loss = self.decoder(x)
        pred = (self._norm_linear(x, self.decoder_norm, self.decoder_pred) if fused
                else self.decoder_pred(self.decoder_norm(x)))[:, :-1]
        return self.loss(images, pred, mask, encoder_loss + decoder_loss)

    @staticmethod
    def _norm_linear(x: torch.Tensor, norm: nn.LayerNorm, linear: nn.Linear) -> torch.Tensor:
        """linear(norm(x)) in one Triton launch (:func:`mlit_kernels.norm_linear.norm_linear`)."""
        from mlit_kernels.norm_linear import norm_linear  # lazily: Triton decides interpret-or-compile on definition

        return norm_linear(x, norm.weight, norm.bias, linear.weight, linear.bias, norm.eps)

    def loss(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, moe_loss: torch.Tensor) -> MAEOutput:
        """Eq. 16: MSE on hidden patches + α · MSE on visible patches + β · Σ MoE losses: the MAE-loss
        family (:mod:`mlit_kernels.mae_loss`; with the Triton backend two launches forward and one
        backward)."""
        loss, metrics = mae_loss(images, pred, mask, moe_loss, self.image.patch_size, self.alpha, self.beta,
                                 backend=self.encoder.backend)
        return MAEOutput(loss, pred, mask, metrics[1], metrics[2], moe_loss, metrics)
