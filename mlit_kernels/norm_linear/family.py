"""The LayerNorm + Linear family's descriptor (Triton-free): :data:`FAMILY` (the attention block's
LayerNorm + projection kernels, launched without the residual)."""

from __future__ import annotations

import torch

from ..attention.family import ln_qkv_bwd_flops, ln_qkv_fwd_flops
from ..common.checking import forward_backward, row_errors
from ..common.family import Family
from ..common.precision import tolerance


def check(shape, dtype: torch.dtype, device: torch.device) -> dict[str, tuple[float, float]]:
    """y = Linear(LayerNorm(x)) and every gradient for the dummy tokens x[:, -1] of (B, n, D) tokens
    (rows a stride apart: no copy), E outputs, computing in ``dtype`` (fp32 weights), against the
    float64 reference on the values the kernels see."""
    from .ops import norm_linear
    from .reference import norm_linear_reference

    b, n, d, e = shape["B"], shape["n"], shape["D"], shape["E"]
    g = torch.Generator().manual_seed(b * 100 + d + e)
    tokens = torch.randn(b, n, d, generator=g)
    weights = [1 + 0.1 * torch.randn(d, generator=g), 0.1 * torch.randn(d, generator=g),
               torch.randn(e, d, generator=g) * d ** -0.5, 0.1 * torch.randn(e, generator=g)]
    dy = torch.randn(b, e, generator=g)

    wrt = range(len(weights) + 1)
    got = forward_backward(lambda t, *w: norm_linear(t[:, -1], *w, dtype=dtype),
                           [tokens.to(device, dtype), *(w.to(device) for w in weights)], wrt, dy)
    want = forward_backward(lambda t, *w: norm_linear_reference(t[:, -1], *w),
                            [tokens.to(dtype).double(), *(w.to(dtype).double() for w in weights)], wrt, dy.to(dtype))
    return row_errors(("y", "dx", "dln_w", "dln_b", "dw", "db"), got, want, tolerance(dtype))


FAMILY = Family(
    name="norm_linear",
    module=__name__,
    summary="Linear(LayerNorm(x)): the classifier head on the final norm, the MAE's two projections",
    ops=("mlit::norm_linear", "mlit::norm_linear_backward"),
    sources=("mlit_kernels.norm_linear.ops", "mlit_kernels.attention.kernels", "mlit_kernels.attention.launch",
             "mlit_kernels.common.split_sum", "mlit_kernels.common.precision", "mlit_kernels.common.tiling"),
    kernels={"_ln_qkv_fwd_kernel": ln_qkv_fwd_flops, "_ln_qkv_bwd_kernel": ln_qkv_bwd_flops, "_split_sum_kernel": None},
    launches={"forward": 1, "backward": 2, "eval": 1},
    dtypes=(torch.float16, torch.bfloat16, torch.float32),
    limits="x (..., D) with a contiguous last dimension (rows any stride apart), D ≤ 256; w (E, D)",
    check=check,
    small_shapes=({"B": 5, "n": 7, "D": 27, "E": 10},),
    gpu_shapes=({"B": 256, "n": 145, "D": 108, "E": 100}, {"B": 256, "n": 145, "D": 108, "E": 27}),
)

__all__ = ["FAMILY", "check"]
