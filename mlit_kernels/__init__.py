"""Fused Mixture-of-Experts kernels for mLiT: the reference path, the Triton kernels and the nn.Module.

``mlit_kernels`` depends on torch and triton only (it never imports ``mlit``), so a user can
swap :class:`SharedSwiGLUMoE` into a model of their own.

The Triton modules (``gate``, ``dispatch``, ``swiglu``, ``functions``) are imported lazily, on
first use of ``moe_triton``/``gate_noise``/``choose_variant`` or of ``backend="triton"``: Triton
decides at kernel-definition time whether to compile or interpret, so ``TRITON_INTERPRET=1`` (for
CPU runs) only has to be set before that first use, not before ``import mlit_kernels``.
"""

from . import reference
from .layer import SharedSwiGLUMoE

_LAZY = {"moe_triton", "gate_noise", "choose_variant", "NoisyTopKGate", "SharedSwiGLUExperts"}

__all__ = [
    "NoisyTopKGate",
    "SharedSwiGLUExperts",
    "SharedSwiGLUMoE",
    "choose_variant",
    "gate_noise",
    "moe_triton",
    "reference",
]


def __getattr__(name):
    if name in _LAZY:
        from . import functions

        return getattr(functions, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
