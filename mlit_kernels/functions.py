"""The functional entry point of the Triton MoE, and the choice between its two expert variants.

Layers (ScatterMoE / Liger style):

* kernels: :mod:`mlit_kernels.gate`, :mod:`mlit_kernels.dispatch`, :mod:`mlit_kernels.swiglu`;
* autograd: the ``torch.library`` custom ops of :mod:`mlit_kernels.ops` — ``mlit::gate_fwd``
  (x, W_g, W_noise → topk_gate, importance, load, topk_idx) and ``mlit::experts_fwd`` (x, topk_idx,
  topk_gate, W_1, b_1, V, b_V, W_2, b_2 → y), each with its backward op; autograd chains them, so
  d topk_gate from the experts and d importance / d load from the auxiliary loss meet in the
  gate's backward, and ``torch.compile`` traces them without a graph break;
* :func:`moe_triton` (here): checks the arguments, runs both ops, and computes the auxiliary loss
  from the two (t,) vectors in plain torch (the reference's CV formula);
* :class:`mlit_kernels.layer.SharedSwiGLUMoE` with ``backend="triton"``.
"""

from __future__ import annotations

import logging
import math

import torch

from . import ops, reference
from .dispatch import interpreting
from .gate import gate_noise
from .swiglu import experts_backward, experts_forward

log = logging.getLogger(__name__)

VARIANTS = ("auto", "dispatch", "dense")
# Without CUDA timings "auto" uses this rule: dense (no routing, every expert's x W_e for a token
# tile, k/t of it used) when at least half of the expert products are used, else dispatch.
_variant_cache: dict[tuple, str] = {}
# Triton fixes interpret-or-compile when the kernel modules (imported above) are defined.
_INTERPRETED = interpreting()


def _check(x, w_gate, w_noise, w1, b1, v, b_v, w2, b2, k, noise):
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x must be a 2-D floating-point tensor (N, m), got {getattr(x, 'shape', type(x))}")
    n, m = x.shape
    if w_gate.dim() != 2 or w_gate.shape[0] != m:
        raise ValueError(f"w_gate must have shape (m={m}, t), got {tuple(w_gate.shape)}")
    t = w_gate.shape[1]
    if w1.dim() != 3:
        raise ValueError(
            f"w1 must have shape (t, m, d_h) (one W_i per expert); the Triton backend supports shared=('v', 'w2') "
            f"only, got w1 of shape {tuple(w1.shape)}")
    d = w1.shape[2]
    expected = {
        "w_noise": (w_noise, (m, t)), "w1": (w1, (t, m, d)), "b1": (b1, (t, d)), "v": (v, (m, d)),
        "b_v": (b_v, (d,)), "w2": (w2, (d, m)), "b2": (b2, (m,)),
    }
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            hint = " (the Triton backend supports shared=('v', 'w2') only)" if name in ("v", "b_v", "w2", "b2") else ""
            raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}{hint}")
    if not isinstance(k, int) or not 1 <= k <= t:
        raise ValueError(f"k must be an int with 1 <= k <= t={t}, got k={k!r}")
    for name in ("w1", "b1", "v", "b_v", "w2", "b2"):
        if expected[name][0].dtype != x.dtype:
            raise TypeError(f"{name} has dtype {expected[name][0].dtype} but x has dtype {x.dtype}; the expert "
                            "weights must match x (cast them, or run under torch.autocast)")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    for name, tensor in (("w_gate", w_gate), ("w_noise", w_noise)):
        if tensor.dtype != torch.float32:
            raise TypeError(f"{name} must be float32 (the gate arithmetic is fp32), got {tensor.dtype}")
    if noise is not None and tuple(noise.shape) != (n, t):
        raise ValueError(f"noise must have shape (N={n}, t={t}), got {tuple(noise.shape)}")
    tensors = {"x": x, "w_gate": w_gate, "w_noise": w_noise, **{k_: v_[0] for k_, v_ in expected.items()}}
    if noise is not None:
        tensors["noise"] = noise
    for name, tensor in tensors.items():
        if not interpreting() and tensor.device.type != "cuda":
            raise ValueError(f"{name} is on {tensor.device}; the Triton backend needs CUDA tensors "
                             "(or TRITON_INTERPRET=1 set before triton kernels are imported, for CPU tests)")
        if tensor.device != x.device:
            raise ValueError(f"{name} is on {tensor.device} but x is on {x.device}")
        if not tensor.is_contiguous():
            raise ValueError(f"{name} must be contiguous (call .contiguous())")


def _bucket(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def choose_variant(n: int, m: int, d_h: int, t: int, k: int, device: torch.device, dtype: torch.dtype) -> str:
    """The faster expert variant for this shape: on CUDA, times both once per
    (m, d_h, t, k, N bucket, dtype) and caches the winner; otherwise dense when 2·k ≥ t."""
    key = (m, d_h, t, k, _bucket(n), dtype)
    choice = _variant_cache.get(key)
    if choice is not None:
        return choice
    if device.type == "cuda" and torch.cuda.is_available() and not interpreting():
        with torch.no_grad(), torch.autocast("cuda", enabled=False):
            choice = _measure_variants(_bucket(n), m, d_h, t, k, device, dtype)
    else:
        choice = "dense" if 2 * k >= t else "dispatch"
    _variant_cache[key] = choice
    log.debug("mlit_kernels: triton variant %r for (m=%d, d_h=%d, t=%d, k=%d, N~%d, %s)", choice, m, d_h, t, k,
              _bucket(n), dtype)
    return choice


def _measure_variants(n, m, d_h, t, k, device, dtype) -> str:
    import triton.testing

    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, m, device=device, dtype=dtype, generator=gen)
    w1 = torch.randn(t, m, d_h, device=device, dtype=dtype, generator=gen) / math.sqrt(m)
    b1 = torch.randn(t, d_h, device=device, dtype=dtype, generator=gen) * 0.1
    v = torch.randn(m, d_h, device=device, dtype=dtype, generator=gen) / math.sqrt(m)
    b_v = torch.randn(d_h, device=device, dtype=dtype, generator=gen) * 0.1
    w2 = torch.randn(d_h, m, device=device, dtype=dtype, generator=gen) / math.sqrt(d_h)
    b2 = torch.randn(m, device=device, dtype=dtype, generator=gen) * 0.1
    logits = torch.randn(n, t, device=device, generator=gen)
    top, idx = logits.topk(k, dim=1)
    gate = torch.softmax(top, dim=1).contiguous()
    idx = idx.to(torch.int32).contiguous()
    times = {}
    for variant in ("dispatch", "dense"):
        def step(variant=variant):
            y, saved = experts_forward(x, idx, gate, w1, b1, v, b_v, w2, b2, variant, save=True)
            experts_backward(y, x, idx, gate, w1, v, w2, saved[0], saved[1], saved[2])
        times[variant] = triton.testing.do_bench(step, warmup=10, rep=40)
    log.debug("mlit_kernels: measured %s", times)
    return min(times, key=times.get)


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
    noise: torch.Tensor | None = None,
    seed: int | torch.Tensor | None = None,
    noise_eps: float = reference.NOISE_EPS,
    w_importance: float = 1e-2,
    w_load: float = 1e-2,
    squared_cv: bool = True,
    unbiased_cv: bool = True,
    variant: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The MoE layer (shared V, W_2) with the Triton kernels: returns (y (N, m), aux_loss ()).

    x (N, m) contiguous, float16/bfloat16/float32, on CUDA (or anywhere under TRITON_INTERPRET=1);
    w1, b1, v, b_v, w2, b2 in x's dtype; w_gate, w_noise float32 (the gate works in fp32 whatever
    x's dtype). In training the gate noise is ``noise`` (N, t) if given, else drawn in-kernel from
    ``seed`` (an int or an int64 tensor of one element; a fresh one from torch's CPU generator
    when None); :func:`gate_noise` gives the exact draws. ``variant``: "dispatch", "dense" or
    "auto" (see :func:`choose_variant`).

    The kernels run as the ``torch.library`` custom ops of :mod:`mlit_kernels.ops`, so the function
    is traceable by ``torch.compile`` (``fullgraph=True``): under tracing, ``variant="auto"`` is
    passed to the op and resolved in its first real call.
    """
    compiling = torch.compiler.is_compiling()
    if not compiling:  # the argument checks read os.environ (interpreter mode): eager only
        _check(x, w_gate, w_noise, w1, b1, v, b_v, w2, b2, k, noise)
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    n, m = x.shape
    t, _, d_h = w1.shape
    if variant == "auto" and not compiling:
        variant = choose_variant(n, m, d_h, t, k, x.device, x.dtype)
    if training and noise is None and seed is None:
        seed = torch.randint(0, 2**31 - 1, ())  # torch's CPU generator, drawn outside the op
    if seed is None:
        seed = torch.zeros((), dtype=torch.int64)
    elif not isinstance(seed, torch.Tensor):
        seed = torch.tensor(int(seed), dtype=torch.int64)
    gate, importance, load, idx = ops.gate_fwd(x, w_gate, w_noise, noise, seed, k, bool(training), float(noise_eps))
    aux_loss = w_importance * reference.coefficient_of_variation(importance, squared_cv, unbiased_cv) + (
        w_load * reference.coefficient_of_variation(load, squared_cv, unbiased_cv))
    save = torch.is_grad_enabled() and any(p.requires_grad for p in (x, gate, w1, b1, v, b_v, w2, b2))
    if x.dtype == torch.bfloat16 and _INTERPRETED:
        # Triton 3.9's interpreter computes tl.dot on bfloat16 operands wrongly (numpy has no
        # bfloat16); under the interpreter only, run the experts on fp32 copies.
        f32 = [p.float() for p in (x, w1, b1, v, b_v, w2, b2)]
        y = ops.experts_fwd(f32[0], idx, gate, *f32[1:], variant, save)[0]
        return y.to(torch.bfloat16), aux_loss
    y = ops.experts_fwd(x, idx, gate, w1, b1, v, b_v, w2, b2, variant, save)[0]
    return y, aux_loss


__all__ = ["moe_triton", "choose_variant", "gate_noise", "VARIANTS"]
