"""The fused pre-norm attention half-block ``y = x + proj(GQA(LN(x)))`` for the paper's tiny heads
(head dims 8-64, any token count, widths up to 256): two forward and four backward launches.

:mod:`.reference` (plain PyTorch, the oracle), :mod:`.kernels` (Triton), :mod:`.launch` (shapes,
tiles, tuning, buffers), :mod:`.ops` (the custom ops ``mlit::attention_block`` /
``mlit::attention_block_backward`` and :func:`~.ops.attention_block`, the checked entry point).
Importing this package imports Triton: import it after setting ``TRITON_INTERPRET``.
"""

from .launch import CONFIGS, TUNER, Config, force_config
from .ops import attention_block, supports
from .reference import attention_block_reference

__all__ = ["CONFIGS", "TUNER", "Config", "force_config", "attention_block", "attention_block_reference", "supports"]
