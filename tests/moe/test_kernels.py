"""Triton backend of the MoE layer against the float64 reference (SPEC §5).

On a machine without CUDA the kernels run through Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before any Triton kernel is defined). The same tests run on CUDA when a GPU is
present (then the tensors are put there).

Errors are measured per row (:func:`mlit_kernels.reference.max_row_error`): for each row of an
output or gradient, max |out − ref| over the row divided by max |ref| over that row (rows whose
reference is below 1e-3 of the tensor's largest value are measured against that floor), and the
worst row must be within TOL of its dtype. A single token off by 1% fails an fp16 case.
"""

from __future__ import annotations

import copy

import pytest
import torch

from mlit_kernels import SharedSwiGLUMoE, reference
from mlit_kernels.reference import max_row_error as row_error
from mlit_kernels.common.tiling import interpreting

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not interpreting():
    pytest.skip("no CUDA and Triton kernels were imported without TRITON_INTERPRET=1", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from mlit_kernels import gate_noise, ops  # noqa: E402
from mlit_kernels.common import gating  # noqa: E402
from mlit_kernels.functional import moe_triton  # noqa: E402
from mlit_kernels.dense import CONFIGS, force_config  # noqa: E402

# Worst per-row relative error against float64 (see the module docstring). Measured on the
# interpreter over CASES: fp32 2.1e-5 (dW_noise, a sum over tokens), fp16 2.1e-3, bf16 1.3e-2
# (bf16 keeps 8 bits of mantissa); the bounds leave ~4x for a GPU's other summation orders.
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
NAMES = ("w_gate", "w_noise", "w1", "b1", "v", "b_v", "w2", "b2")


def make_params(m, d_h, t, seed=0, gate_scale=0.5):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return {
        "w_gate": r(m, t) * gate_scale, "w_noise": r(m, t) * gate_scale,
        "w1": r(t, m, d_h) / m**0.5, "b1": r(t, d_h) * 0.1,
        "v": r(m, d_h) / m**0.5, "b_v": r(d_h) * 0.1,
        "w2": r(d_h, m) / d_h**0.5, "b2": r(m) * 0.1,
    }


def dispatch_gate(x, params, seed, k, train):
    """The dispatch path's gate on x: (idx (N, k) int32, gates (N, k) fp32, stats (2, t))."""
    out = ops.dispatch_moe(x, *(params[n] for n in NAMES), seed, None, k, train, train, 0.0, 1e-2, 1e-2, 1e-2, True,
                           True, x.dtype)
    return out[2], out[3], out[7]


def reference_run(x, params, k, train, noise, noisy=True):
    """float64 reference: x and parameters as leaves, (y, aux) (no dropout)."""
    x = x.detach().double().requires_grad_()
    p = {n: v.detach().double().requires_grad_() for n, v in params.items()}
    y, aux = reference.moe_reference(x, *p.values(), k, train, noise=None if noise is None else noise.double(),
                                     noisy_gating=noisy)
    return x, p, y, aux


def triton_run(x, params, k, train, dtype, variant, noise=None, seed=None, noisy=True):
    """The Triton layer on x and the parameters in ``dtype`` (the gate weights in fp32)."""
    xt = x.to(DEVICE, dtype).requires_grad_()
    pt = {n: v.to(DEVICE, torch.float32 if n in ("w_gate", "w_noise") else dtype).requires_grad_()
          for n, v in params.items()}
    y, aux = moe_triton(xt, *pt.values(), k, train, noise=noise, seed=seed, variant=variant, noisy_gating=noisy)
    return xt, pt, y, aux


def quantised(x, params, dtype):
    """The float64 values the kernels see: x and the expert weights rounded to ``dtype``."""
    x = x.to(dtype).double()
    return x, {n: p.to(torch.float32 if n in ("w_gate", "w_noise") else dtype).double() for n, p in params.items()}


def compare(n, m, d_h, t, k, train, dtype, variant, noise_mode, seed=0, noisy=True):
    """Run both backends on one case; returns the per-row errors of y, aux and every gradient."""
    torch.manual_seed(seed)
    x, params = quantised(torch.randn(n, m, dtype=torch.float64), make_params(m, d_h, t, seed=n + t), dtype)
    philox_seed = torch.tensor([1234 + n], dtype=torch.int64)
    if noise_mode == "philox":
        noise_ref, noise_arg = gate_noise(philox_seed, n, t, DEVICE).cpu(), None
    elif noise_mode == "tensor":
        noise_ref = torch.randn(n, t)
        noise_arg = noise_ref.to(DEVICE)
    else:
        noise_ref = noise_arg = None
    xt, pt, y, aux = triton_run(x, params, k, train, dtype, variant, noise=noise_arg, seed=philox_seed.to(DEVICE),
                                noisy=noisy)
    xr, pr, yr, auxr = reference_run(x, params, k, train, noise_ref, noisy=noisy)
    dy = torch.randn(n, m, dtype=torch.float64)
    torch.autograd.backward((y, aux), (dy.to(DEVICE, y.dtype), torch.tensor(10.0, device=DEVICE)))
    torch.autograd.backward((yr, auxr), (dy.to(y.dtype).double(), torch.tensor(10.0, dtype=torch.float64)))
    assert y.dtype == dtype and y.shape == (n, m) and aux.shape == ()
    errors = {"y": row_error(y, yr), "aux": row_error(aux, auxr), "x": row_error(xt.grad, xr.grad)}
    for name in NAMES:
        errors[name] = row_error(pt[name].grad, pr[name].grad if pr[name].grad is not None else
                                 torch.zeros_like(pr[name]))
    return errors


CASES = [  # N, m, d_h, t, k, train, dtype, variant, noise ("philox" in-kernel / "tensor" passed / None)
    (37, 144, 144, 3, 2, True, torch.float32, "dense", "philox"),  # mLiT-S layer 0; N not a multiple of the tile
    (33, 108, 27, 5, 1, True, torch.float16, "dense", "tensor"),  # XXS last layer, k = 1
    (70, 81, 81, 5, 5, True, torch.float32, "dense", "philox"),  # k = t: the load is the routing counts
    (1, 27, 27, 5, 2, False, torch.float16, "dense", None),  # N = 1, eval
    (50, 144, 72, 4, 2, True, torch.bfloat16, "dense", "philox"),
    (45, 128, 96, 3, 3, False, torch.float32, "dense", None),
    (29, 108, 32, 16, 2, True, torch.float16, "dense", "tensor"),  # the most experts the dense path takes
    (65, 72, 27, 8, 2, True, torch.float32, "dense", "philox"),
    (37, 144, 144, 3, 2, True, torch.float32, "dispatch", "philox"),
    (33, 108, 27, 5, 1, True, torch.float16, "dispatch", "tensor"),
    (53, 108, 27, 5, 5, False, torch.float32, "dispatch", None),
    (29, 27, 40, 12, 3, True, torch.float16, "dispatch", "philox"),
    (40, 81, 81, 5, 2, True, torch.bfloat16, "dispatch", "tensor"),
]


@pytest.mark.parametrize("n,m,d_h,t,k,train,dtype,variant,noise_mode", CASES)
def test_forward_backward_match_reference(n, m, d_h, t, k, train, dtype, variant, noise_mode):
    errors = compare(n, m, d_h, t, k, train, dtype, variant, noise_mode)
    bad = {name: e for name, e in errors.items() if not e <= TOL[dtype]}
    assert not bad, f"per-row errors above {TOL[dtype]}: {bad} (all: {errors})"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"n{c.block_n}w{c.num_warps}")
def test_every_tuning_config(config):
    """Every candidate configuration of the fused kernels, at a size spanning several tiles."""
    with force_config(config):
        errors = compare(150, 108, 27, 5, 2, True, torch.float16, "dense", "philox", seed=3)
    assert max(errors.values()) <= TOL[torch.float16], errors


@pytest.mark.parametrize("variant", ["dense", "dispatch"])
def test_noise_free_training_matches_reference(variant):
    """noisy_gating=False: no noise, the load is the routing counts, W_noise gets no gradient."""
    errors = compare(41, 27, 27, 4, 2, True, torch.float32, variant, None, noisy=False)
    assert max(errors.values()) <= TOL[torch.float32], errors


def test_one_token_off_is_caught():
    """The per-row measure sees a single wrong row that a norm over the tensor would hide."""
    ref = torch.randn(300, 144, dtype=torch.float64)
    out = ref.clone()
    out[17] *= 1.02
    assert row_error(out, ref) > TOL[torch.float16] and (out - ref).norm() / ref.norm() < TOL[torch.float16]


@pytest.mark.parametrize("variant", ["dense", "dispatch"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("train", [True, False])
def test_bad_token_stays_in_its_row(variant, bad, train):
    """A NaN / inf token: its own output row is not finite; every other row's output and input
    gradient (the backward of y alone: the balancing loss, a sum over every token, is not finite)
    are finite and equal to the run without that token within the fp32 tolerance; the routing of
    every other token is unchanged and every routing index lies in [0, t). Not bitwise: where the
    token sits changes how a GPU (or numpy, under the interpreter) groups the sums."""
    n, m, d_h, t, k = 40, 27, 27, 5, 2
    params = {name: p.float().to(DEVICE) for name, p in make_params(m, d_h, t, seed=5).items()}
    x = torch.randn(n, m, device=DEVICE)
    x_bad = x.clone()
    x_bad[7, 3] = bad
    seed = torch.tensor([11], device=DEVICE)
    dy = torch.randn(n, m, device=DEVICE)

    def forward_backward(x):
        x = x.clone().requires_grad_()
        y, _ = moe_triton(x, *params.values(), k, train, seed=seed, variant=variant)
        (dx,) = torch.autograd.grad(y, x, dy)
        return y.detach(), dx

    (y_clean, dx_clean), (y_bad, dx_bad) = forward_backward(x), forward_backward(x_bad)
    with torch.no_grad():
        y_ref, _ = reference.moe_reference(x_bad.cpu().double(), *(p.cpu().double() for p in params.values()), k,
                                           train, noise=gate_noise(seed, n, t, DEVICE).cpu().double())
        clean_idx = dispatch_gate(x, params, seed, k, train)[0]
        idx = dispatch_gate(x_bad, params, seed, k, train)[0]
        _, _, fused_idx, _, _ = ops.fused_moe(x_bad, *params.values(), seed, None, k, train, True, 0.0, 1e-2, 1e-2,
                                              1e-2, True, True, torch.float32, True)
    others = torch.arange(n, device=DEVICE) != 7
    assert not torch.isfinite(y_bad[7]).any() and not torch.isfinite(y_ref[7]).any()
    for got, clean in ((y_bad, y_clean), (dx_bad, dx_clean)):
        assert torch.isfinite(got[others]).all()
        assert row_error(got[others], clean[others]) < TOL[torch.float32]
    for routing in (idx, fused_idx):
        assert routing.min() >= 0 and routing.max() < t
        assert torch.equal(routing[others], clean_idx[others])
    assert torch.equal(idx, fused_idx)


@pytest.mark.parametrize("variant", ["dense", "dispatch"])
def test_ties_pick_the_lowest_index(variant):
    """At initialisation W_g = 0, so in eval every logit ties: both backends pick experts 0..k-1."""
    torch.manual_seed(0)
    layer = SharedSwiGLUMoE(27, 27, 5, k=2, dropout=0.0).to(DEVICE).eval()
    tri = copy.deepcopy(layer)
    tri.backend, tri.triton_variant = "triton", variant
    x = torch.randn(33, 27, device=DEVICE)
    with torch.no_grad():
        _, top, _ = reference.noisy_top_k_gating(x, layer.w_gate, layer.w_noise, 2, train=False)
        idx = dispatch_gate(x, dict(layer.named_parameters()), torch.zeros(1, dtype=torch.int64, device=DEVICE), 2,
                            False)[0]
        y_ref, _ = layer(x)
        y_tri, _ = tri(x)
    assert torch.equal(top.cpu(), torch.tensor([[0, 1]] * 33)) and torch.equal(idx.long().cpu(), top.cpu())
    assert row_error(y_tri, y_ref) < TOL[torch.float32]


@pytest.mark.parametrize("variant", ["dense", "dispatch"])
def test_deterministic(variant):
    n, m, d_h, t, k = 300, 27, 27, 5, 2
    params = make_params(m, d_h, t, seed=11)
    x = torch.randn(n, m, dtype=torch.float64)
    runs = []
    for _ in range(2):
        xt, pt, y, aux = triton_run(x, params, k, True, torch.float16, variant, seed=99)
        (y.float().square().sum() + aux).backward()
        runs.append([y, aux, xt.grad] + [pt[name].grad for name in NAMES])
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_seed_on_the_device_reproduces_and_advances():
    """torch.manual_seed reproduces a training call; consecutive calls draw fresh noise and
    dropout; the functional form with the drawn seed gives the reference's result."""
    layer = SharedSwiGLUMoE(27, 27, 5, k=2, dropout=0.2, backend="triton").to(DEVICE).train()
    with torch.no_grad():
        layer.w_gate.normal_(0, 0.5)
        layer.w_noise.normal_(0, 0.5)
    x = torch.randn(64, 27, device=DEVICE)
    torch.manual_seed(3)
    y1, aux1 = layer(x)
    y2, _ = layer(x)
    torch.manual_seed(3)
    y3, aux3 = layer(x)
    assert torch.equal(y1, y3) and torch.equal(aux1, aux3) and not torch.equal(y1, y2)
    # the seed a call draws is torch.randint's next value on the device: replay it explicitly
    torch.manual_seed(3)
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=DEVICE)
    params = [p.detach() for p in (layer.w_gate, layer.w_noise, layer.w1, layer.b1, layer.v, layer.b_v, layer.w2,
                                   layer.b2)]
    y4, _ = moe_triton(x, *params, 2, True, seed=seed, dropout=0.2)
    assert torch.equal(y1, y4)
    y_nodrop, _ = moe_triton(x, *params, 2, True, seed=seed, dropout=0.0)
    y_ref, _ = reference.moe_reference(x.double().cpu(), *(p.double().cpu() for p in params), 2, True,
                                       noise=gate_noise(seed, 64, 5, DEVICE).double().cpu())
    assert row_error(y_nodrop, y_ref) < TOL[torch.float32]
    kept = y1 != 0
    torch.testing.assert_close(y1[kept], y_nodrop[kept] / 0.8, rtol=1e-5, atol=1e-6)
    assert 0.7 < kept.float().mean().item() < 0.9


def test_fused_dropout_forward_and_backward():
    """Dropout inside the fused kernel: the keep mask it returns, y = y₀ ⊙ keep / (1 − p), and the
    gradients equal those of the undropped layer fed dy ⊙ keep / (1 − p)."""
    n, m, d_h, t, k, p = 300, 27, 40, 3, 2, 0.3
    params = [v.float().to(DEVICE) for v in make_params(m, d_h, t, seed=4).values()]
    x = torch.randn(n, m, device=DEVICE)
    seed = torch.tensor([77], device=DEVICE)
    options = (k, True, True)
    rest = (1e-2, 1e-2, 1e-2, True, True, torch.float32, True)
    y0, aux0, idx0, stats0, keep0 = ops.fused_moe(x, *params, seed, None, *options, 0.0, *rest)
    y1, aux1, idx1, stats1, keep1 = ops.fused_moe(x, *params, seed, None, *options, p, *rest)
    assert keep0.numel() == 0 and keep1.shape == (n, m) and abs(keep1.float().mean().item() - (1 - p)) < 0.02
    torch.testing.assert_close(y1, y0 * keep1 / (1 - p), rtol=1e-6, atol=1e-6)
    assert torch.equal(aux0, aux1) and torch.equal(idx0, idx1)
    dy = torch.randn(n, m, device=DEVICE)
    d_aux = torch.tensor(2.0, device=DEVICE)
    g0 = ops.fused_moe_backward(dy * keep1 / (1 - p), d_aux, x, *params[:7], seed, None, idx0, stats0, keep0, *options,
                                0.0, *rest)
    g1 = ops.fused_moe_backward(dy, d_aux, x, *params[:7], seed, None, idx1, stats1, keep1, *options, p, *rest)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["dense", "dispatch"])
def test_zero_and_one_token(variant):
    params = {name: p.float().to(DEVICE).requires_grad_() for name, p in make_params(27, 27, 5, seed=2).items()}
    x = torch.zeros(0, 27, device=DEVICE, requires_grad=True)
    y, aux = moe_triton(x, *params.values(), 2, True, variant=variant)
    assert y.shape == (0, 27) and aux.item() == 0.0
    (y.sum() + aux).backward()
    assert x.grad.shape == (0, 27) and all(p.grad is None or not p.grad.any() for p in params.values())
    errors = compare(1, 27, 27, 5, 2, True, torch.float32, variant, "philox")
    assert max(errors.values()) <= TOL[torch.float32], errors


@pytest.mark.parametrize("variant", ["dense", "dispatch"])
def test_noncontiguous_and_misaligned_inputs(variant):
    """A transposed x and an x that starts one element into its storage give the right answer."""
    n, m = 37, 27
    params = [p.float().to(DEVICE) for p in make_params(m, 27, 5, seed=8).values()]
    x = torch.randn(n, m, device=DEVICE)
    y, aux = moe_triton(x, *params, 2, False, variant=variant)
    transposed = x.t().contiguous().t()
    shifted = torch.empty(n * m + 1, device=DEVICE)[1:].view(n, m).copy_(x)
    for other in (transposed, shifted):
        y2, aux2 = moe_triton(other, *params, 2, False, variant=variant)
        assert torch.equal(y, y2) and torch.equal(aux, aux2)


def test_softmax_k_worked_example():
    """SPEC Eq. 4 through the gate kernel: x = identity rows so that x W_g = H; eval (H = clean logits)."""
    h = torch.tensor([[4.4742, -5.6365, 6.8226, 0.9960], [3.5298, 2.3049, 1.2113, -1.3946],
                      [-2.2414, 0.3925, 1.6676, -1.9253]])
    expected = torch.tensor([[0.0872, 0.0, 0.9128, 0.0], [0.7729, 0.2271, 0.0, 0.0], [0.0, 0.2184, 0.7816, 0.0]])
    m = 16
    x = torch.zeros(3, m)
    x[:, :3] = torch.eye(3)
    w_gate = torch.zeros(m, 4)
    w_gate[:3] = h
    params = {name: p.float() for name, p in make_params(m, 8, 4).items()}
    params["w_gate"], params["w_noise"] = w_gate, torch.zeros_like(w_gate)
    idx, gate, (importance, load) = dispatch_gate(x.to(DEVICE), {n: p.to(DEVICE) for n, p in params.items()},
                                                  torch.zeros(1, dtype=torch.int64, device=DEVICE), 2, False)
    dense = torch.zeros(3, 4).scatter(1, idx.long().cpu(), gate.cpu())
    torch.testing.assert_close(dense, expected, atol=5e-5, rtol=0)
    torch.testing.assert_close(importance.cpu(), expected.sum(0), atol=2e-4, rtol=0)
    torch.testing.assert_close(load.cpu(), torch.tensor([2.0, 2.0, 2.0, 0.0]))


@pytest.mark.parametrize("variant", ["dispatch", "dense"])
def test_empty_experts(variant):
    """Experts 2..4 get no token (eval: the gate logits favour 0 and 1 for every token)."""
    n, m, d_h, t, k = 21, 16, 27, 5, 2
    params = make_params(m, d_h, t, seed=7)
    x = torch.rand(n, m, dtype=torch.float64) + 0.1
    params["w_gate"] = torch.full((m, t), -1.0, dtype=torch.float64)
    params["w_gate"][:, 0], params["w_gate"][:, 1] = 1.0, 0.5
    xt, pt, y, aux = triton_run(x, params, k, False, torch.float32, variant)
    xr, pr, yr, auxr = reference_run(x, params, k, False, None)
    (y.double().sum() + aux).backward()
    (yr.sum() + auxr).backward()
    assert row_error(y, yr) < 1e-4 and row_error(xt.grad, xr.grad) < 1e-4 and row_error(pt["w1"].grad,
                                                                                        pr["w1"].grad) < 1e-4
    assert torch.count_nonzero(pt["w1"].grad[2:]) == 0 and torch.count_nonzero(pt["b1"].grad[2:]) == 0


def test_module_backend_swap_and_autocast():
    """One state_dict for both backends; under fp16 autocast the fp32 master weights get fp32
    gradients close to the reference's, with x and the weights converted inside the kernels."""
    torch.manual_seed(0)
    ref = SharedSwiGLUMoE(27, 27, 5, k=2, dropout=0.0).to(DEVICE)
    with torch.no_grad():
        ref.w_gate.normal_(0, 0.5)
        ref.w_noise.normal_(0, 0.5)
    tri = SharedSwiGLUMoE(27, 27, 5, k=2, dropout=0.0, backend="triton").to(DEVICE)
    tri.load_state_dict(ref.state_dict())
    assert tri.resolved_variant == "dense"
    x = torch.randn(3, 13, 27, device=DEVICE)
    noise = torch.randn(39, 5, device=DEVICE)
    for training in (True, False):
        ref.train(training), tri.train(training)
        y_ref, aux_ref = ref(x, noise)
        y_tri, aux_tri = tri(x, noise)
        assert y_tri.shape == x.shape
        assert row_error(y_tri, y_ref) < 1e-4 and row_error(aux_tri, aux_ref) < 1e-4
    tri.train(), ref.train()
    oracle = copy.deepcopy(ref).double()
    dy = torch.randn(3, 13, 27, device=DEVICE)
    y64, aux64 = oracle(x.double(), noise.double())
    torch.autograd.backward((y64, aux64), (dy.double(), torch.tensor(10.0, dtype=torch.float64)))
    with torch.autocast(DEVICE, dtype=torch.float16):
        y, aux = tri(x, noise)
    assert y.dtype == torch.float32  # x's dtype: the products ran in fp16, the fp32 residual stream needs no cast
    torch.autograd.backward((y, aux), (dy, torch.tensor(10.0)))
    for (name, p64), p_tri in zip(oracle.named_parameters(), tri.parameters()):
        assert p_tri.grad.dtype == torch.float32
        assert row_error(p_tri.grad, p64.grad) < TOL[torch.float16], name
    auto = SharedSwiGLUMoE(16, 27, 5, backend="auto")
    assert auto.uses_triton(torch.randn(2, 16)) is False  # "auto" runs the reference on CPU tensors


def test_variant_rule():
    assert SharedSwiGLUMoE(16, 8, 8).resolved_variant == "dense"
    assert SharedSwiGLUMoE(16, 8, 9).resolved_variant == "dispatch"
    assert SharedSwiGLUMoE(16, 8, 9, triton_variant="dense").resolved_variant == "dense"
    with pytest.raises(ValueError, match="triton_variant.*16 experts"):
        SharedSwiGLUMoE(16, 8, 17, triton_variant="dense")

def _args(n=9, m=16, d_h=27, t=5, dtype=torch.float32):
    p = make_params(m, d_h, t)
    return torch.randn(n, m, device=DEVICE, dtype=dtype), {name: v.to(DEVICE, dtype) for name, v in p.items()}


@pytest.mark.parametrize("mutate,match", [
    (lambda x, a: a.__setitem__("w1", a["w1"][:, :, :-1]), "b1 must have shape"),
    (lambda x, a: a.__setitem__("w1", a["w1"][0]), "w1 must have shape.*shared"),
    (lambda x, a: a.__setitem__("w2", a["w2"][:-1]), "w2 must have shape"),
    (lambda x, a: a.__setitem__("v", a["v"].int()), "v must be a floating-point"),
])
def test_bad_arguments(mutate, match):
    x, args = _args()
    mutate(x, args)
    with pytest.raises((ValueError, TypeError), match=match):
        moe_triton(x, *args.values(), 2, True)


def test_bad_arguments_x_k_noise(monkeypatch):
    x, args = _args()
    with pytest.raises(ValueError, match="k must be"):
        moe_triton(x, *args.values(), 6, True)
    with pytest.raises(TypeError, match="x has dtype torch.float64"):
        moe_triton(x.double(), *args.values(), 2, True)
    with pytest.raises(ValueError, match="noise must have shape"):
        moe_triton(x, *args.values(), 2, True, noise=torch.randn(9, 4, device=DEVICE))
    with pytest.raises(ValueError, match="variant must be"):
        moe_triton(x, *args.values(), 2, True, variant="sparse")
    with pytest.raises(ValueError, match="shared"):
        SharedSwiGLUMoE(16, 27, 5, shared=("w2",), backend="triton")
    with pytest.raises(ValueError, match="triton_variant"):
        SharedSwiGLUMoE(16, 27, 5, triton_variant="sparse")
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="x is on cpu.*CUDA"):
            moe_triton(x, *args.values(), 2, True)


def test_module_copy_keeps_state_dict():
    ref = SharedSwiGLUMoE(16, 27, 3)
    tri = copy.deepcopy(ref)
    tri.backend = "triton"
    assert tri.state_dict().keys() == ref.state_dict().keys()


def test_gate_noise_is_reproducible_standard_normal():
    a = gate_noise(5, 300, 5, DEVICE)
    assert torch.equal(a, gate_noise(torch.tensor([5]), 300, 5, DEVICE))
    assert not torch.equal(a, gate_noise(6, 300, 5, DEVICE))
    assert abs(a.mean().item()) < 0.1 and abs(a.std().item() - 1.0) < 0.1


@triton.jit
def _cos_two_pi_kernel(u_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, gating._cos_two_pi(tl.load(u_ptr + offs, mask=offs < n)), mask=offs < n)


@triton.jit
def _triton_randn_kernel(out_ptr, seed, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.randn(seed, offs), mask=offs < n)


def test_gate_cosine_is_fp32_accurate_over_the_unit_interval():
    """The gate noise's cos(2π u) (a polynomial, no libdevice argument reduction) on a grid of
    u in [0, 1) with its ends and the quadrant points: within 3e-7 of float64 (fp32's ulp at 1 is
    1.2e-7; 1.5e-7 measured under the interpreter)."""
    u = torch.cat([torch.linspace(0, 1, 4097)[:-1], torch.tensor([0.25, 0.5, 0.75, 1 - 2**-24])])
    out = torch.empty(u.numel(), device=DEVICE)
    _cos_two_pi_kernel[(triton.cdiv(u.numel(), 1024),)](u.to(DEVICE), out, u.numel(), BLOCK=1024)
    want = torch.cos(2 * torch.pi * u.double())
    assert (out.cpu().double() - want).abs().max().item() < 3e-7


def test_gate_noise_is_triton_randn_within_rounding():
    """The gate's draws are tl.randn's Box-Muller on the same Philox uniforms; only the cosine is
    computed otherwise: equal within 1e-5 (|ε| < 5.7; 1.3e-6 measured under the interpreter)."""
    n = 4096
    ours = gate_noise(11, n, 1, DEVICE).reshape(-1)
    theirs = torch.empty(n, device=DEVICE)
    _triton_randn_kernel[(n // 1024,)](theirs, 11, n, BLOCK=1024)
    assert (ours - theirs).abs().max().item() < 1e-5
