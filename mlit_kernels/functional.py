"""``moe_triton``: the MoE layer as a function over the Triton kernels, with the
argument checks; the variant that runs is chosen in :mod:`mlit_kernels.variants`.

Its twin with the same signature is :func:`mlit_kernels.reference.moe_reference`; the layer
(:class:`mlit_kernels.layer.SharedSwiGLUMoE`) calls one or the other.

The variants (:mod:`mlit_kernels.variants`): ``"dense"`` runs the whole layer in two forward and
three backward launches (:mod:`mlit_kernels.dense`); ``"dispatch"`` (many experts, and per-expert
V / W_2) three forward and two backward launches (three with shared V / W_2) over tokens grouped
per expert in-kernel (:mod:`mlit_kernels.dispatch`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common.options import MoEOptions
from .common.precision import COMPUTE_DTYPES, compute_dtype
from .common.settings import AUX_LOSS_WEIGHT, NOISE_EPS
from .common.tiling import interpreting
from .variants import IMPLEMENTATIONS, implementation, resolve_variant

# variant -> its function, imported with this module (not while torch.compile traces moe_triton)
_RUN = {variant: implementation(variant) for variant in IMPLEMENTATIONS}


def check_norm(norm, x) -> None:
    """Raise ValueError / TypeError naming the argument for a ``norm`` the kernels cannot take."""
    if not (isinstance(norm, (tuple, list)) and len(norm) == 3):
        raise ValueError(f"norm must be None or a tuple (weight (m,), bias (m,), eps), got {type(norm).__name__}")
    m = x.shape[1]
    for name, tensor in (("norm weight", norm[0]), ("norm bias", norm[1])):
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != (m,):
            raise ValueError(f"{name} must be a tensor of shape (m={m},), got {getattr(tensor, 'shape', type(tensor))}")
        if not tensor.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
        if tensor.device != x.device:
            raise ValueError(f"{name} is on {tensor.device} but x is on {x.device}")
    if not isinstance(norm[2], (int, float)) or not norm[2] > 0:
        raise ValueError(f"norm eps must be a positive number, got {norm[2]!r}")


def check_inputs(x, w_gate, w_noise, w1, b1, v, b_v, w2, b2, k, noise, dtype) -> None:
    """Raise ValueError / TypeError naming the argument for anything the kernels cannot take."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x must be a 2-D floating-point tensor (N, m), got {getattr(x, 'shape', type(x))}")
    n, m = x.shape
    if w_gate.dim() != 2 or w_gate.shape[0] != m:
        raise ValueError(f"w_gate must have shape (m={m}, t), got {tuple(w_gate.shape)}")
    t = w_gate.shape[1]
    if w1.dim() != 3:
        raise ValueError(
            f"w1 must have shape (t, m, d_h) (one W_i per expert); the Triton backend supports shared=('v', 'w2') "
            f"or shared=() only, got w1 of shape {tuple(w1.shape)}")
    d = w1.shape[2]
    lead = (t,) if v.dim() == 3 else ()  # V, W_2 shared, or one per expert (dispatch variant)
    expected = {
        "w_noise": (w_noise, (m, t)), "w1": (w1, (t, m, d)), "b1": (b1, (t, d)), "v": (v, (*lead, m, d)),
        "b_v": (b_v, (*lead, d)), "w2": (w2, (*lead, d, m)), "b2": (b2, (*lead, m)),
    }
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            hint = (" (the Triton backend supports shared=('v', 'w2') or shared=() only)"
                    if name in ("v", "b_v", "w2", "b2") else "")
            raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}{hint}")
    if not isinstance(k, int) or not 1 <= k <= t:
        raise ValueError(f"k must be an int with 1 <= k <= t={t}, got k={k!r}")
    if dtype not in COMPUTE_DTYPES:
        raise TypeError(f"x has dtype {x.dtype} (compute dtype {dtype}); the Triton backend computes in "
                        f"float16, bfloat16 or float32: cast x or run under torch.autocast")
    if noise is not None and tuple(noise.shape) != (n, t):
        raise ValueError(f"noise must have shape (N={n}, t={t}), got {tuple(noise.shape)}")
    tensors = {"x": x, "w_gate": w_gate, **{name: value[0] for name, value in expected.items()}}
    if noise is not None:
        tensors["noise"] = noise
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
        if not interpreting() and tensor.device.type != "cuda":
            raise ValueError(f"{name} is on {tensor.device}; the Triton backend needs CUDA tensors "
                             "(or TRITON_INTERPRET=1 set before the first Triton kernel is defined, for CPU tests)")
        if tensor.device != x.device:
            raise ValueError(f"{name} is on {tensor.device} but x is on {x.device}")


def moe_triton(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_noise: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    v: torch.Tensor,
    b_v: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    k: int,
    training: bool,
    *,
    noise: torch.Tensor | None = None,
    seed: int | torch.Tensor | None = None,
    noisy_gating: bool = True,
    noise_eps: float = NOISE_EPS,
    dropout: float = 0.0,
    w_importance: float = AUX_LOSS_WEIGHT,
    w_load: float = AUX_LOSS_WEIGHT,
    squared_cv: bool = True,
    unbiased_cv: bool = True,
    variant: str = "auto",
    norm: tuple | None = None,
    residual: bool = False,
    need_aux: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The MoE layer (shared V, W_2) with the Triton kernels: (y (N, m), aux_loss () fp32).

    x (N, m) on CUDA (or anywhere under TRITON_INTERPRET=1), any float dtype; the weights (the
    layer's state_dict shapes) in any float dtype: the expert products run in the compute dtype
    (autocast's when on, else x's; fp16 / bf16 / fp32) with fp32 accumulation, the gate in fp32,
    and y comes out in x's dtype (as a LayerNorm's output: under autocast the fp32 residual stream
    then needs no cast kernels, forward or backward). In training with ``noisy_gating`` the gate noise is
    ``noise`` (N, t) if given, else drawn in-kernel by Philox from ``seed`` (an int or a (1,)
    int64 tensor; drawn on the device with ``torch.randint`` when None — reproducible with
    ``torch.manual_seed``); :func:`mlit_kernels.gate_noise` gives the exact draws. ``dropout``
    applies to y in training (fused into the kernel on the dense variant). ``norm``: None, or
    (weight (m,), bias (m,), eps) of a LayerNorm applied to x first — the layer is then
    MoE(LayerNorm(x)), gradients to the norm's weight and bias included; the dense variant folds
    it into its kernels (no launch of its own, nor an autocast cast of its output), the dispatch
    variant runs ``F.layer_norm`` first. ``residual``: y = x + the layer's output (the pre-norm
    block's residual add; folded into the dense kernels' store with ``norm``, else one add).
    ``need_aux=False``: aux_loss comes back None (in evaluation the dense variant then skips the
    launch that computes it).
    """
    variant = resolve_variant(variant, w_gate.shape[1] if w_gate.dim() == 2 else 0,
                              per_expert=v.dim() == 3 or w2.dim() == 3, device=x.device)
    dtype = compute_dtype(x)
    if not torch.compiler.is_compiling():
        check_inputs(x, w_gate, w_noise, w1, b1, v, b_v, w2, b2, k, noise, dtype)
        if norm is not None:
            check_norm(norm, x)
    training = bool(training)
    noisy = training and bool(noisy_gating)
    noise = None if noise is None or not noisy else noise.float().contiguous()
    params = tuple(p.contiguous() for p in (w_gate, w_noise, w1, b1, v, b_v, w2, b2))
    options = MoEOptions(k, training, noisy, float(dropout) if training else 0.0, float(noise_eps),
                         float(w_importance), float(w_load), bool(squared_cv), bool(unbiased_cv), dtype,
                         bool(need_aux))
    x = x.contiguous()
    if norm is not None and variant == "dense":
        weight, bias, eps = norm
        y, aux = _RUN[variant](x, params, seed, noise, options, norm=(weight.contiguous(), bias.contiguous(),
                                                                      float(eps)), residual=bool(residual))
    else:
        y, aux = _RUN[variant](x if norm is None else F.layer_norm(x, x.shape[1:], *norm).contiguous(), params, seed,
                               noise, options)
        y = x + y if residual else y
    return y, (aux if need_aux else None)


__all__ = ["moe_triton", "check_inputs", "check_norm"]
