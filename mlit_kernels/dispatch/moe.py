"""``moe_dispatch``: the many-expert variant's entry in :data:`mlit_kernels.variants.IMPLEMENTATIONS`."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..common.options import MoEOptions
from ..common.seed import philox_seed
from . import ops


def moe_dispatch(x: Tensor, params: tuple, seed, noise: Optional[Tensor], options: MoEOptions) -> tuple[Tensor, Tensor]:
    """(y (N, m) in x's dtype, aux_loss () fp32): three launches forward, two backward (three with
    shared V / W2; plus the seed draw when one is drawn). The arguments as :func:`mlit_kernels.functional.moe_triton`
    prepares them: x (N, m) and the eight parameters contiguous — w_gate, w_noise (m, t); w1
    (t, m, d_h), b1 (t, d_h); v, b_v, w2, b2 shared ((m, d_h), (d_h,), (d_h, m), (m,)) or per expert
    (a leading t) — noise (N, t) fp32 or None, seed as the caller gave it."""
    seed = philox_seed(seed, (options.noisy and noise is None) or options.dropout > 0, x.device)
    o = options  # all but need_aux: the dispatch kernels reduce the auxiliary loss inside their launches
    outputs = ops.dispatch_moe(x, *params, seed, noise, o.k, o.training, o.noisy, o.dropout, o.noise_eps,
                               o.w_importance, o.w_load, o.squared_cv, o.unbiased_cv, o.dtype)
    return outputs[0], outputs[1]


__all__ = ["moe_dispatch"]
