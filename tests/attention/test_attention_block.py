"""The fused attention block (mlit_kernels.attention) against its float64 reference: the output and
every gradient (x, LayerNorm γ/β, qkv W/b, proj W/b) per row, in fp32 / fp16 / bf16, at awkward
shapes (token counts that are not multiples of a tile, head dims 8-48 including 18 and 27, MQA,
MHA and GQA); every tuned configuration bitwise equal to the default; bad inputs refused by name;
the model's half-block on the Triton backend equal to the torch one."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from mlit_kernels.attention import CONFIGS, attention_block, attention_block_reference, force_config
from mlit_kernels.attention.family import inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU runs the kernels through Triton's interpreter

# (B, n, D, H, G): tokens 65 / 37 / 257 / 145; head dims 18, 8, 27, 48, 16
SHAPES = [
    (1, 65, 108, 6, 3),  # mLiT-XXS: head dim 18, GQA
    (2, 37, 32, 4, 4),  # head dim 8, MHA
    (1, 37, 54, 2, 1),  # head dim 27, MQA
    (1, 257, 96, 2, 1),  # head dim 48, the longest sequences
]
# bf16: Triton's interpreter converts to bfloat16 by truncation (measured: up to 1 ulp, where a GPU
# rounds to nearest, 1/2 ulp), biased errors that add up in the sums: up to 5.1e-2 at head dim 48
# on the CPU, 3-4x what torch's own bf16 ops give; fp16 matches torch's fp16 error.
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}


def _run(x, weights, dy, H, G, dtype):
    """Output and gradients [y, dx, dγ, dβ, dW_qkv, db_qkv, dW_proj, db_proj] of the fused block, on the CPU."""
    x = x.to(DEVICE, dtype).detach().requires_grad_()
    weights = [w.detach().to(DEVICE).clone().requires_grad_() for w in weights]
    y = attention_block(x, *weights, H, G)
    y.backward(dy.to(DEVICE, dtype))
    return [t.cpu() for t in [y, x.grad] + [w.grad for w in weights]]


def _reference(x, weights, dy, H, G, dtype):
    """The same in float64 from the inputs as the kernels see them (x, and the weights they cast to dtype)."""
    x = x.to(dtype).double().detach().requires_grad_()
    weights = [w.to(dtype).double().detach().requires_grad_() for w in weights]
    y = attention_block_reference(x, *weights, H, G)
    y.backward(dy.to(dtype).double())
    return [y, x.grad] + [w.grad for w in weights]


def _row_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Max over rows of max |got - want| / (max |want| of the row + 1)."""
    got, want = got.double().reshape(-1, got.shape[-1]), want.reshape(-1, want.shape[-1])
    return ((got - want).abs().amax(1) / (want.abs().amax(1) + 1)).max().item()


NAMES = ["y", "dx", "ln_w", "ln_b", "qkv_w", "qkv_b", "proj_w", "proj_b"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_values_and_gradients(shape, dtype):
    B, n, D, H, G = shape
    if dtype != torch.float32 and shape != SHAPES[0]:
        shape = (1, 37) + shape[2:]  # the half-precision runs at fewer tokens (time under the interpreter)
    B, n, D, H, G = shape
    x, weights, dy = inputs(*shape)
    got = _run(x, weights, dy, H, G, dtype)
    want = _reference(x, weights, dy, H, G, dtype)
    assert got[0].dtype == dtype and got[1].dtype == dtype and all(g.dtype == torch.float32 for g in got[2:])
    errors = {name: _row_error(a, b) for name, a, b in zip(NAMES, got, want)}
    assert max(errors.values()) < TOL[dtype], errors


def test_every_config_computes_the_same_block():
    """Each tuning candidate (warps) forced: outputs and gradients within the fp16 tolerance of the
    first candidate's, row by row (on a GPU the warps change the layouts, so the order of sums)."""
    B, n, D, H, G = 2, 37, 54, 6, 2
    x, weights, dy = inputs(B, n, D, H, G, seed=1)
    results = []
    for config in CONFIGS:
        with force_config(config):
            results.append(_run(x, weights, dy, H, G, torch.float16))
    assert len(results) > 1
    for other in results[1:]:
        errors = {name: _row_error(b, a) for name, a, b in zip(NAMES, results[0], other)}
        assert max(errors.values()) < TOL[torch.float16], errors


def test_autocast_compute_dtype():
    """Under autocast the products run in the autocast dtype; x and the output stay fp32."""
    B, n, D, H, G = 1, 37, 36, 2, 1
    x, weights, dy = inputs(B, n, D, H, G, seed=2)
    x, weights = x.to(DEVICE), [w.to(DEVICE) for w in weights]
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = attention_block(x, *weights, H, G)
    assert y.dtype == torch.float32
    explicit = attention_block(x, *weights, H, G, dtype=torch.bfloat16)
    assert torch.equal(y, explicit)


@pytest.mark.parametrize("bad, message", [
    (lambda a: a.update(x=a["x"][0]), "x must be"),
    (lambda a: a.update(num_heads=5), "num_heads"),
    (lambda a: a.update(num_groups=4), "num_groups"),
    (lambda a: a.update(qkv_w=a["qkv_w"][:-1]), "qkv_w"),
    (lambda a: a.update(proj_b=a["proj_b"].double()), "proj_b"),
    (lambda a: a.update(ln_w=a["ln_w"][:-1]), "ln_w"),
    (lambda a: a.update(dtype=torch.float64), "dtype"),
])
def test_bad_input_is_named(bad, message):
    x, (ln_w, ln_b, qkv_w, qkv_b, proj_w, proj_b), _ = inputs(1, 5, 36, 6, 3)
    args = dict(x=x, ln_w=ln_w, ln_b=ln_b, qkv_w=qkv_w, qkv_b=qkv_b, proj_w=proj_w, proj_b=proj_b, num_heads=6,
                num_groups=3)
    bad(args)
    with pytest.raises(ValueError, match=message):
        attention_block(**args)


def test_model_half_block_matches_torch():
    """GroupedQueryAttention(norm=...) on the Triton backend = the torch path, values and gradients."""
    from mlit.models.attention import GroupedQueryAttention

    torch.manual_seed(0)
    attn = GroupedQueryAttention(36, 2, 1, device=DEVICE)
    norm = nn.LayerNorm(36, device=DEVICE)
    x = torch.randn(2, 37, 36, device=DEVICE)
    outs = []
    for backend in ("reference", "triton"):
        attn.backend = backend
        xi = x.clone().requires_grad_()
        y = attn(xi, None, norm=norm)
        params = [xi, norm.weight, norm.bias, *attn.weights()]
        grads = torch.autograd.grad(y.square().sum(), params)
        outs.append((y, grads))
    (y0, g0), (y1, g1) = outs
    torch.testing.assert_close(y1, y0, atol=1e-4, rtol=1e-4)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)


def test_empty_batch():
    """No sequences: no launch, an empty output, zero weight gradients."""
    x, weights, _ = inputs(1, 5, 36, 6, 3)
    x = x[:0].to(DEVICE).requires_grad_()
    weights = [w.to(DEVICE).requires_grad_() for w in weights]
    y = attention_block(x, *weights, 6, 3)
    y.sum().backward()
    assert y.shape == (0, 5, 36) and x.grad.shape == x.shape
    assert all(w.grad is not None and not w.grad.any() for w in weights)


def test_opcheck():
    """The custom ops' schemas, fake implementations and autograd registration (torch.library.opcheck)."""
    from mlit_kernels.attention.ops import fused_attention_block, fused_attention_block_backward

    B, n, D, H, G = 1, 5, 16, 2, 1
    x, weights, dy = inputs(B, n, D, H, G, seed=3)
    x = x.to(DEVICE).requires_grad_()
    weights = [w.to(DEVICE).requires_grad_() for w in weights]
    args = (x, *weights, H, G, 1e-5, torch.float32)
    checks = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(fused_attention_block, args, test_utils=checks)
    with torch.no_grad():
        _, qkv, o, lse, mean, rstd = fused_attention_block(*args)
    ln_w, ln_b, qkv_w, _, proj_w, _ = (w.detach() for w in weights)
    bwd = (dy.to(DEVICE), x.detach(), ln_w, ln_b, qkv_w, proj_w, qkv, o, lse, mean, rstd, H, G, torch.float32)
    torch.library.opcheck(fused_attention_block_backward, bwd, test_utils=checks)
