"""The MAE-loss family's descriptor (Triton-free): :data:`FAMILY`."""

from __future__ import annotations

import torch

from ..common.family import Family
from ..common.precision import TOL, max_row_error, tolerance


def check(shape, dtype: torch.dtype, device: torch.device) -> dict[str, tuple[float, float]]:
    """The loss and its metrics, d pred and d moe_loss, for B images of S×S pixels in P×P patches,
    pred in ``dtype`` read through the decoder's [:, :-1] slice, three quarters of the patches
    hidden, against the float64 reference on the same values."""
    from .ops import fused_mae_loss
    from .reference import mae_loss_reference

    b, size, p = shape["B"], shape["S"], shape["P"]
    patches, values = (size // p) ** 2, 3 * p * p
    g = torch.Generator().manual_seed(b * 100 + size)
    images = torch.randn(b, 3, size, size, generator=g).to(device)
    leaf = torch.randn(b, patches + 1, values, generator=g).to(device, dtype)
    mask = (torch.rand(b, patches, generator=g) < 0.75).float().to(device)
    mask[:, 0], mask[:, 1] = 1.0, 0.0  # some hidden, some visible in every image
    moe = torch.rand((), generator=g).to(device)

    def run(fn, pred, images, mask, moe):
        pred, moe = pred.detach().clone().requires_grad_(), moe.detach().clone().requires_grad_()
        loss, metrics = fn(images, pred[:, :-1], mask, moe, p, 0.1, 0.5)
        (loss * 7.0).backward()
        return metrics, pred.grad[:, :-1], moe.grad

    metrics, dpred, dmoe = run(fused_mae_loss, leaf, images, mask, moe)
    metrics_r, dpred_r, dmoe_r = run(mae_loss_reference, leaf.double(), images.double(), mask.double(), moe.double())
    exact = TOL[torch.float32]
    return {"metrics": (max_row_error(metrics, metrics_r), exact), "dpred": (max_row_error(dpred, dpred_r),
                                                                             tolerance(dtype)),
            "dmoe_loss": (max_row_error(dmoe, dmoe_r), exact)}


FAMILY = Family(
    name="mae_loss",
    module=__name__,
    summary="the MAE loss (Eq. 16): MSE on hidden + α · MSE on visible patches + β · the MoE losses",
    ops=("mlit::mae_loss", "mlit::mae_loss_backward"),
    sources=("mlit_kernels.mae_loss.kernels", "mlit_kernels.mae_loss.ops"),
    kernels={"_mae_loss_part_kernel": None, "_mae_loss_sum_kernel": None, "_mae_loss_bwd_kernel": None},
    launches={"forward": 2, "backward": 1, "eval": 2},
    dtypes=(torch.float16, torch.bfloat16, torch.float32),
    limits="images (B, C, H, W) in P×P patches, pred (B, patches, C·P·P) any strides, C·P·P ≤ 2048",
    check=check,
    small_shapes=({"B": 3, "S": 36, "P": 3},),
    gpu_shapes=({"B": 256, "S": 36, "P": 3},),
)

__all__ = ["FAMILY", "check"]
