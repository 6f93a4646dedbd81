"""Grouped-query attention (SPEC §4)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class GroupedQueryAttention(nn.Module):
    """H query heads in G groups; the heads of a group share one key and one value head.

    G = 1 is multi-query, G = H multi-head attention. Head dim = dim / H; the key and value
    projections map dim → G · dim / H. Every projection has a bias (all linear layers inside an
    encoder layer do). The query, key and value projections are one matrix (one launch).

    forward(x (B, n, dim)) → (B, n, dim).
    """

    def __init__(self, dim: int, num_heads: int, num_groups: int):
        super().__init__()
        if dim % num_heads or num_heads % num_groups:
            raise ValueError(f"need dim % num_heads == 0 and num_heads % num_groups == 0, got {dim}, {num_heads}, {num_groups}")
        self.num_heads, self.num_groups = num_heads, num_groups
        self.head_dim = dim // num_heads
        kv_dim = num_groups * self.head_dim
        self.qkv = nn.Linear(dim, dim + 2 * kv_dim)
        self.proj = nn.Linear(dim, dim)

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
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, n, dim))
