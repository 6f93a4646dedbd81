"""``moe_dispatch``: the many-expert MoE layer as a function over the dispatch kernels."""

from __future__ import annotations

import torch

from .. import reference
from ..variants import compute_dtype
from . import ops


def device_seed(seed, needed: bool, device) -> torch.Tensor:
    """The (1,) int64 Philox seed on the device: drawn with torch.randint when needed and not given
    (graph-safe and reproducible with torch.manual_seed, like dropout's RNG); unset when unused."""
    if isinstance(seed, torch.Tensor):
        return seed.to(device=device, dtype=torch.int64).reshape(1)
    if seed is not None:
        return torch.tensor([int(seed)], dtype=torch.int64, device=device)
    if needed:
        return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)
    return torch.empty(1, dtype=torch.int64, device=device)


def moe_dispatch(x: torch.Tensor, w_gate: torch.Tensor, w_noise: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
                 v: torch.Tensor, b_v: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, k: int, training: bool, *,
                 noise: torch.Tensor | None = None, seed: int | torch.Tensor | None = None,
                 noisy_gating: bool = True, noise_eps: float = reference.NOISE_EPS, dropout: float = 0.0,
                 w_importance: float = 1e-2, w_load: float = 1e-2, squared_cv: bool = True,
                 unbiased_cv: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(y (N, m) in x's dtype, aux_loss () fp32) of the MoE layer: three launches forward, two
    backward (plus the seed draw when one is drawn).

    x (N, m); w_gate, w_noise (m, t); w1 (t, m, d_h), b1 (t, d_h); v, b_v, w2, b2 shared ((m, d_h),
    (d_h,), (d_h, m), (m,)) or per expert (a leading t). ``seed``: the Philox key of the gate noise
    and dropout (an int or a (1,) int64 tensor; drawn on the device when None); ``noise`` (N, t) or
    None. The expert products run in autocast's dtype when on, else x's. Arguments are checked by
    :func:`mlit_kernels.functional.check_inputs`, the usual caller."""
    training = bool(training)
    noisy = training and bool(noisy_gating)
    dropout = float(dropout) if training else 0.0
    noise = None if noise is None or not noisy else noise.float().contiguous()
    seed = device_seed(seed, (noisy and noise is None) or dropout > 0, x.device)
    params = [p.contiguous() for p in (w_gate, w_noise, w1, b1, v, b_v, w2, b2)]
    outputs = ops.dispatch_moe(x.contiguous(), *params, seed, noise, int(k), training, noisy, dropout,
                               float(noise_eps), float(w_importance), float(w_load), bool(squared_cv),
                               bool(unbiased_cv), compute_dtype(x))
    return outputs[0], outputs[1]


__all__ = ["moe_dispatch", "device_seed"]
