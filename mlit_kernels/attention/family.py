"""The attention half-block family's descriptor (Triton-free): :data:`FAMILY`, and the FLOP models
of its kernels (the LayerNorm + projection kernels are shared with ``norm_linear``)."""

from __future__ import annotations

import torch

from ..common.checking import forward_backward, row_errors
from ..common.family import Family
from ..common.precision import tolerance


def _pairs(a) -> int:
    """(query, key) pairs of every head: N tokens × n keys × H heads (N from the qkv buffer)."""
    return a["qkv_ptr"].shape[0] * a["n_tok"] * a["H"]


def ln_qkv_fwd_flops(a) -> int:
    """LN(x) W_qkvᵀ."""
    return 2 * a["N"] * a["D"] * a["E"]


def attn_fwd_flops(a) -> int:
    """q kᵀ and p v of every head, then the output projection."""
    return 4 * _pairs(a) * a["HD"] + 2 * a["qkv_ptr"].shape[0] * a["D"] ** 2


def proj_bwd_flops(a) -> int:
    """dy W_proj (dO) and dyᵀ o (dW_proj)."""
    return 4 * a["N"] * a["D"] ** 2


def attn_bwd_flops(a) -> int:
    """Key-tile programs: q kᵀ recomputed, pᵀ dO, dO vᵀ, dsᵀ q; query-tile programs: q kᵀ, dO vᵀ, ds k."""
    return 14 * _pairs(a) * a["HD"]


def ln_qkv_bwd_flops(a) -> int:
    """dqkvᵀ LN(x) (dW_qkv), and dqkv W_qkv twice (for dx in the token-tile programs, for dγ, dβ in the splits)."""
    return 6 * a["N"] * a["D"] * a["E"]


def inputs(b: int, n: int, d: int, h: int, groups: int, seed: int = 0) -> tuple:
    """Random (x (B, n, D), [γ, β, W_qkv, b_qkv, W_proj, b_proj], dy (B, n, D)) of the block at its
    weights' usual scales, fp32 on the CPU."""
    g = torch.Generator().manual_seed(seed)
    e = d + 2 * groups * (d // h)

    def r(*size, scale=1.0):
        return torch.randn(*size, generator=g) * scale

    x = r(b, n, d)
    weights = [1 + r(d, scale=0.1), r(d, scale=0.1), r(e, d, scale=d ** -0.5), r(e, scale=0.1),
               r(d, d, scale=d ** -0.5), r(d, scale=0.1)]
    return x, weights, r(b, n, d)


def check(shape, dtype: torch.dtype, device: torch.device) -> dict[str, tuple[float, float]]:
    """y = x + proj(GQA(LN(x))) and every gradient (x, γ, β, W_qkv, b_qkv, W_proj, b_proj) of B
    sequences of n tokens, width D, H heads in G groups, computing in ``dtype``, against the float64
    reference on the values the kernels see (x and the weights rounded to ``dtype``)."""
    from .ops import attention_block
    from .reference import attention_block_reference

    h, groups = shape["H"], shape["G"]
    x, weights, dy = inputs(shape["B"], shape["n"], shape["D"], h, groups, seed=shape["B"] * 1000 + shape["n"])
    wrt = range(len(weights) + 1)
    got = forward_backward(attention_block, [x.to(device, dtype), *(w.to(device) for w in weights), h, groups], wrt,
                           dy.to(device, dtype))
    want = forward_backward(attention_block_reference, [x.to(dtype).double(), *(w.to(dtype).double() for w in weights),
                                                        h, groups], wrt, dy.to(dtype))
    names = ("y", "dx", "dln_w", "dln_b", "dqkv_w", "dqkv_b", "dproj_w", "dproj_b")
    return row_errors(names, got, want, tolerance(dtype))


FAMILY = Family(
    name="attention",
    module=__name__,
    summary="the pre-norm attention half-block x + proj(GQA(LayerNorm(x))) for tiny heads",
    ops=("mlit::attention_block", "mlit::attention_block_backward"),
    sources=("mlit_kernels.attention.kernels", "mlit_kernels.attention.launch", "mlit_kernels.attention.ops",
             "mlit_kernels.common.split_sum", "mlit_kernels.common.precision", "mlit_kernels.common.tiling"),
    kernels={"_ln_qkv_fwd_kernel": ln_qkv_fwd_flops, "_attn_fwd_kernel": attn_fwd_flops,
             "_proj_bwd_kernel": proj_bwd_flops, "_attn_bwd_kernel": attn_bwd_flops,
             "_ln_qkv_bwd_kernel": ln_qkv_bwd_flops, "_split_sum_kernel": None},
    launches={"forward": 2, "backward": 4, "eval": 2},
    dtypes=(torch.float16, torch.bfloat16, torch.float32),
    limits="x (B, n, D), D ≤ 256, head dim D/H ≤ 64, G divides H; any token count",
    check=check,
    small_shapes=({"B": 1, "n": 37, "D": 54, "H": 6, "G": 2},),
    gpu_shapes=({"B": 256, "n": 145, "D": 108, "H": 6, "G": 3}, {"B": 256, "n": 145, "D": 144, "H": 8, "G": 4}),
)

__all__ = ["FAMILY", "check", "inputs", "ln_qkv_fwd_flops", "ln_qkv_bwd_flops", "attn_fwd_flops", "attn_bwd_flops",
           "proj_bwd_flops"]
