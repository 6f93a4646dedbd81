"""The LayerNorm folded into the dense MoE kernels (issue 16): MoE(LayerNorm(x)) with
``norm=(weight, bias, eps)`` against the float64 reference (``F.layer_norm`` then the layer),
values and every gradient (x, the norm's weight and bias, all MoE parameters) per row, at the
paper's widths, awkward token counts, k = 1 and k = t; bitwise the same under every tuning
configuration; the layer and the encoder layer use it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mlit_kernels import SharedSwiGLUMoE, reference
from mlit_kernels.common.tiling import interpreting
from mlit_kernels.reference import max_row_error as row_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not interpreting():
    pytest.skip("no CUDA and Triton kernels were imported without TRITON_INTERPRET=1", allow_module_level=True)

from mlit_kernels import gate_noise  # noqa: E402
from mlit_kernels.dense import CONFIGS, force_config  # noqa: E402
from mlit_kernels.functional import moe_triton  # noqa: E402

TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
NAMES = ("w_gate", "w_noise", "w1", "b1", "v", "b_v", "w2", "b2")
EPS = 1e-5


def _params(m, d_h, t, seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return {"ln_w": 1 + 0.3 * r(m), "ln_b": 0.2 * r(m), "w_gate": r(m, t) * 0.5, "w_noise": r(m, t) * 0.5,
            "w1": r(t, m, d_h) / m**0.5, "b1": r(t, d_h) * 0.1, "v": r(m, d_h) / m**0.5, "b_v": r(d_h) * 0.1,
            "w2": r(d_h, m) / d_h**0.5, "b2": r(m) * 0.1}


def _run(x, params, k, train, noise, residual, triton_dtype=None, seed=None, rounding=None):
    """(x, params, y, aux) of MoE(LN(x)) (+ x with ``residual``): the Triton kernels in ``triton_dtype`` (the gate
    weights and the norm in fp32), else the float64 reference; with ``rounding`` the reference's
    LayerNorm output is rounded to that dtype (straight through), as nn.LayerNorm's output in x's
    dtype is, and so the kernels' (the values they see)."""
    if triton_dtype is None:
        xs = x.detach().double().requires_grad_()
        ps = {n: p.detach().double().requires_grad_() for n, p in params.items()}
    else:
        xs = x.to(DEVICE, triton_dtype).requires_grad_()
        ps = {n: p.to(DEVICE, torch.float32 if n in ("w_gate", "w_noise", "ln_w", "ln_b") else triton_dtype)
              .requires_grad_() for n, p in params.items()}
    args = [ps[n] for n in NAMES]
    norm = (ps["ln_w"], ps["ln_b"], EPS)
    if triton_dtype is None:
        xn = F.layer_norm(xs, (xs.shape[1],), norm[0], norm[1], EPS)
        xn = xn + (_rounded(xn, rounding) - xn).detach()
        y, aux = reference.moe_reference(xn, *args, k, train, noise=noise)
        y = xs + y if residual else y
    else:
        y, aux = moe_triton(xs, *args, k, train, noise=noise, seed=seed, variant="dense", norm=norm, residual=residual)
    return xs, ps, y, aux


def _rounded(x, dtype):
    """x (float64) rounded to ``dtype`` as the kernels round: Triton's interpreter converts fp32 to
    bf16 by truncation (numpy has no bf16), a GPU to nearest."""
    if dtype == torch.bfloat16 and interpreting():
        return (x.float().view(torch.int32) & -65536).view(torch.float32).double()
    return x.to(dtype).double()


CASES = [  # N, m, d_h, t, k, train, dtype, noise, residual
    (37, 144, 144, 3, 2, True, torch.float32, "philox", True),  # mLiT-S layer 0; N not a multiple of the tile
    (33, 108, 27, 5, 1, True, torch.float16, "tensor", False),  # XXS last layer, k = 1
    (21, 81, 81, 5, 5, True, torch.float32, "philox", False),  # k = t
    (18, 27, 27, 5, 2, False, torch.float16, None, True),  # eval
    (19, 108, 81, 4, 2, True, torch.bfloat16, "philox", True),  # XXS first layer width
]


@pytest.mark.parametrize("n, m, d_h, t, k, train, dtype, noise_mode, residual", CASES)
def test_norm_moe_matches_the_reference(n, m, d_h, t, k, train, dtype, noise_mode, residual):
    torch.manual_seed(n)
    x = (torch.randn(n, m, dtype=torch.float64) * 2 + 0.5).to(dtype).double()
    params = {name: (p.to(torch.float32 if name in ("w_gate", "w_noise", "ln_w", "ln_b") else dtype).double())
              for name, p in _params(m, d_h, t, n + t).items()}
    seed = torch.tensor([99 + n], dtype=torch.int64)
    if noise_mode == "philox":
        noise_ref, noise_arg = gate_noise(seed, n, t, DEVICE).cpu().double(), None
    elif noise_mode == "tensor":
        noise_ref = torch.randn(n, t, dtype=torch.float64)
        noise_arg = noise_ref.to(DEVICE, torch.float32)
    else:
        noise_ref = noise_arg = None
    xt, pt, y, aux = _run(x, params, k, train, noise_arg, residual, dtype, seed.to(DEVICE))
    xr, pr, yr, auxr = _run(x, params, k, train, noise_ref, residual, rounding=dtype)
    dy = torch.randn(n, m, dtype=torch.float64).to(dtype)
    torch.autograd.backward((y, aux), (dy.to(DEVICE), torch.tensor(10.0, device=DEVICE)))
    torch.autograd.backward((yr, auxr), (dy.double(), torch.tensor(10.0, dtype=torch.float64)))
    assert y.dtype == dtype and y.shape == (n, m)
    errors = {"y": row_error(y, yr), "aux": row_error(aux, auxr), "x": row_error(xt.grad, xr.grad)}
    for name in pr:
        ref = pr[name].grad if pr[name].grad is not None else torch.zeros_like(pr[name])
        errors[name] = row_error(pt[name].grad, ref)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOL[dtype], f"{worst}: {errors[worst]:.2e} > {TOL[dtype]:.0e} ({errors})"


def test_reference_norm_is_layer_norm_then_the_layer():
    """moe_reference(norm=..., residual=True) is x + the layer on F.layer_norm(x)."""
    m, d_h, t = 27, 16, 3
    p = _params(m, d_h, t, 1)
    x = torch.randn(9, m, dtype=torch.float64)
    noise = torch.randn(9, t, dtype=torch.float64)
    args = [p[n] for n in NAMES]
    y, aux = reference.moe_reference(x, *args, 2, True, noise=noise, norm=(p["ln_w"], p["ln_b"], EPS), residual=True)
    y2, aux2 = reference.moe_reference(F.layer_norm(x, (m,), p["ln_w"], p["ln_b"], EPS), *args, 2, True, noise=noise)
    assert torch.equal(y, x + y2) and torch.equal(aux, aux2)


@pytest.mark.parametrize("variant", ["dense", "dispatch"])
def test_layer_with_norm_matches_the_reference_backend(variant):
    """SharedSwiGLUMoE(x, norm=nn.LayerNorm, residual=True): the Triton backend (norm and residual
    folded into the dense kernels; around the dispatch kernels in torch — what "auto" runs on CUDA
    until the dense kernels are cleared there) and the reference backend agree in eval, values and
    every gradient."""
    torch.manual_seed(3)
    layers = {b: SharedSwiGLUMoE(27, 16, 3, k=2, dropout=0.0, backend=b, triton_variant=variant).to(DEVICE).eval()
              for b in ("reference", "triton")}
    layers["triton"].load_state_dict(layers["reference"].state_dict())
    with torch.no_grad():
        layers["reference"].w_gate.normal_(0, 0.5)
    layers["triton"].load_state_dict(layers["reference"].state_dict())
    norms = {b: torch.nn.LayerNorm(27).to(DEVICE) for b in layers}
    with torch.no_grad():
        norms["reference"].weight.uniform_(0.5, 1.5)
        norms["reference"].bias.uniform_(-0.2, 0.2)
    norms["triton"].load_state_dict(norms["reference"].state_dict())
    x = torch.randn(2, 11, 27, device=DEVICE) * 3 + 1
    out = {}
    for b, layer in layers.items():
        xb = x.clone().requires_grad_()
        y, aux = layer(xb, norm=norms[b], residual=True)
        (y.square().sum() + aux).backward()
        out[b] = [y, xb.grad, norms[b].weight.grad, norms[b].bias.grad, *(p.grad for p in layer.parameters())]
    for i, (a, r) in enumerate(zip(out["triton"], out["reference"])):
        if a is None or r is None:  # W_noise in eval
            assert a is None or not a.any()
            continue
        assert row_error(a, r) <= 1e-4, f"output {i} (0 y, 1 dx, 2/3 norm, 4.. the layer's parameters)"


def test_norm_arguments_are_checked():
    layer = SharedSwiGLUMoE(27, 16, 3, backend="triton").to(DEVICE)
    x = torch.randn(4, 27, device=DEVICE)
    with pytest.raises(ValueError, match="norm must be None or an nn.LayerNorm"):
        layer(x, norm=torch.nn.LayerNorm(16).to(DEVICE))
    with pytest.raises(ValueError, match="norm must be None or an nn.LayerNorm"):
        layer(x, norm=torch.nn.LayerNorm(27, elementwise_affine=False).to(DEVICE))
    params = [p for _, p in layer.named_parameters()]
    with pytest.raises(ValueError, match="norm weight must be a tensor of shape"):
        moe_triton(x, *params, 2, True, norm=(torch.ones(26, device=DEVICE), torch.zeros(27, device=DEVICE), 1e-5))
    with pytest.raises(ValueError, match="norm eps must be a positive number"):
        moe_triton(x, *params, 2, True, norm=(torch.ones(27, device=DEVICE), torch.zeros(27, device=DEVICE), 0.0))


def test_no_tokens_with_norm():
    """N = 0: an empty output and zero gradients, the norm's included."""
    layer = SharedSwiGLUMoE(27, 16, 3, backend="triton").to(DEVICE)
    norm = torch.nn.LayerNorm(27).to(DEVICE)
    x = torch.randn(0, 27, device=DEVICE, requires_grad=True)
    y, aux = layer(x, norm=norm)
    (y.sum() + aux).backward()
    assert y.shape == (0, 27) and torch.equal(norm.weight.grad, torch.zeros(27, device=DEVICE))
