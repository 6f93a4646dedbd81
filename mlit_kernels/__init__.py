"""Fused Triton kernels for mLiT and mmLiT, their plain-PyTorch references, and the MoE layer.

``mlit_kernels`` depends on torch and triton only (it never imports ``mlit``), so a user can swap
:class:`SharedSwiGLUMoE` into a model of their own.

The Triton modules are imported lazily, on first use of ``moe_triton`` / ``gate_noise`` / ``ops``
or of a Triton backend: Triton decides at kernel-definition time whether to compile or interpret,
so ``TRITON_INTERPRET=1`` (for CPU runs) only has to be set before that first use, not before
``import mlit_kernels``.

Layout: the MoE layer — :mod:`.reference` (the paper's equations in plain PyTorch), :mod:`.layer`
(the nn.Module), :mod:`.functional` (``moe_triton``: checks, then the variant), :mod:`.variants`
(which variant runs), :mod:`.selfcheck` (its kernels against the reference); the kernel families,
one folder each with the same parts — kernels, launch code, ``torch.library`` ops, reference,
``family.py`` descriptor — listed in :mod:`.registry`: :mod:`.dense` and :mod:`.dispatch` (the MoE
layer's two variants), :mod:`.attention`, :mod:`.norm_linear`, :mod:`.patch_embed`, :mod:`.loss`,
:mod:`.augment`, :mod:`.mae_tokens`, :mod:`.mae_loss`; :mod:`.common` (what families share:
settings, the precision table, the custom-op helper, the ordered split sum, tiling, the tuner,
clearance and the machine cache); :mod:`.checks` (a family's check in a child process);
:mod:`.ops` (every custom op); :mod:`.meter`.

Adding a family: a folder ``mlit_kernels/<name>/`` with those parts and its name in
:data:`.registry.NAMES`.
"""

from . import reference
from .common.lazy import lazy_exports
from .layer import SharedSwiGLUMoE, collect_aux_loss

__getattr__ = lazy_exports(__name__, {"moe_triton": ".functional", "gate_noise": ".common.gating", "ops": ".ops"})

__all__ = ["SharedSwiGLUMoE", "collect_aux_loss", "gate_noise", "moe_triton", "ops", "reference"]
