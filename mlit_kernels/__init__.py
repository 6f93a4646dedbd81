"""Fused Mixture-of-Experts kernels for mLiT: the reference path, the Triton kernels and the nn.Module.

``mlit_kernels`` depends on torch and triton only (it never imports ``mlit``), so a user can
swap :class:`SharedSwiGLUMoE` into a model of their own.

The Triton modules are imported lazily, on first use of ``moe_triton`` / ``gate_noise`` / ``ops``
or of ``backend="triton"``: Triton decides at kernel-definition time whether to compile or
interpret, so ``TRITON_INTERPRET=1`` (for CPU runs) only has to be set before that first use, not
before ``import mlit_kernels``.

Layout: :mod:`.reference` (plain PyTorch), :mod:`.layer` (the nn.Module), :mod:`.functional`
(``moe_triton``: checks, then the variant), :mod:`.variants` (which variant runs; name →
implementation), :mod:`.common` (what every variant shares: settings, options, gate math, the folded
LayerNorm, tiling, seed, tuner), one folder per variant (:mod:`.dense`, :mod:`.dispatch`),
:mod:`.ops` (every custom op), :mod:`.meter`; :mod:`.attention` (imported on its own, not through
this package's names) is the rest of a transformer layer: the fused pre-norm attention half-block.

Adding a variant: a folder ``mlit_kernels/<name>/`` with its kernels, launch code, custom ops and a
function ``fn(x, params, seed, noise, options) -> (y, aux_loss)`` (see :mod:`.variants`), and one
line ``"<name>": ".<name>.module:fn"`` in :data:`.variants.IMPLEMENTATIONS`.
"""

import importlib

from . import reference
from .layer import SharedSwiGLUMoE, collect_aux_loss

_LAZY = {"moe_triton": ".functional", "gate_noise": ".common.gating"}

__all__ = ["SharedSwiGLUMoE", "collect_aux_loss", "gate_noise", "moe_triton", "ops", "reference"]


def __getattr__(name):
    if name == "ops":  # the torch.library custom ops mlit::fused_moe, dispatch_moe, ...
        return importlib.import_module(".ops", __name__)
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
