"""The MoE layer for many experts (t > :data:`mlit_kernels.variants.DENSE_AUTO_MAX`): a gate that
routes in-tile, experts over tokens grouped per expert and gathered in-kernel, three launches
forward and two backward, three with shared V/W2 (:mod:`.kernels`, :mod:`.launch`, :mod:`.ops`). Entry:
:func:`moe_dispatch`; shared V/W2 (the paper's layer) and per-expert projections alike.
"""

from .moe import moe_dispatch

__all__ = ["moe_dispatch"]
