"""Triton backend of the MoE layer against the float64 reference (SPEC §5).

On a machine without CUDA the kernels run through Triton's interpreter: TRITON_INTERPRET=1 must
be set before the first Triton kernel module (mlit_kernels.gate / dispatch / swiglu /
functions) is imported, which this file does at the top; `import mlit_kernels` alone defines no
kernel. The same tests run on CUDA when a GPU is present (then the tensors are put there).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import copy  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from mlit_kernels import SharedSwiGLUMoE, reference  # noqa: E402
from mlit_kernels.dispatch import interpreting, route  # noqa: E402
from mlit_kernels.functions import moe_triton  # noqa: E402
from mlit_kernels.gate import gate_forward, gate_noise  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not interpreting():
    pytest.skip("no CUDA and Triton kernels were imported without TRITON_INTERPRET=1", allow_module_level=True)

# ‖out − ref‖ / ‖ref‖ against float64, worst over y, aux and all gradients; measured on the
# interpreter (CASES below): fp32 ≤ 1.7e-6, fp16 ≤ 8.3e-4. Margins for the GPU's reduction orders.
TOL = {torch.float32: 1e-4, torch.float16: 1e-2}
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


def reference_run(x, params, k, train, noise):
    """float64 reference: y, aux and the gradients of <y, dy> + 10·aux."""
    x = x.detach().double().requires_grad_()
    p = {n: v.detach().double().requires_grad_() for n, v in params.items()}
    gates, top, load = reference.noisy_top_k_gating(x, p["w_gate"], p["w_noise"], k, train,
                                                    None if noise is None else noise.double())
    aux = reference.auxiliary_loss(gates, load)
    y = reference.shared_swiglu_experts(x, gates, p["w1"], p["b1"], p["v"], p["b_v"], p["w2"], p["b2"])
    return x, p, y, aux, top


def triton_run(x, params, k, train, dtype, variant, noise=None, seed=None):
    xt = x.to(DEVICE, dtype).requires_grad_()
    pt = {n: v.to(DEVICE, torch.float32 if n in ("w_gate", "w_noise") else dtype)
          .requires_grad_() for n, v in params.items()}
    y, aux = moe_triton(xt, **pt, k=k, training=train, noise=noise, seed=seed, variant=variant)
    return xt, pt, y, aux


def rel(out, ref):
    out = torch.zeros_like(ref) if out is None else out.detach().double().cpu()
    ref_norm = ref.norm()
    return ((out - ref).norm() / ref_norm).item() if ref_norm > 0 else (out - ref).norm().item()


CASES = [  # N, m, d_h, t, k, train, dtype, variant, noise ("seed" in-kernel Philox / "tensor" passed in)
    (37, 16, 27, 5, 2, True, torch.float32, "dispatch", "seed"),
    (37, 16, 27, 5, 2, True, torch.float32, "dense", "seed"),
    (145, 16, 32, 3, 1, True, torch.float32, "dispatch", "tensor"),
    (145, 16, 32, 3, 3, True, torch.float32, "dense", "seed"),  # k = t: load = counts
    (1, 16, 27, 3, 2, True, torch.float32, "dispatch", "seed"),  # N = 1
    (1, 16, 72, 5, 1, False, torch.float32, "dense", None),
    (53, 108, 27, 5, 5, False, torch.float32, "dispatch", None),  # k = t, eval
    (53, 108, 72, 8, 2, True, torch.float32, "dense", "tensor"),
    (29, 144, 32, 8, 1, False, torch.float32, "dispatch", None),
    (37, 16, 27, 5, 2, True, torch.float16, "dispatch", "seed"),
    (37, 16, 27, 5, 2, True, torch.float16, "dense", "tensor"),
    (145, 108, 27, 5, 2, False, torch.float16, "dispatch", None),
    (64, 144, 72, 3, 2, True, torch.float16, "dense", "seed"),
    (17, 16, 32, 8, 8, True, torch.float16, "dispatch", "tensor"),  # k = t = 8
]


@pytest.mark.parametrize("n,m,d_h,t,k,train,dtype,variant,noise_mode", CASES)
def test_forward_backward_match_reference(n, m, d_h, t, k, train, dtype, variant, noise_mode):
    torch.manual_seed(n * 1000 + m + d_h + t + k)
    params = make_params(m, d_h, t, seed=n + t)
    x = torch.randn(n, m, dtype=torch.float64)
    x = x.to(dtype).double()  # the reference sees exactly the inputs the kernels see
    params = {name: p.to(torch.float32 if name in ("w_gate", "w_noise") else dtype).double()
              for name, p in params.items()}
    seed = 1234 + n
    if noise_mode == "seed":
        noise_tensor, noise_arg = gate_noise(seed, n, t, DEVICE).cpu(), None
    elif noise_mode == "tensor":
        noise_tensor = torch.randn(n, t)
        noise_arg = noise_tensor.to(DEVICE)
    else:
        noise_tensor = noise_arg = None
    xt, pt, y, aux = triton_run(x, params, k, train, dtype, variant, noise=noise_arg, seed=seed)
    xr, pr, yr, auxr, _ = reference_run(x, params, k, train, noise_tensor)
    dy = torch.randn(n, params["w2"].shape[1], dtype=torch.float64)
    ((y.double() * dy.to(DEVICE)).sum() + 10 * aux).backward()
    ((yr * dy).sum() + 10 * auxr).backward()
    assert y.dtype == dtype and y.shape == (n, m)
    tol = TOL[dtype]
    errors = {"y": rel(y, yr), "aux": rel(aux, auxr), "x": rel(xt.grad, xr.grad)}
    errors.update({name: rel(pt[name].grad, pr[name].grad if pr[name].grad is not None else
                             torch.zeros_like(pr[name])) for name in NAMES})
    bad = {name: e for name, e in errors.items() if not e <= tol}
    assert not bad, f"relative errors above {tol}: {bad} (all: {errors})"


def test_softmax_k_worked_example():
    """SPEC Eq. 4: x = identity rows so that x W_g = H; eval mode (H = clean logits)."""
    h = torch.tensor([[4.4742, -5.6365, 6.8226, 0.9960], [3.5298, 2.3049, 1.2113, -1.3946],
                      [-2.2414, 0.3925, 1.6676, -1.9253]])
    expected = torch.tensor([[0.0872, 0.0, 0.9128, 0.0], [0.7729, 0.2271, 0.0, 0.0], [0.0, 0.2184, 0.7816, 0.0]])
    m = 16
    x = torch.zeros(3, m)
    x[:, :3] = torch.eye(3)
    w_gate = torch.zeros(m, 4)
    w_gate[:3] = h
    idx, gate, importance, load = gate_forward(x.to(DEVICE), w_gate.to(DEVICE), torch.zeros_like(w_gate).to(DEVICE),
                                               2, False)
    dense = torch.zeros(3, 4).scatter(1, idx.long().cpu(), gate.cpu())
    torch.testing.assert_close(dense, expected, atol=5e-5, rtol=0)
    torch.testing.assert_close(importance.cpu(), expected.sum(0), atol=2e-4, rtol=0)
    torch.testing.assert_close(load.cpu(), torch.tensor([2.0, 2.0, 2.0, 0.0]))


@pytest.mark.parametrize("train", [True, False])
def test_routing_and_permutation(train):
    n, m, t, k = 145, 16, 5, 2
    params = make_params(m, 16, t, seed=3, gate_scale=1.0)
    x = torch.randn(n, m, generator=torch.Generator().manual_seed(5))
    noise = torch.randn(n, t, generator=torch.Generator().manual_seed(6))
    idx, gate, _, _ = gate_forward(x.to(DEVICE), params["w_gate"].float().to(DEVICE),
                                   params["w_noise"].float().to(DEVICE), k, train, noise=noise.to(DEVICE))
    gates_ref, top_ref, _ = reference.noisy_top_k_gating(x.double(), params["w_gate"], params["w_noise"], k, train,
                                                         noise.double())
    assert torch.equal(idx.long().cpu(), top_ref)
    torch.testing.assert_close(gate.double().cpu(), gates_ref.gather(1, top_ref), atol=1e-6, rtol=1e-5)
    routing = route(idx, t)
    sorted_pairs, pair_pos = routing.sorted_pairs.long().cpu(), routing.pair_pos.long().cpu()
    assert torch.equal(sorted_pairs.sort().values, torch.arange(n * k))  # a true permutation
    assert torch.equal(pair_pos[sorted_pairs], torch.arange(n * k))  # and its inverse
    assert torch.equal(sorted_pairs, torch.argsort(idx.reshape(-1).long().cpu(), stable=True))
    counts = torch.bincount(idx.reshape(-1).long().cpu(), minlength=t)
    assert torch.equal(routing.counts.long().cpu(), counts)
    assert torch.equal(routing.expert_offsets.long().cpu(), torch.cat([torch.zeros(1, dtype=torch.long),
                                                                       counts.cumsum(0)]))


@pytest.mark.parametrize("variant", ["dispatch", "dense"])
def test_empty_experts(variant):
    """Experts 2..4 get no token (eval: the gate logits favour 0 and 1 for every token)."""
    n, m, d_h, t, k = 21, 16, 27, 5, 2
    params = make_params(m, d_h, t, seed=7)
    x = torch.rand(n, m, dtype=torch.float64) + 0.1
    params["w_gate"] = torch.full((m, t), -1.0, dtype=torch.float64)
    params["w_gate"][:, 0], params["w_gate"][:, 1] = 1.0, 0.5
    xt, pt, y, aux = triton_run(x, params, k, False, torch.float32, variant)
    xr, pr, yr, auxr, top = reference_run(x, params, k, False, None)
    assert set(top.unique().tolist()) == {0, 1}
    (y.double().sum() + aux).backward()
    (yr.sum() + auxr).backward()
    assert rel(y, yr) < 1e-4 and rel(xt.grad, xr.grad) < 1e-4 and rel(pt["w1"].grad, pr["w1"].grad) < 1e-4
    assert torch.count_nonzero(pt["w1"].grad[2:]) == 0 and torch.count_nonzero(pt["b1"].grad[2:]) == 0


@pytest.mark.parametrize("variant", ["dispatch", "dense"])
def test_deterministic(variant):
    n, m, d_h, t, k = 67, 16, 27, 5, 2
    params = make_params(m, d_h, t, seed=11)
    x = torch.randn(n, m, dtype=torch.float64)
    runs = []
    for _ in range(2):
        xt, pt, y, aux = triton_run(x, params, k, True, torch.float16, variant, seed=99)
        (y.float().square().sum() + aux).backward()
        runs.append([y, aux, xt.grad] + [pt[name].grad for name in NAMES])
    for first, second in zip(*runs):
        assert torch.equal(first, second)
    # the dispatch and dense variants compute the same a, c and h (up to the GEMMs' row tiling)
    if variant == "dense":
        _, _, y_dispatch, _ = triton_run(x, params, k, True, torch.float16, "dispatch", seed=99)
        torch.testing.assert_close(y_dispatch, runs[0][0], atol=2e-3, rtol=2e-3)


def test_module_backend_swap_and_autocast():
    torch.manual_seed(0)
    ref = SharedSwiGLUMoE(16, 27, 5, k=2, dropout=0.0).to(DEVICE)
    with torch.no_grad():
        ref.w_gate.normal_(0, 0.5)
        ref.w_noise.normal_(0, 0.5)
    tri = SharedSwiGLUMoE(16, 27, 5, k=2, dropout=0.0, backend="triton", triton_variant="dense").to(DEVICE)
    tri.load_state_dict(ref.state_dict())
    assert tri.resolved_variant is None
    x = torch.randn(3, 13, 16, device=DEVICE)
    noise = torch.randn(39, 5, device=DEVICE)
    for training in (True, False):
        ref.train(training), tri.train(training)
        y_ref, aux_ref = ref(x, noise)
        y_tri, aux_tri = tri(x, noise)
        assert y_tri.shape == x.shape
        assert rel(y_tri, y_ref.double().cpu()) < 1e-4 and rel(aux_tri, aux_ref.double().cpu()) < 1e-4
    assert tri.resolved_variant == "dense"
    # fp16 autocast training step: fp32 parameters get fp32 gradients close to the reference's
    tri.train(), ref.train()
    tri.triton_variant = "auto"
    for module in (ref, tri):
        with torch.autocast(DEVICE, dtype=torch.float16):
            y, aux = module(x, noise)
        if module is tri:
            assert y.dtype == torch.float16
        (y.float().sum() + aux).backward()
    assert tri.resolved_variant in ("dispatch", "dense")
    for (name, p_ref), p_tri in zip(ref.named_parameters(), tri.parameters()):
        assert p_tri.grad.dtype == torch.float32
        assert rel(p_tri.grad, p_ref.grad.double().cpu()) < 2e-2, name
    # "auto" runs the reference on CPU tensors, Triton on CUDA tensors
    auto = SharedSwiGLUMoE(16, 27, 5, backend="auto")
    assert auto._use_triton(torch.randn(2, 16)) is False


def _args(n=9, m=16, d_h=27, t=5, dtype=torch.float32):
    p = make_params(m, d_h, t)
    args = {name: v.to(DEVICE, torch.float32 if name in ("w_gate", "w_noise") else dtype) for name, v in p.items()}
    return torch.randn(n, m, device=DEVICE, dtype=dtype), args


@pytest.mark.parametrize("mutate,match", [
    (lambda x, a: a.__setitem__("w1", a["w1"][:, :, :-1]), "b1 must have shape"),
    (lambda x, a: a.__setitem__("w1", a["w1"][0]), "w1 must have shape.*shared"),
    (lambda x, a: a.__setitem__("w2", a["w2"][:-1]), "w2 must have shape"),
    (lambda x, a: a.__setitem__("v", a["v"].half()), "v has dtype"),
    (lambda x, a: a.__setitem__("w_gate", a["w_gate"].half()), "w_gate must be float32"),
    (lambda x, a: a.__setitem__("v", a["v"].t().contiguous().t()), "v must be contiguous"),
])
def test_bad_arguments(mutate, match):
    x, args = _args()
    mutate(x, args)
    with pytest.raises((ValueError, TypeError), match=match):
        moe_triton(x, **args, k=2, training=True)


def test_bad_arguments_x_k_noise(monkeypatch):
    x, args = _args()
    with pytest.raises(ValueError, match="k must be"):
        moe_triton(x, **args, k=6, training=True)
    with pytest.raises(ValueError, match="x must be contiguous"):
        moe_triton(torch.randn(16, 9, device=DEVICE).t(), **args, k=2, training=True)
    with pytest.raises(ValueError, match="noise must have shape"):
        moe_triton(x, **args, k=2, training=True, noise=torch.randn(9, 4, device=DEVICE))
    with pytest.raises(ValueError, match="variant must be"):
        moe_triton(x, **args, k=2, training=True, variant="sparse")
    with pytest.raises(ValueError, match="shared"):
        SharedSwiGLUMoE(16, 27, 5, shared=("w2",), backend="triton")
    with pytest.raises(ValueError, match="triton_variant"):
        SharedSwiGLUMoE(16, 27, 5, triton_variant="sparse")
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="x is on cpu.*CUDA"):
            moe_triton(x, **args, k=2, training=True)


def test_module_copy_keeps_state_dict():
    ref = SharedSwiGLUMoE(16, 27, 3)
    tri = copy.deepcopy(ref)
    tri.backend = "triton"
    assert tri.state_dict().keys() == ref.state_dict().keys()


def test_kernels_compile_for_sm90(tmp_path):
    """Every kernel compiles to a cubin for sm_90 (H100) with the ptxas bundled in the triton wheel:
    checks what the interpreter does not (tl.dot shapes, types, shared memory). No GPU needed."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1",
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    ptxas = Path(__import__("triton").__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("no ptxas bundled with this triton")
    result = subprocess.run([sys.executable, str(root / "bench" / "gpu_report.py"), "--compile-check", "90", "--quick",
                             str(tmp_path / "compile.md")], env=env, capture_output=True, text=True, timeout=600,
                            check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]


def test_gate_noise_is_reproducible_standard_normal():
    a = gate_noise(5, 300, 5, DEVICE)
    assert torch.equal(a, gate_noise(5, 300, 5, DEVICE)) and not torch.equal(a, gate_noise(6, 300, 5, DEVICE))
    assert abs(a.mean().item()) < 0.1 and abs(a.std().item() - 1.0) < 0.1


def test_bfloat16():
    """bf16 activations (on CPU the interpreter runs the experts on fp32 copies, see functions.py)."""
    n, m, d_h, t, k = 37, 16, 27, 5, 2
    params = {name: p.to(torch.float32 if name in ("w_gate", "w_noise") else torch.bfloat16).double()
              for name, p in make_params(m, d_h, t, seed=2).items()}
    x = torch.randn(n, m, dtype=torch.float64).to(torch.bfloat16).double()
    noise = torch.randn(n, t)
    xt, pt, y, aux = triton_run(x, params, k, True, torch.bfloat16, "dispatch", noise=noise.to(DEVICE))
    xr, pr, yr, auxr, _ = reference_run(x, params, k, True, noise)
    (y.double().sum() + aux).backward()
    (yr.sum() + auxr).backward()
    assert y.dtype == torch.bfloat16
    assert rel(y, yr) < 3e-2 and rel(xt.grad, xr.grad) < 3e-2 and rel(pt["w1"].grad, pr["w1"].grad) < 3e-2


def test_variant_choice_is_visible(caplog):
    """triton_variant="auto": the choice is a property and a logging.debug line (without CUDA the
    documented rule: dense when 2·k ≥ t, else dispatch; on CUDA it is measured and cached)."""
    import logging

    layer = SharedSwiGLUMoE(16, 27, 3, k=2, backend="triton").to(DEVICE).eval()
    with caplog.at_level(logging.DEBUG, logger="mlit_kernels"):
        layer(torch.randn(5, 16, device=DEVICE))
    assert layer.resolved_variant in ("dispatch", "dense")
    if DEVICE == "cpu":
        assert layer.resolved_variant == "dense"
    assert any("triton variant" in record.getMessage() for record in caplog.records)
