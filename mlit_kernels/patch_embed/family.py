"""The patch-embedding family's descriptor (Triton-free): :data:`FAMILY`."""

from __future__ import annotations

import torch

from ..common.checking import forward_backward, row_errors
from ..common.family import Family
from ..common.precision import tolerance


def flops(a) -> int:
    """Per token (patches + the dummy) its C·P·P values times Wᵀ (forward), or their product with
    the token's gradient (dW, backward)."""
    p = a["P"]
    tokens = a["B"] * ((a["H"] // p) * (a["W"] // p) + 1)
    return tokens * 2 * a["C"] * p * p * a["M"]


def check(shape, dtype: torch.dtype, device: torch.device) -> dict[str, tuple[float, float]]:
    """tokens, d weight and d pos of B images (3, S, S) in P×P patches, width M, the weights in
    ``dtype`` (fp32 accumulation), against the float64 reference on the same values."""
    from .ops import fused_patch_embed
    from .reference import patch_embed_reference

    b, size, p, m = shape["B"], shape["S"], shape["P"], shape["M"]
    g = torch.Generator().manual_seed(b * 100 + m)
    images = torch.randn(b, 3, size, size, generator=g)
    weight = (torch.randn(m, 3 * p * p, generator=g) / (3 * p * p) ** 0.5).to(dtype)
    pos = (torch.randn(1, (size // p) ** 2 + 1, m, generator=g) * 0.02).to(dtype)
    grad = torch.randn(b, (size // p) ** 2 + 1, m, generator=g)

    got = forward_backward(fused_patch_embed, [images.to(device), weight.to(device), pos.to(device), p], (1, 2), grad)
    want = forward_backward(patch_embed_reference, [images.double(), weight.double(), pos.double(), p], (1, 2), grad)
    return row_errors(("tokens", "dweight", "dpos"), got, want, tolerance(dtype))


FAMILY = Family(
    name="patch_embed",
    module=__name__,
    summary="P×P patches + an all-zero dummy patch, times Wᵀ (no bias), + the position table",
    ops=("mlit::patch_embed", "mlit::patch_embed_backward"),
    sources=("mlit_kernels.patch_embed.kernels", "mlit_kernels.patch_embed.ops", "mlit_kernels.common.split_sum"),
    kernels={"_embed_fwd_kernel": flops, "_embed_bwd_kernel": flops, "_split_sum_kernel": None},
    launches={"forward": 1, "backward": 2, "eval": 1},
    dtypes=(torch.float16, torch.bfloat16, torch.float32),
    limits="images (B, C, H, W) in P×P patches; at most 256 output features",
    check=check,
    small_shapes=({"B": 2, "S": 12, "P": 3, "M": 24},),
    gpu_shapes=({"B": 256, "S": 36, "P": 3, "M": 108}, {"B": 256, "S": 36, "P": 3, "M": 144}),
)

__all__ = ["FAMILY", "check", "flops"]
