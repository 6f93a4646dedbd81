"""Grouped-query attention (SPEC §4)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def padded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, multiple: int) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(d)) v with the head dim d zero-padded up to a multiple of ``multiple``.

    q, k, v: (B, H, n, d). PyTorch's fused attention kernels (flash, memory-efficient) need head
    dims that are multiples of 8; the paper's 18 is not, so SDPA would fall back to the unfused
    math path. Zeros add nothing to q kᵀ, the true scale is passed explicitly, and the padded
    output columns (zero) are cut off, so the result and its gradients are unchanged.
    """
    d = q.shape[-1]
    pad = -d % multiple
    if pad == 0:
        return F.scaled_dot_product_attention(q, k, v)
    q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(d))[..., :d]


class GroupedQueryAttention(nn.Module):
    """H query heads in G groups; the heads of a group share one key and one value head.

    G = 1 is multi-query, G = H multi-head attention. Head dim = dim / H; the key and value
    projections map dim → G · dim / H. Every projection has a bias (all linear layers inside an
    encoder layer do). The query, key and value projections are one matrix (one launch).
    On CUDA, head dims that are not a multiple of 8 are zero-padded so that a fused SDPA kernel
    runs (``pad_head_dim``: "auto" = on CUDA only, True, False).

    forward(x (B, n, dim)) → (B, n, dim).
    """

    def __init__(self, dim: int, num_heads: int, num_groups: int, pad_head_dim: bool | str = "auto"):
        super().__init__()
        if dim % num_heads or num_heads % num_groups:
            raise ValueError(f"need dim % num_heads == 0 and num_heads % num_groups == 0, got {dim}, {num_heads}, {num_groups}")
        self.num_heads, self.num_groups = num_heads, num_groups
        self.head_dim = dim // num_heads
        kv_dim = num_groups * self.head_dim
        self.qkv = nn.Linear(dim, dim + 2 * kv_dim)
        self.proj = nn.Linear(dim, dim)
        self.pad_head_dim = pad_head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, n, dim = x.shape
        kv_dim = self.num_groups * self.head_dim
        q, k, v = self.qkv(x).split([dim, kv_dim, kv_dim], dim=-1)
        q = q.view(B, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, n, self.num_groups, self.head_dim).transpose(1, 2)
        v = v.view(B, n, self.num_groups, self.head_dim).transpose(1, 2)
        repeats = self.num_heads // self.num_groups
        k = k.repeat_interleave(repeats, dim=1)
        v = v.repeat_interleave(repeats, dim=1)
        pad = self.pad_head_dim if self.pad_head_dim != "auto" else x.is_cuda
        out = padded_attention(q, k, v, 8) if pad else F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, n, dim))
