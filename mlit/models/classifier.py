"""mLiT classifier: the encoder and a linear head on the dummy-patch token."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..config import ImageConfig, TransformerConfig
from .encoder import MLiTEncoder
from .transformer import biases_and_norms


class MLiTClassifier(nn.Module):
    """forward(images (B, 3, 36, 36), normalised to [-1, 1]) → (logits (B, num_classes), auxiliary loss ()).

    timm's conventions: ``forward_features(images)`` → tokens (B, 145, m) after the final norm;
    ``forward_head(tokens, pre_logits=False)`` → logits (B, num_classes), or with pre_logits the
    dummy token's features (B, m); ``reset_classifier(n)`` puts a fresh n-class head (0: none,
    the model then returns features); ``no_weight_decay()``; ``set_backend(b)`` for every MoE layer.
    ``device`` / ``dtype``: torch.nn's factory keywords, for every parameter (the head made by
    ``reset_classifier`` too).
    """

    def __init__(
        self, cfg: TransformerConfig, num_classes: int, image: ImageConfig = ImageConfig(), backend: str = "reference",
        *, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self._factory = dict(device=device, dtype=dtype)
        self.encoder = MLiTEncoder(cfg, image, backend, **self._factory)
        self.num_features = self.embed_dim = cfg.embed_dim
        self.reset_classifier(num_classes)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh linear head for ``num_classes`` (nn.Identity for 0)."""
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes, **self._factory) if num_classes else nn.Identity()

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, 36, 36) → tokens (B, 145, m); the MoE auxiliary loss is not computed (use forward)."""
        return self.encoder(images, need_aux=False)[0]

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """tokens (B, 145, m) → logits (B, num_classes), or the dummy token (B, m) with pre_logits."""
        pooled = features[:, -1]
        return pooled if pre_logits else self.head(pooled)

    def forward(self, images: torch.Tensor, need_aux: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """→ (logits, auxiliary loss; None without ``need_aux``, which evaluation skips). With the
        Triton kernels the final norm of the dummy token and the head run as one launch
        (:func:`mlit_kernels.norm_linear.norm_linear`; two for its gradients)."""
        if self.num_classes and self.encoder.uses_triton("norm_linear", images):
            from mlit_kernels.norm_linear import norm_linear  # lazily: Triton picks interpret-or-compile on definition

            tokens, aux_loss = self.encoder.encode(self.encoder.embed(images), final_norm=False, need_aux=need_aux)
            norm = self.encoder.norm
            return norm_linear(tokens[:, -1], norm.weight, norm.bias, self.head.weight, self.head.bias,
                               norm.eps), aux_loss
        features, aux_loss = self.encoder(images, need_aux=need_aux)
        return self.forward_head(features), aux_loss

    def set_backend(self, backend: str) -> None:
        """Switch every MoE layer and the patch embedding to ``backend`` ("reference", "triton",
        "auto"); same parameters."""
        self.encoder.set_backend(backend)

    def no_weight_decay(self) -> set[str]:
        """Names of the parameters AdamW must not decay: biases, norms, the position table."""
        return biases_and_norms(self) | {f"encoder.{n}" for n in self.encoder.no_weight_decay()}
