"""The dense MoE variant's descriptor (Triton-free): :data:`FAMILY`, and the FLOP models of its
kernels (the dispatch variant shares the gate's)."""

from __future__ import annotations

import torch

from ..common.family import Family


def gate_flops(n: int, m: int, t: int, noisy) -> int:
    """The gate's logits (clean, + noisy): x W_g (and x W_noise)."""
    return n * 2 * m * t * (1 + bool(noisy))


def fwd_flops(a) -> int:
    """Per token: the gate (clean, + noisy logits), x V and x W_e for every expert of the tile
    (the tile computes an expert any of its tokens picked: all t at training batch sizes), h W_2."""
    n, m, d, t = a["N"], a["M"], a["D"], a["T"]
    return n * (2 * m * d * (t + 1) + 2 * d * m) + gate_flops(n, m, t, a["NOISY"])


def bwd_tokens_flops(a) -> int:
    """Per token: dy W_2ᵀ, x V and x W_e recomputed, da W_eᵀ for every expert, du Vᵀ; the gate
    recomputed twice and its dx."""
    n, m, d, t = a["N"], a["M"], a["D"], a["T"]
    return n * 2 * m * d * (2 * t + 3) + 3 * gate_flops(n, m, t, a["NOISY"])


def bwd_weights_flops(a) -> int:
    """xᵀ da over the token's k pairs (dW_e), xᵀ du (dV), hᵀ dy (dW_2), xᵀ dgate (dW_g, dW_noise)."""
    n, m, d, t, k = a["N"], a["M"], a["D"], a["T"], a["K"]
    return n * 2 * m * d * (k + 2) + gate_flops(n, m, t, a["NOISY"])


FAMILY = Family(
    name="dense",
    module=__name__,
    summary="the MoE layer for few experts (t ≤ 16): every routed expert per token tile, masked by the gates",
    ops=("mlit::fused_moe", "mlit::fused_moe_backward", "mlit::fused_norm_moe", "mlit::fused_norm_moe_backward"),
    sources=("mlit_kernels.dense.kernels", "mlit_kernels.dense.launch", "mlit_kernels.dense.ops",
             "mlit_kernels.common.gating", "mlit_kernels.common.norm", "mlit_kernels.common.settings",
             "mlit_kernels.common.tiling", "mlit_kernels.common.precision", "mlit_kernels.common.split_sum",
             "mlit_kernels.common.seed"),
    kernels={"_fused_fwd_kernel": fwd_flops, "_fused_aux_kernel": None, "_fused_bwd_tokens_kernel": bwd_tokens_flops,
             "_fused_bwd_weights_kernel": bwd_weights_flops, "_split_sum_kernel": None},
    launches={"forward": 2, "backward": 3, "eval": 1},
    dtypes=(torch.float16, torch.bfloat16, torch.float32),
    limits="t ≤ 16 experts, any m and d_h, shared V / W2; the LayerNorm before it and the residual folded in",
    check="mlit_kernels.selfcheck:dense_check",  # x + MoE(LayerNorm(x)) (norm) and the layer, vs float64
    small_shapes=({"m": 16, "d_h": 27, "t": 5, "k": 2, "N": 37, "norm": True},),
    gpu_shapes=({"m": 144, "d_h": 144, "t": 3, "k": 2, "N": 4133, "norm": True},
                {"m": 108, "d_h": 27, "t": 5, "k": 2, "N": 4133, "norm": True},
                {"m": 144, "d_h": 144, "t": 5, "k": 2, "N": 4133, "norm": False}),
)

__all__ = ["FAMILY", "gate_flops", "fwd_flops", "bwd_tokens_flops", "bwd_weights_flops"]
