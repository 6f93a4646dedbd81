"""The random resized crop's aspect ratio, computed alike by the torch path
(:mod:`mlit_kernels.augment.reference`) and the crop kernel (:mod:`mlit_kernels.augment.kernels`),
which both import it (torch only, no Triton).

The ratio is exp(z), z uniform on [log 3/4, log 4/3]. torch.exp and tl.exp (an approximate
instruction on GPUs) differ by an ulp or two, enough to move a box by a pixel; both paths
instead evaluate exp's Taylor polynomial of degree 8 (truncation < 1e-9 relative; within 0.8 ulp
of exp over the range) by Horner with every multiply and add rounded (no fused multiply-add), so
they compute the same float on every device and their crop boxes agree bit for bit.
"""

from __future__ import annotations

import math

import torch

LOG_RATIO = (math.log(3 / 4), math.log(16 / 9))  # the crop's log aspect ratio: low, span
EXP_TAYLOR = tuple(1.0 / math.factorial(i) for i in range(9))  # exp's Taylor coefficients, degree 0..8


def exp_taylor(z: torch.Tensor) -> torch.Tensor:
    """exp(z) for |z| <= log(4/3), fp32, any shape (see the module docstring)."""
    p = z * EXP_TAYLOR[8] + EXP_TAYLOR[7]
    for c in reversed(EXP_TAYLOR[:7]):
        p = p * z + c
    return p


__all__ = ["LOG_RATIO", "EXP_TAYLOR", "exp_taylor"]
