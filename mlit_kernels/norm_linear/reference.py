"""``Linear(LayerNorm(x))`` in plain PyTorch: the oracle of :mod:`mlit_kernels.norm_linear`."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def norm_linear_reference(x: Tensor, ln_w: Tensor, ln_b: Tensor, w: Tensor, b: Tensor | None = None,
                          eps: float = 1e-5) -> Tensor:
    """``F.linear(F.layer_norm(x, (D,), ln_w, ln_b, eps), w, b)`` (any dtype, float64 included)."""
    return F.linear(F.layer_norm(x, (x.shape[-1],), ln_w, ln_b, eps), w, b)


__all__ = ["norm_linear_reference"]
