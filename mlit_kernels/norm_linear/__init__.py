"""``Linear(LayerNorm(x))`` — a classifier head on the final norm, the MAE's encoder-to-decoder
projection and its pixel prediction — in one Triton launch forward and two backward
(:mod:`.ops`, on the attention block's kernels), or plain PyTorch (:mod:`.reference`).

Importing this package imports no Triton: :func:`norm_linear` and :func:`supports` import
:mod:`.ops` on their first call (Triton decides interpret-or-compile when kernels are defined).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .family import FAMILY
from .reference import norm_linear_reference


def norm_linear(x: Tensor, ln_w: Tensor, ln_b: Tensor, w: Tensor, b: Tensor | None = None, eps: float = 1e-5,
                dtype: torch.dtype | None = None) -> Tensor:
    """:func:`mlit_kernels.norm_linear.ops.norm_linear`: ``Linear(LayerNorm(x))`` by the kernels."""
    from .ops import norm_linear as fused

    return fused(x, ln_w, ln_b, w, b, eps, dtype)


def supports(dim: int, dtype: torch.dtype) -> bool:
    """Whether the kernels take this width and compute dtype."""
    from .ops import supports as fused_supports

    return fused_supports(dim, dtype)


__all__ = ["FAMILY", "norm_linear", "norm_linear_reference", "supports"]
