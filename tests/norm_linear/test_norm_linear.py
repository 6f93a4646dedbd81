"""``Linear(LayerNorm(x))`` by the Triton kernels (mlit_kernels.norm_linear) against its float64
reference: the output and every gradient (x, γ, β, W, b) per row in fp32 / fp16 / bf16, at
awkward row counts (1, 37, 70: not multiples of the 32-row tile), widths 27 / 108 / 144, outputs
1 / 10 / 27 / 100, with and without a bias, on contiguous rows and on the strided dummy tokens
``tokens[:, -1]``; one launch forward, two backward; every load and store inside its tensors;
bad inputs refused by name."""

from __future__ import annotations

import pytest
import torch
from bounds import checked_kernels

from mlit_kernels.common.tiling import interpreting
from mlit_kernels.meter import Meter
from mlit_kernels.norm_linear import norm_linear, norm_linear_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU runs the kernels through Triton's interpreter
# fp16 / bf16: the inputs as the kernels see them (rounded) in the reference, so what is left is the
# rounding of LN(x) and of y to the compute dtype; bf16 under the interpreter truncates (see
# tests/attention/test_attention_block.py), up to ~4x the rounding error.
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}
# (rows M, tokens n a row is taken from (1: contiguous rows), D, E, bias)
SHAPES = [(37, 5, 108, 10, True), (70, 1, 144, 100, True), (1, 3, 27, 1, False), (33, 1, 108, 27, False)]


def _row_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Max over rows of max |got - want| / (max |want| of the row + 1)."""
    got, want = got.double().reshape(-1, got.shape[-1]), want.reshape(-1, want.shape[-1])
    return ((got - want).abs().amax(1) / (want.abs().amax(1) + 1)).max().item()


def _inputs(m, n, d, e, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(m, n, d, generator=g) * 2 + 0.5
    weights = [1 + 0.1 * torch.randn(d, generator=g), 0.1 * torch.randn(d, generator=g),
               torch.randn(e, d, generator=g) * d ** -0.5] + ([0.1 * torch.randn(e, generator=g)] if bias else [])
    return tokens, weights, torch.randn(m, e, generator=g)


def _grads(tokens, weights, dy, fn):
    tokens = tokens.detach().requires_grad_()
    weights = [w.detach().requires_grad_() for w in weights]
    y = fn(tokens[:, -1], *weights[:3], weights[3] if len(weights) == 4 else None, 1e-6)
    y.backward(dy.to(y.dtype))
    return [y, tokens.grad] + [w.grad for w in weights]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_values_and_gradients(shape, dtype):
    tokens, weights, dy = _inputs(*shape)
    got = _grads(tokens.to(DEVICE, dtype), [w.to(DEVICE) for w in weights], dy.to(DEVICE), norm_linear)
    want = _grads(tokens.to(dtype).double(), [w.to(dtype).double() for w in weights], dy.to(dtype).double(),
                  norm_linear_reference)
    assert got[0].dtype == dtype and got[1].dtype == dtype and all(g.dtype == torch.float32 for g in got[2:])
    names = ["y", "dx", "ln_w", "ln_b", "w", "b"]
    for name, a, b in zip(names, got, want):
        assert _row_error(a.cpu().unsqueeze(0) if a.dim() == 1 else a.cpu(), b.unsqueeze(0) if b.dim() == 1 else b) \
            <= TOL[dtype], name
    assert not got[1][:, :-1].any()  # only the dummy tokens were used


def test_autocast_computes_in_fp16():
    tokens, weights, _ = _inputs(5, 1, 108, 10, True)
    with torch.autocast(DEVICE, dtype=torch.float16):
        y = norm_linear(tokens[:, -1].to(DEVICE), *[w.to(DEVICE) for w in weights])
    assert y.dtype == torch.float16 and y.shape == (5, 10)


def test_launches():
    tokens, weights, dy = _inputs(37, 5, 108, 10, True)
    tokens.requires_grad_()
    with Meter() as forward:
        y = norm_linear(tokens[:, -1], *weights)
    with Meter() as backward:
        y.backward(dy)
    assert (forward.launches, forward.syncs) == (1, 0)
    assert backward.by_name()["triton._ln_qkv_bwd_kernel"] == 1 and backward.triton_launches == 2
    assert backward.syncs == 0


@pytest.mark.skipif(not interpreting(), reason="checks the Triton interpreter's launches (CPU only)")
def test_every_access_in_bounds():
    tokens, weights, dy = _inputs(37, 5, 108, 10, True)
    with checked_kernels():
        got = _grads(tokens, weights, dy, norm_linear)
    assert all(torch.isfinite(g).all() for g in got)


def test_bad_inputs_name_the_argument():
    tokens, (ln_w, ln_b, w, b), _ = _inputs(3, 1, 108, 10, True)
    x = tokens[:, -1]
    with pytest.raises(ValueError, match="w must have shape"):
        norm_linear(x, ln_w, ln_b, w[:, :-1], b)
    with pytest.raises(ValueError, match="ln_b must have shape"):
        norm_linear(x, ln_w, ln_b[:-1], w, b)
    with pytest.raises(ValueError, match="b must have shape"):
        norm_linear(x, ln_w, ln_b, w, b[:-1])
    with pytest.raises(ValueError, match="b is torch.float16"):
        norm_linear(x, ln_w, ln_b, w, b.half())
    with pytest.raises(ValueError, match="x: width 300"):
        norm_linear(torch.randn(2, 300), torch.ones(300), torch.zeros(300), torch.randn(4, 300))
    with pytest.raises(ValueError, match="x must be"):
        norm_linear(x.long(), ln_w, ln_b, w, b)


def test_opcheck():
    """Schemas, fake tensors and autograd registration: torch.compile traces the ops, graphs capture them."""
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    tokens, (ln_w, ln_b, w, b), dy = _inputs(5, 3, 27, 10, True)
    x = tokens[:, -1].to(DEVICE).requires_grad_()
    args = (x, ln_w.to(DEVICE), ln_b.to(DEVICE), w.to(DEVICE).requires_grad_(), b.to(DEVICE), 1e-5, torch.float32)
    torch.library.opcheck(torch.ops.mlit.norm_linear, args, test_utils=checks)
    torch.library.opcheck(torch.ops.mlit.norm_linear, args[:4] + (None,) + args[5:], test_utils=checks)
    _, mean, rstd = torch.ops.mlit.norm_linear(*args)
    torch.library.opcheck(torch.ops.mlit.norm_linear_backward,
                          (dy.to(DEVICE), x.detach(), *args[1:4], mean, rstd, torch.float32), test_utils=checks)
