"""Which Triton kernel families have run correctly on a GPU, and whether an uncleared one may run there.

The kernels are tested under Triton's CPU interpreter; only a GPU shows what the compiler makes of
them. The dense MoE kernels passed every interpreter test and still faulted at their first GPU
launch (illegal memory access; NVIDIA H200, Triton 3.6.0, 2026-12-04) — a fault after which no
fallback in the same process can run. So on CUDA the automatic choices (``"auto"`` variants and
backends) take a family's kernels only once a GPU run has cleared it (:data:`CLEARED`); off CUDA
(the interpreter, the meters) always. ``MLIT_UNCLEARED_KERNELS=1`` lets the automatic choices take
uncleared families too — what a GPU session sets to clear them. A family asked for by name
(``triton_variant="dense"``) runs whatever this says.
"""

from __future__ import annotations

import os

import torch

#: family -> the GPU run that cleared it (device torch reports, Triton version, date; bench/RESULTS.md)
#: The families: "dense", "dispatch" (the MoE variants), "attention" (mlit_kernels.attention),
#: "loss" (mlit.train.loss), "patch_embed" (mlit.models.embed_kernels), "augment" (mlit.data),
#: "norm_linear" (mlit_kernels.norm_linear: the classifier head and the MAE projections on their norms),
#: "mae_tokens" (mlit.models.mae_token_kernels: the MAE encoder's and decoder's inputs), "mae_loss"
#: (mlit.models.mae_kernels).
FAMILIES = ("dense", "dispatch", "attention", "loss", "patch_embed", "augment", "norm_linear", "mae_tokens",
            "mae_loss")
CLEARED = {
    "dispatch": "NVIDIA H200, Triton 3.6.0, 2026-12-04: gate race, fresh-process and float64 checks passed",
}
ENV = "MLIT_UNCLEARED_KERNELS"


def may_run(family: str, device: torch.device | str | None) -> bool:
    """Whether an automatic choice may run ``family``'s kernels on ``device`` (None: not CUDA)."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if device is None or torch.device(device).type != "cuda" or family in CLEARED:
        return True
    value = os.environ.get(ENV, "0")
    if value not in ("0", "1"):
        raise ValueError(f"{ENV} must be 0 or 1, got {value!r}")
    return value == "1"


__all__ = ["FAMILIES", "CLEARED", "ENV", "may_run"]
