"""Fused Mixture-of-Experts kernels for mLiT: the reference path and the nn.Module.

``mlit_kernels`` depends on torch and triton only (it never imports ``mlit``), so a user can
swap :class:`SharedSwiGLUMoE` into a model of their own.
"""

from . import reference
from .layer import SharedSwiGLUMoE

__all__ = ["SharedSwiGLUMoE", "reference"]
