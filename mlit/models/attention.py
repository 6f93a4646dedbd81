"""Grouped-query attention (SPEC §4)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from mlit_kernels.attention import FAMILY as ATTENTION
from mlit_kernels.common.clearance import uses_triton
from mlit_kernels.common.precision import compute_dtype

PAD_MULTIPLE = 8  # PyTorch's fused attention kernels (flash, memory-efficient) need head dims that are multiples of 8


class GroupedQueryAttention(nn.Module):
    """H query heads in G groups; the heads of a group share one key and one value head.

    G = 1 is multi-query, G = H multi-head attention. Head dim = dim / H; the key and value
    projections map dim → G · dim / H. Every projection has a bias (all linear layers inside an
    encoder layer do). The query, key and value projections are one matrix (one launch), and the
    shared key / value heads go to SDPA as they are (``enable_gqa``: no repeated copies).

    The paper's head dims (18 for S and XXS) are not multiples of 8, so on CUDA SDPA would fall
    back to its unfused math path: ``pad_head_dim`` ("auto" = on CUDA only, True, False) zero-pads
    the projected q, k and v heads (one pad of the fused qkv output) with the true scale passed
    explicitly; zeros add nothing to q kᵀ and the padded output columns are cut off, so the result
    and its gradients are unchanged. ``device`` / ``dtype``: torch.nn's factory keywords.

    forward(x (B, n, dim), weights=None, norm=None) → (B, n, dim); ``weights``: (qkv weight, qkv
    bias, proj weight, proj bias) to use instead of the module's own (their autocast copies, cast
    for a whole stack at once: :func:`mlit.models.amp.autocast_weights`). :meth:`weights` lists
    the module's. With ``norm`` (the pre-norm LayerNorm) it returns the whole half-block
    ``x + attention(norm(x))``, which the Triton ``backend`` computes with the fused kernels of
    :mod:`mlit_kernels.attention` (LayerNorm + qkv in one launch, attention + projection + residual
    in one, four for the backward; the weights in their own dtype, cast in registers, so ``weights``
    is not needed there). ``backend``: "reference" (torch: SDPA), "triton", or "auto" (Triton on
    CUDA once the kernels are cleared on the GPU present: :mod:`mlit_kernels.common.clearance`);
    shapes or dtypes the kernels do not take use torch.
    """

    def __init__(self, dim: int, num_heads: int, num_groups: int, pad_head_dim: bool | str = "auto",
                 backend: str = "reference", *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        if dim % num_heads or num_heads % num_groups:
            raise ValueError(f"need dim % num_heads == 0 and num_heads % num_groups == 0, got {dim}, {num_heads}, {num_groups}")
        self.num_heads, self.num_groups = num_heads, num_groups
        self.head_dim = dim // num_heads
        kv_dim = num_groups * self.head_dim
        self.qkv = nn.Linear(dim, dim + 2 * kv_dim, device=device, dtype=dtype)
        self.proj = nn.Linear(dim, dim, device=device, dtype=dtype)
        self.pad_head_dim = pad_head_dim
        self.backend = backend

    def weights(self) -> list[torch.Tensor]:
        """The projections' parameters, in the order ``forward``'s ``weights`` takes them."""
        return [self.qkv.weight, self.qkv.bias, self.proj.weight, self.proj.bias]

    def uses_triton(self, x: torch.Tensor) -> bool:
        """Whether a half-block call (``norm`` given) on x runs the fused Triton kernels."""
        if not uses_triton(ATTENTION, self.backend, x.device):
            return False
        from mlit_kernels.attention import supports  # imports Triton: only once a Triton backend is asked for

        return supports(self.proj.in_features, self.num_heads, self.num_groups, compute_dtype(x))

    def forward(self, x: torch.Tensor, weights: Sequence[torch.Tensor] | None = None,
                norm: nn.LayerNorm | None = None) -> torch.Tensor:
        if norm is None:
            return self._attend(x, weights)
        if self.uses_triton(x) and norm.weight is not None and norm.bias is not None:
            from mlit_kernels.attention import attention_block

            return attention_block(x, norm.weight, norm.bias, *self.weights(), self.num_heads, self.num_groups,
                                   norm.eps)
        return x + self._attend(norm(x), weights)

    def _attend(self, x: torch.Tensor, weights: Sequence[torch.Tensor] | None) -> torch.Tensor:
        B, n, dim = x.shape
        d = self.head_dim
        qkv = self.qkv(x) if weights is None else F.linear(x, weights[0], weights[1])
        heads = qkv.view(B, n, self.num_heads + 2 * self.num_groups, d)
        pad = (self.pad_head_dim if self.pad_head_dim != "auto" else x.is_cuda) and d % PAD_MULTIPLE
        if pad:
            heads = F.pad(heads, (0, -d % PAD_MULTIPLE))
        q, k, v = heads.transpose(1, 2).split([self.num_heads, self.num_groups, self.num_groups], dim=1)
        out = F.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(d),
                                             enable_gqa=self.num_groups != self.num_heads)
        if pad:
            out = out[..., :d]
        out = out.transpose(1, 2).reshape(B, n, dim)
        return self.proj(out) if weights is None else F.linear(out, weights[2], weights[3])
