"""The dispatch MoE variant's descriptor (Triton-free): :data:`FAMILY`, and the FLOP models of its
kernels."""

from __future__ import annotations

import torch

from ..common.family import Family
from ..dense.family import gate_flops


def gate_route_flops(a) -> int:
    """The gate kernel: the logits of every token."""
    return gate_flops(a["N"], a["M"], a["T"], a["NOISY"])


def experts_fwd_flops(a) -> int:
    """Per (token, expert) pair: x W_e, x V_e and h W2_e."""
    return a["x_ptr"].shape[0] * a["K"] * 6 * a["M"] * a["D"]


def experts_bwd_flops(a) -> int:
    """Per pair: x W_e and x V_e recomputed, dy W2_eᵀ, da W_eᵀ and du V_eᵀ; the gate recomputed twice and its dx."""
    n = a["N"]
    return n * a["K"] * 10 * a["M"] * a["D"] + 3 * gate_flops(n, a["M"], a["T"], a["NOISY"])


def weights_flops(a) -> int:
    """Per pair xᵀ da, xᵀ du, hᵀ dy (dW_e, dV_e, dW2_e), with RECOMPUTE also x W_e, x V_e and dy W2_eᵀ
    (a, u, dh) once per m column group (G0 + … + G3 columns); xᵀ dgate (dW_g, dW_noise)."""
    n, m = a["N"], a["M"]
    groups = -(-m // sum(a[f"G{i}"] for i in range(4)))
    recompute = 6 * groups if a["RECOMPUTE"] else 0
    return n * a["K"] * (6 + recompute) * m * a["D"] + gate_flops(n, m, a["T"], a["NOISY"])


FAMILY = Family(
    name="dispatch",
    module=__name__,
    summary="the MoE layer for many experts: tokens routed in the gate's tile, grouped per expert in-kernel",
    ops=("mlit::dispatch_moe", "mlit::dispatch_moe_backward"),
    sources=("mlit_kernels.dispatch.kernels", "mlit_kernels.dispatch.launch", "mlit_kernels.dispatch.ops",
             "mlit_kernels.dispatch.moe", "mlit_kernels.dense.kernels", "mlit_kernels.common.gating",
             "mlit_kernels.common.settings", "mlit_kernels.common.tiling", "mlit_kernels.common.precision",
             "mlit_kernels.common.device_model", "mlit_kernels.common.seed"),
    kernels={"_gate_route_kernel": gate_route_flops, "_experts_fwd_kernel": experts_fwd_flops,
             "_combine_kernel": None, "_experts_bwd_kernel": experts_bwd_flops, "_weights_dx_kernel": weights_flops,
             "_shared_grads_kernel": None},
    launches={"forward": 3, "backward": 3, "eval": 3},
    dtypes=(torch.float16, torch.bfloat16, torch.float32),
    limits="any t and k ≤ t; shared V / W2 or one per expert (shared=()); the LayerNorm runs before it in torch",
    check="mlit_kernels.selfcheck:dispatch_check",  # the layer against its float64 reference
    small_shapes=({"m": 16, "d_h": 24, "t": 12, "k": 3, "N": 37},),
    gpu_shapes=({"m": 144, "d_h": 144, "t": 16, "k": 2, "N": 4133}, {"m": 108, "d_h": 27, "t": 64, "k": 2, "N": 4133},
                {"m": 144, "d_h": 144, "t": 3, "k": 2, "N": 4133}),
)

__all__ = ["FAMILY", "gate_route_flops", "experts_fwd_flops", "experts_bwd_flops", "weights_flops"]
