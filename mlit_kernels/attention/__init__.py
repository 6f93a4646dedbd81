"""The fused pre-norm attention half-block ``y = x + proj(GQA(LN(x)))`` for the paper's tiny heads
(head dims 8-64, any token count, widths up to 256): two forward and four backward launches.

:mod:`.reference` (plain PyTorch, the oracle), :mod:`.kernels` (Triton), :mod:`.launch` (shapes,
tiles, tuning, buffers), :mod:`.ops` (the custom ops ``mlit::attention_block`` /
``mlit::attention_block_backward`` and :func:`~.ops.attention_block`, the checked entry point),
:mod:`.family` (the descriptor). The Triton names are imported on first use (no kernel is defined
by importing the package).
"""

from ..common.lazy import lazy_exports
from .family import FAMILY
from .reference import attention_block_reference

_EXPORTS = {name: ".launch" for name in ("CONFIGS", "TUNER", "Config", "force_config")}
_EXPORTS.update({name: ".ops" for name in ("attention_block", "supports")})
__getattr__ = lazy_exports(__name__, _EXPORTS)

__all__ = ["FAMILY", "attention_block_reference", *_EXPORTS]
