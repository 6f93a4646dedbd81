"""The Triton kernels against the reference on the device: the comparison behind the layer's
first-use check (and its fallback to the reference) and behind ``mlit doctor``.

Calls the kernels only through :func:`mlit_kernels.moe_triton` and the reference only through
:func:`mlit_kernels.reference.moe_reference`.
"""

from __future__ import annotations

import warnings

import torch

from . import reference
from .common.precision import TOL, compute_dtype, tolerance

#: The first-use check allows 10x TOL: no rounding difference of a correct kernel comes near it,
#: while a wrong kernel (a missed expert, a bad tile) errs by order 1.
FIRST_USE_SLACK = 10.0
#: The first-use check runs at the call's token count up to this many (then this plus N mod 16,
#: so Triton specialises the count as in the real call).
FIRST_USE_MAX_TOKENS = 4096
#: CUDA errors after which the process's CUDA context is unusable (every later call fails too), so
#: the first-use check raises instead of falling back (seen on an H200, 2026-12-04: the first).
CONTEXT_LOST = ("illegal memory access", "illegal instruction", "misaligned address", "unspecified launch failure",
                "device-side assert")
NAMES = ("w_gate", "w_noise", "w1", "b1", "v", "b_v", "w2", "b2")


def compare(m: int, d_h: int, t: int, k: int, n: int, *, device: torch.device | str, dtype: torch.dtype,
            weight_dtype: torch.dtype | None = None, gate_dtype: torch.dtype = torch.float32,
            variant: str = "auto", per_expert: bool = False, grad: bool = True, seed: int = 0,
            norm: bool = False) -> dict[str, float]:
    """Errors of ``moe_triton`` against the float64 reference on the same random inputs.

    x (n, m) in ``dtype``; W_g, W_noise in ``gate_dtype``, the other weights in ``weight_dtype``
    (default ``dtype``; V, b_V, W_2, b_2 one per expert with ``per_expert``, i.e. shared=()); the
    reference gets the same rounded values in float64. ``norm``: the pre-norm block's half
    x + MoE(LayerNorm(x)) (a fp32 LayerNorm weight and bias, the mLiT layer's call). Training mode
    with explicit gate noise and no dropout, so both sides are deterministic and torch's RNG is not
    touched. The Triton side runs under the caller's autocast, the reference without it.
    Returns {name: worst per-row relative error} for "y", "aux" and, with ``grad``, "x" and every
    parameter gradient ("ln_w", "ln_b" with ``norm``). Exceptions of the kernels (a failed compile)
    propagate.
    """
    from .functional import moe_triton  # imported lazily: Triton decides interpret-or-compile at first definition

    device = torch.device(device)
    weight_dtype = weight_dtype or dtype
    g = torch.Generator().manual_seed(seed)
    lead = (t,) if per_expert else ()
    shapes = {"w_gate": (m, t), "w_noise": (m, t), "w1": (t, m, d_h), "b1": (t, d_h), "v": (*lead, m, d_h),
              "b_v": (*lead, d_h), "w2": (*lead, d_h, m), "b2": (*lead, m)}
    scales = {"w_gate": 0.5, "w_noise": 0.5, "w1": m**-0.5, "v": m**-0.5, "w2": d_h**-0.5}
    params = {name: (torch.randn(*shape, generator=g) * scales.get(name, 0.1)).to(
        device, gate_dtype if name in ("w_gate", "w_noise") else weight_dtype) for name, shape in shapes.items()}
    x = torch.randn(n, m, generator=g).to(device, dtype)
    noise = torch.randn(n, t, generator=g).to(device)
    dy = torch.randn(n, m, generator=g).to(device, dtype)
    if norm:
        params["ln_w"] = (1 + 0.2 * torch.randn(m, generator=g)).to(device)
        params["ln_b"] = (0.2 * torch.randn(m, generator=g)).to(device)

    def run(fn, cast):
        inputs = {"x": cast(x), **{name: cast(p) for name, p in params.items()}}
        for tensor in inputs.values():
            tensor.requires_grad_(grad)
        folded = dict(norm=(inputs["ln_w"], inputs["ln_b"], 1e-5), residual=True) if norm else {}
        y, aux = fn(inputs["x"], *(inputs[name] for name in NAMES), k, True, noise=cast(noise), **folded)
        if grad:
            torch.autograd.backward((y, aux), (cast(dy), torch.tensor(10.0, device=device, dtype=aux.dtype)))
        return y, aux, {name: tensor.grad for name, tensor in inputs.items()}

    with torch.autocast(device.type, enabled=False):
        y_ref, aux_ref, grads_ref = run(reference.moe_reference, lambda v: v.detach().double())
    y, aux, grads = run(lambda *a, **kw: moe_triton(*a, variant=variant, **kw), lambda v: v.detach().clone())
    errors = {"y": reference.max_row_error(y, y_ref), "aux": reference.max_row_error(aux, aux_ref)}
    if grad:
        errors.update({name: reference.max_row_error(grads[name], grads_ref[name]) for name in grads_ref
                       if grads_ref[name] is not None})
    return errors


#: The gate's weights: their gradients sum cancelling terms over every token (precision.TOL_CANCELLING_SUMS).
GATE_WEIGHTS = ("w_gate", "w_noise")


def family_check(variant: str, shape, dtype: torch.dtype, device) -> dict[str, tuple[float, float]]:
    """A MoE variant's family check (:class:`mlit_kernels.common.family.Family`): :func:`compare` at
    ``shape`` (m, d_h, t, k, N; with ``norm``: x + MoE(LayerNorm(x)), the mLiT layer's call; with
    ``per_expert``: separate V / W2) computing in ``dtype`` — fp32 weights under autocast for fp16 /
    bf16, as the training loop runs it — each error with its per-dtype limit."""
    autocast = dtype != torch.float32
    with torch.autocast(torch.device(device).type, dtype=dtype, enabled=autocast):
        errors = compare(shape["m"], shape["d_h"], shape["t"], shape["k"], shape["N"], device=device,
                         dtype=torch.float32, variant=variant, per_expert=shape.get("per_expert", False),
                         norm=shape.get("norm", False))
    return {name: (error, tolerance(dtype, cancelling_sum=name in GATE_WEIGHTS)) for name, error in errors.items()}


def dense_check(shape, dtype: torch.dtype, device) -> dict[str, tuple[float, float]]:
    """The dense family's check: :func:`family_check` of the dense variant."""
    return family_check("dense", shape, dtype, device)


def dispatch_check(shape, dtype: torch.dtype, device) -> dict[str, tuple[float, float]]:
    """The dispatch family's check: :func:`family_check` of the dispatch variant."""
    return family_check("dispatch", shape, dtype, device)


def worst(errors: dict[str, float]) -> tuple[str, float]:
    """The name and value of the largest error (a NaN counts as the worst)."""
    name = max(errors, key=lambda n: float("inf") if errors[n] != errors[n] else errors[n])
    return name, errors[name]


# ---- the layer's first-use check ------------------------------------------------------------

_RESULTS: dict[tuple, str | None] = {}  # configuration → None (passed) or the cause of the fallback


def should_check(x: torch.Tensor) -> bool:
    """Whether a first Triton call on x is checked: on CUDA, where kernels compile for the GPU
    present (the CPU interpreter compiles nothing and is what the test suite checks)."""
    return x.is_cuda


def triton_passes(layer, x: torch.Tensor) -> bool:
    """Whether ``layer`` may run its Triton kernels on x (tokens (N, m)): the first call of each
    configuration (device, dtypes, variant, sizes; with gradients, again) runs :func:`compare` on
    random inputs of that configuration; a compile error or an error above ``FIRST_USE_SLACK * TOL``
    makes it — and every later call of that configuration — fall back to the reference, with one
    warning naming the cause. Not run while torch.compile traces or a CUDA
    graph is captured (an unchecked configuration then runs Triton)."""
    if not should_check(x):
        return True
    grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in layer.parameters()))
    dtype = compute_dtype(x)
    config = (x.device, x.dtype, layer.w1.dtype, layer.w_gate.dtype, dtype, layer.resolved_variant, layer.shared,
              layer.dim, layer.hidden_dim, layer.num_experts, layer.k)
    if any(_RESULTS.get((*config, checked_grad)) for checked_grad in (False, True)):
        return False  # failed with or without gradients: falls back either way, warned once
    key = (*config, grad)
    if key not in _RESULTS:
        if torch.compiler.is_compiling() or (x.is_cuda and torch.cuda.is_current_stream_capturing()):
            return True
        _RESULTS[key] = _first_use_failure(layer, x, dtype, grad)
        if _RESULTS[key] is not None:
            warnings.warn(f"SharedSwiGLUMoE: {_RESULTS[key]}; falling back to backend='reference' for "
                          f"{config[5:]} (variant, shared, m, d_h, t, k) in {x.dtype} on {x.device} "
                          "(MLIT_MOE_BACKEND=triton forces the kernels)", RuntimeWarning, stacklevel=3)
    return _RESULTS[key] is None


def _first_use_failure(layer, x: torch.Tensor, dtype: torch.dtype, grad: bool) -> str | None:
    """None if the kernels pass :func:`compare` for the layer's configuration, else the cause."""
    n = x.shape[0]
    n = n if n <= FIRST_USE_MAX_TOKENS else FIRST_USE_MAX_TOKENS + n % 16
    try:
        errors = compare(layer.dim, layer.hidden_dim, layer.num_experts, layer.k, n, device=x.device,
                         dtype=x.dtype, weight_dtype=layer.w1.dtype, gate_dtype=layer.w_gate.dtype,
                         variant=layer.triton_variant, per_expert=layer.shared == (), grad=grad)
    except (ValueError, TypeError):
        raise  # a bad argument: the same error as the call itself would raise
    except Exception as err:  # noqa: BLE001 - any failure to compile or launch is a reason to fall back
        first_line = (str(err).strip().splitlines() or [""])[0][:200]
        if any(marker in str(err) for marker in CONTEXT_LOST):
            raise RuntimeError(
                f"SharedSwiGLUMoE: the Triton kernels ({layer.resolved_variant}) broke this process's CUDA context "
                f"at first use ({type(err).__name__}: {first_line}); no fallback can run after that: restart with "
                "MLIT_MOE_BACKEND=reference, or another triton_variant") from err
        return f"the Triton kernels failed at first use ({type(err).__name__}: {first_line})"
    name, error = worst(errors)
    tol = FIRST_USE_SLACK * tolerance(dtype)
    if not error <= tol:
        what = name if name in ("y", "aux") else f"gradient of {name}"
        return f"the Triton kernels disagree with the reference at first use ({what}: max row error {error:.2e} > {tol:.0e})"
    return None


def reset_first_use_checks() -> None:
    """Forget every first-use result (the next call of each configuration checks again)."""
    _RESULTS.clear()


__all__ = ["TOL", "FIRST_USE_SLACK", "CONTEXT_LOST", "GATE_WEIGHTS", "compare", "family_check", "dense_check", "dispatch_check", "worst", "should_check", "triton_passes",
           "reset_first_use_checks"]
