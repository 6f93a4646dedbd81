"""The MoE layer for many experts (t > :data:`mlit_kernels.variants.DENSE_AUTO_MAX`): a gate that
routes in-tile, experts over tokens grouped per expert and gathered in-kernel, three launches
forward and two backward, three with shared V/W2 (:mod:`.kernels`, :mod:`.launch`, :mod:`.ops`;
:mod:`.family` the descriptor; the reference is the MoE layer's, :mod:`mlit_kernels.reference`).
Entry: :func:`moe_dispatch`, imported on first use; shared V/W2 (the paper's layer) and
per-expert projections alike.
"""

from ..common.lazy import lazy_exports
from .family import FAMILY

__getattr__ = lazy_exports(__name__, {"moe_dispatch": ".moe"})

__all__ = ["FAMILY", "moe_dispatch"]
