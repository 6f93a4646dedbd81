"""Which Triton variant runs, and in which dtype: the one place these are decided, and the map from
a variant's name to its implementation (Triton-free: the layer can ask before any kernel is
defined; an implementation's module is imported on first use).

* ``"dense"`` — few experts (t ≤ :data:`DENSE_LIMIT`): :mod:`mlit_kernels.dense`; every expert a
  token tile routes to is computed for the tile and masked by the gates, no routing.
* ``"dispatch"`` — many experts, and per-expert V / W_2 (shared=()): a gate that routes in its
  token tile, experts over tokens grouped per expert and gathered in-kernel, a combine
  (:mod:`mlit_kernels.dispatch`).
* ``"auto"`` — dense up to :data:`DENSE_AUTO_MAX` experts, dispatch above: a fixed rule, so no
  timing runs inside a training step. On CUDA dense only once it is cleared on the GPU present
  (:mod:`mlit_kernels.common.clearance`: its first GPU launch faulted on 2026-12-04), dispatch
  otherwise (which runs only once cleared itself, :meth:`mlit_kernels.SharedSwiGLUMoE.uses_triton`).

An implementation is ``fn(x, params, seed, noise, options) -> (y, aux_loss)``: x (N, m) and the
eight parameters contiguous, noise fp32 or None, seed as the caller gave it (None, an int or a
(1,) int64 tensor), options a :class:`mlit_kernels.common.options.MoEOptions`.
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch

from .common.clearance import may_run
from .common.family import Family
from .common.settings import BLOCK_T
from .dense.family import FAMILY as DENSE
from .dispatch.family import FAMILY as DISPATCH

IMPLEMENTATIONS = {  # variant -> "module:function", relative to this package
    "dense": ".dense.ops:moe_dense",
    "dispatch": ".dispatch.moe:moe_dispatch",
}
FAMILIES: dict[str, Family] = {"dense": DENSE, "dispatch": DISPATCH}  # variant -> its kernel family
VARIANTS = ("auto", *IMPLEMENTATIONS)
DENSE_AUTO_MAX = 8
DENSE_LIMIT = BLOCK_T  # the dense kernels hold the gate in one BLOCK_T-column tile


def resolve_variant(variant: str, num_experts: int, per_expert: bool = False,
                    device: torch.device | str | None = None) -> str:
    """The variant that runs for ``variant`` ("auto", "dense" or "dispatch") at t experts;
    ``per_expert``: V / W_2 have one matrix per expert (shared=()), which only "dispatch" runs;
    ``device``: where it runs (None: not CUDA)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if per_expert:
        if variant == "dense":
            raise ValueError("variant 'dense' needs V and W2 shared (shared=('v', 'w2')); use 'dispatch'")
        return "dispatch"
    if variant == "auto":
        return "dense" if num_experts <= DENSE_AUTO_MAX and may_run(DENSE, device) else "dispatch"
    if variant == "dense" and num_experts > DENSE_LIMIT:
        raise ValueError(f"variant 'dense' supports up to {DENSE_LIMIT} experts, got {num_experts}; use 'dispatch'")
    return variant


def implementation(variant: str) -> Callable:
    """The function that runs a resolved ``variant`` (imports its module: defines its Triton kernels)."""
    module, name = IMPLEMENTATIONS[variant].split(":")
    return getattr(importlib.import_module(module, __package__), name)


__all__ = ["VARIANTS", "IMPLEMENTATIONS", "FAMILIES", "DENSE_AUTO_MAX", "DENSE_LIMIT", "resolve_variant",
           "implementation"]
