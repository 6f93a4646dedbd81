"""mLiT classifier: the encoder and a linear head on the dummy-patch token."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..config import ImageConfig, TransformerConfig
from .encoder import MLiTEncoder


class MLiTClassifier(nn.Module):
    """forward(images (B, 3, 36, 36)) → (logits (B, num_classes), auxiliary loss ())."""

    def __init__(
        self, cfg: TransformerConfig, num_classes: int, image: ImageConfig = ImageConfig(), backend: str = "reference"
    ):
        super().__init__()
        self.num_classes = num_classes
        self.encoder = MLiTEncoder(cfg, image, backend)
        self.head = nn.Linear(cfg.embed_dim, num_classes)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features, aux_loss = self.encoder(images)
        return self.head(features[:, -1]), aux_loss
