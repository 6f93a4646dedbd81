"""The classification-loss family's descriptor (Triton-free): :data:`FAMILY`."""

from __future__ import annotations

import torch

from ..common.family import Family
from ..common.precision import TOL, max_row_error, tolerance


def check(shape, dtype: torch.dtype, device: torch.device) -> dict[str, tuple[float, float]]:
    """The loss, its metrics, d logits and d aux, and evaluation's sums, of logits (B, C) in ``dtype``
    (a tie in row 0: the first index is the argmax) against the float64 reference on the same values."""
    from .ops import fused_classification_loss, fused_eval_sums
    from .reference import classification_loss_reference, eval_sums_reference

    b, c = shape["B"], shape["C"]
    g = torch.Generator().manual_seed(b * 1000 + c)
    logits = (torch.randn(b, c, generator=g) * 3).to(device, dtype)
    logits[0, :2] = logits[0, :2].max()
    labels = torch.randint(0, c, (b,), generator=g).to(device)
    aux = torch.rand((), generator=g).to(device)

    def run(fn, z, a):
        z, a = z.detach().clone().requires_grad_(), a.detach().clone().requires_grad_()
        loss, metrics = fn(z, labels, a, 0.1, 0.01)
        (loss * 7.0).backward()
        return metrics, z.grad, a.grad

    metrics, dz, da = run(fused_classification_loss, logits, aux)
    metrics_r, dz_r, da_r = run(classification_loss_reference, logits.double(), aux.double())
    sums = torch.tensor([5.0, 1.5, 2.0], dtype=torch.float64, device=device)
    sums_r = sums.clone().cpu()
    fused_eval_sums(logits, labels, sums)
    eval_sums_reference(logits.double().cpu(), labels.cpu(), sums_r)
    exact = TOL[torch.float32]
    return {"metrics": (max_row_error(metrics, metrics_r), exact), "dlogits": (max_row_error(dz, dz_r), tolerance(dtype)),
            "daux": (max_row_error(da, da_r), exact), "eval sums": (max_row_error(sums, sums_r), exact)}


FAMILY = Family(
    name="loss",
    module=__name__,
    summary="cross-entropy with label smoothing + w_aux · the MoE auxiliary loss, its metrics; evaluation's sums",
    ops=("mlit::classification_loss", "mlit::classification_loss_backward", "mlit::classification_eval_sums"),
    sources=("mlit_kernels.loss.kernels", "mlit_kernels.loss.ops"),
    kernels={"_loss_fwd_kernel": None, "_loss_bwd_kernel": None, "_eval_sums_kernel": None},
    launches={"forward": 1, "backward": 1, "eval": 1},
    dtypes=(torch.float16, torch.bfloat16, torch.float32),
    limits="logits (B, C), C ≤ 4096 classes; labels int64 / int32",
    check=check,
    small_shapes=({"B": 37, "C": 10},),
    gpu_shapes=({"B": 256, "C": 10}, {"B": 256, "C": 100}),
)

__all__ = ["FAMILY", "check"]
