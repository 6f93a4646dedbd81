"""The attention half-block in plain PyTorch: the oracle of the Triton kernels (any dtype, float64
included; no SDPA, so every device and dtype runs it).

``attention_block_reference(x (B, n, D), γ, β (D,), W_qkv (E, D), b_qkv (E,), W_proj (D, D),
b_proj (D,), H, G) → x + proj(GQA(LN(x)))``, E = D + 2·G·D/H, q | k | v side by side in W_qkv
(the layout of :class:`mlit.models.GroupedQueryAttention`'s fused projection).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def attention_block_reference(x: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor, qkv_w: torch.Tensor,
                              qkv_b: torch.Tensor, proj_w: torch.Tensor, proj_b: torch.Tensor, num_heads: int,
                              num_groups: int, eps: float = 1e-5) -> torch.Tensor:
    B, n, D = x.shape
    d = D // num_heads
    xn = F.layer_norm(x, (D,), ln_w, ln_b, eps)
    heads = F.linear(xn, qkv_w, qkv_b).view(B, n, num_heads + 2 * num_groups, d).transpose(1, 2)
    q, k, v = heads.split([num_heads, num_groups, num_groups], dim=1)
    k = k.repeat_interleave(num_heads // num_groups, dim=1)
    v = v.repeat_interleave(num_heads // num_groups, dim=1)
    p = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(d), dim=-1)
    o = (p @ v).transpose(1, 2).reshape(B, n, D)
    return x + F.linear(o, proj_w, proj_b)


__all__ = ["attention_block_reference"]
