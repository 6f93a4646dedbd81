"""Every Triton kernel of the package as a ``torch.library`` custom op (the only callers of the
kernels), registered in one namespace: importing this module defines every family's ops
(``mlit_kernels.<family>.ops``), so ``torch.ops.mlit.<name>`` exists for each op a family's
descriptor lists (:mod:`mlit_kernels.registry`). The MoE layer's and the attention block's ops are
also attributes here: ``mlit_kernels.ops.fused_moe`` is ``torch.ops.mlit.fused_moe``.

Each op has a fake (meta) implementation with exact output shapes and dtypes and the forward ops
their autograd (:func:`mlit_kernels.common.custom_op.custom_op`), so ``torch.compile`` traces a
model through them without graph breaks and CUDA graphs capture them (no host reads: the Philox
seed is a device tensor the kernels load). Limitation: no double backward (the backward ops have
no autograd).
"""

import importlib

from .attention.ops import fused_attention_block, fused_attention_block_backward
from .dense.ops import fused_moe, fused_moe_backward, fused_norm_moe, fused_norm_moe_backward
from .dispatch.ops import dispatch_moe, dispatch_moe_backward
from .registry import NAMES

for _name in NAMES:
    importlib.import_module(f"{__package__}.{_name}.ops")

__all__ = ["fused_moe", "fused_moe_backward", "fused_norm_moe", "fused_norm_moe_backward", "dispatch_moe",
           "dispatch_moe_backward", "fused_attention_block", "fused_attention_block_backward"]
