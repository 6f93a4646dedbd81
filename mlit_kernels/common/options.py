"""The scalar options of one MoE call, carried as one value on the Python side (the custom ops'
schemas stay flat: ``op(..., *options)``; ``MoEOptions(*flat)`` rebuilds it)."""

from __future__ import annotations

from typing import NamedTuple

import torch


class MoEOptions(NamedTuple):
    """k experts a token; training / noisy gating / dropout as the layer runs them (already
    resolved: ``noisy`` and ``dropout`` only count in training); the noise scale's epsilon; the
    balancing loss's weights and CV form; the compute dtype of the expert products; whether the
    auxiliary loss is wanted (False skips its launch in evaluation; training always computes the
    statistics its backward needs)."""

    k: int
    training: bool
    noisy: bool
    dropout: float
    noise_eps: float
    w_importance: float
    w_load: float
    squared_cv: bool
    unbiased_cv: bool
    dtype: torch.dtype
    need_aux: bool


__all__ = ["MoEOptions"]
