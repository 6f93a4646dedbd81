"""Which Triton path runs, and in which dtype: the one place these are decided (Triton-free, so the
layer can ask before any kernel is defined).

* ``"dense"`` — few experts (t ≤ :data:`DENSE_LIMIT`): the fused kernels of
  :mod:`mlit_kernels.fused`; every expert a token tile routes to is computed for the tile and
  masked by the gates, no routing.
* ``"dispatch"`` — many experts: a gate kernel, tokens grouped by expert, grouped GEMMs.
* ``"auto"`` — dense up to :data:`DENSE_AUTO_MAX` experts, dispatch above: a fixed rule, so no
  timing runs inside a training step.
"""

from __future__ import annotations

import torch

VARIANTS = ("auto", "dense", "dispatch")
DENSE_AUTO_MAX = 8
DENSE_LIMIT = 16  # the fused kernels hold the gate in one 16-column tile
COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def resolve_variant(variant: str, num_experts: int) -> str:
    """The variant that runs for ``variant`` ("auto", "dense" or "dispatch") at t experts."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if variant == "auto":
        return "dense" if num_experts <= DENSE_AUTO_MAX else "dispatch"
    if variant == "dense" and num_experts > DENSE_LIMIT:
        raise ValueError(f"variant 'dense' supports up to {DENSE_LIMIT} experts, got {num_experts}; use 'dispatch'")
    return variant


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the expert products run in: autocast's when it is on for x's device, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


__all__ = ["VARIANTS", "DENSE_AUTO_MAX", "DENSE_LIMIT", "COMPUTE_DTYPES", "resolve_variant", "compute_dtype"]
