"""Every Triton kernel of the package as a ``torch.library`` custom op (the only callers of the
kernels), gathered in one namespace: ``mlit_kernels.ops.fused_moe`` is ``torch.ops.mlit.fused_moe``.

* dense variant (:mod:`mlit_kernels.dense.ops`): ``fused_moe``, ``fused_moe_backward``, and
  ``fused_norm_moe``, ``fused_norm_moe_backward`` (a LayerNorm before the layer folded in);
* dispatch variant (:mod:`mlit_kernels.dispatch.ops`): ``dispatch_moe``, ``dispatch_moe_backward``;
* the attention half-block (:mod:`mlit_kernels.attention.ops`): ``fused_attention_block``
  (``mlit::attention_block``), ``fused_attention_block_backward``.

Each has a fake (meta) implementation with exact output shapes and dtypes and the forward ops
their autograd, so ``torch.compile`` traces a model through them without graph breaks and CUDA
graphs capture them (no host reads: the Philox seed is a device tensor the kernels load).
Limitation: no double backward (the backward ops have no autograd).
"""

from .attention.ops import fused_attention_block, fused_attention_block_backward
from .dense.ops import fused_moe, fused_moe_backward, fused_norm_moe, fused_norm_moe_backward
from .dispatch.ops import dispatch_moe, dispatch_moe_backward

__all__ = ["fused_moe", "fused_moe_backward", "fused_norm_moe", "fused_norm_moe_backward", "dispatch_moe",
           "dispatch_moe_backward", "fused_attention_block", "fused_attention_block_backward"]
