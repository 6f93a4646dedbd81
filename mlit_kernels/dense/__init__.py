"""The dense variant (few experts, t ≤ 16): the whole MoE layer in two forward and three backward
launches, every expert a token tile routes to computed for the tile and masked by the gates.

:mod:`.kernels` (Triton), :mod:`.launch` (shapes, tuning, buffers, the forward and backward
launchers), :mod:`.ops` (the custom ops ``mlit::fused_moe`` / ``mlit::fused_moe_backward``, their
forms with a LayerNorm folded in ``mlit::fused_norm_moe`` / ``mlit::fused_norm_moe_backward``, and
:func:`~.ops.moe_dense`, this variant's entry in :data:`mlit_kernels.variants.IMPLEMENTATIONS`),
:mod:`.family` (the descriptor); the reference is the MoE layer's, :mod:`mlit_kernels.reference`.
The names below are imported on first use (no kernel is defined by importing the package).
"""

from ..common.lazy import lazy_exports
from .family import FAMILY

_EXPORTS = {name: ".launch" for name in ("CONFIGS", "TUNER", "Config", "force_config")}
_EXPORTS.update({name: ".ops" for name in ("fused_moe", "fused_moe_backward", "fused_norm_moe",
                                            "fused_norm_moe_backward", "moe_dense")})
__getattr__ = lazy_exports(__name__, _EXPORTS)

__all__ = ["FAMILY", *_EXPORTS]
