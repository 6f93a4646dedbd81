"""The many-expert path (:mod:`mlit_kernels.dispatch`) against the float64 reference, per row
(:func:`mlit_kernels.reference.max_row_error`), under Triton's interpreter on the CPU.

Tolerances (worst row, relative): fp32 1e-4, fp16 1e-2, bf16 5e-2 — as tests/moe/test_kernels.py
(measured here: fp32 ~1e-6, fp16 ~1.5e-3, bf16 ~1e-2). Shapes are small (the interpreter runs
each program one at a time); N is awkward (not a multiple of the 32-token gate tile).
"""

from __future__ import annotations

import pytest
import torch

from mlit_kernels import SharedSwiGLUMoE, gate_noise, reference
from mlit_kernels.reference import max_row_error as row_error
from mlit_kernels.common.tiling import interpreting

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not interpreting():
    pytest.skip("no CUDA and Triton kernels were imported without TRITON_INTERPRET=1", allow_module_level=True)

from mlit_kernels import ops  # noqa: E402
from mlit_kernels.dispatch import launch  # noqa: E402
from mlit_kernels.functional import moe_triton  # noqa: E402
from mlit_kernels.meter import measure_layer  # noqa: E402

TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
NAMES = ("w_gate", "w_noise", "w1", "b1", "v", "b_v", "w2", "b2")


def make_params(m, d_h, t, separate, seed=0, gate_scale=0.5):
    """float64 parameters; V, W2 (and biases) per expert when ``separate``."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    lead = (t,) if separate else ()
    return {"w_gate": r(m, t) * gate_scale, "w_noise": r(m, t) * gate_scale, "w1": r(t, m, d_h) / m**0.5,
            "b1": r(t, d_h) * 0.1, "v": r(*lead, m, d_h) / m**0.5, "b_v": r(*lead, d_h) * 0.1,
            "w2": r(*lead, d_h, m) / d_h**0.5, "b2": r(*lead, m) * 0.1}


def run_both(x, params, k, train, dtype, noise_mode="philox", seed=7):
    """Both backends forward and backward; x and the expert weights rounded to ``dtype`` first.
    Returns {name: (triton value or gradient, float64 reference)}."""
    n, t = x.shape[0], params["w_gate"].shape[1]
    x = x.to(dtype).double()
    params = {name: p.to(torch.float32 if name in ("w_gate", "w_noise") else dtype).double()
              for name, p in params.items()}
    philox = torch.tensor([seed], dtype=torch.int64)
    draws = torch.Generator().manual_seed(seed)
    noise = {"philox": gate_noise(philox, n, t, DEVICE).cpu(), "tensor": torch.randn(n, t, generator=draws),
             None: None}[noise_mode]
    xr = x.clone().requires_grad_()
    pr = {name: p.clone().requires_grad_() for name, p in params.items()}
    yr, auxr = reference.moe_reference(xr, *pr.values(), k, train, noise=None if noise is None else noise.double())
    xt = x.to(DEVICE, dtype).requires_grad_()
    pt = {name: p.to(DEVICE, torch.float32 if name in ("w_gate", "w_noise") else dtype).requires_grad_()
          for name, p in params.items()}
    y, aux = moe_triton(xt, *pt.values(), k, train, seed=philox.to(DEVICE), variant="dispatch",
                        noise=noise.to(DEVICE) if noise_mode == "tensor" else None)
    dy = torch.randn(n, x.shape[1], dtype=torch.float64, generator=draws)
    torch.autograd.backward((y, aux), (dy.to(DEVICE, y.dtype), torch.tensor(10.0, device=DEVICE)))
    torch.autograd.backward((yr, auxr), (dy.to(dtype).double(), torch.tensor(10.0, dtype=torch.float64)))
    assert y.dtype == dtype and y.shape == x.shape and aux.shape == ()
    out = {"y": (y, yr), "aux": (aux, auxr), "x": (xt.grad, xr.grad)}
    for name in NAMES:
        ref = pr[name].grad if pr[name].grad is not None else torch.zeros_like(pr[name])
        out["d" + name] = (pt[name].grad, ref)
    return out


def errors(results):
    return {name: row_error(got, ref) for name, (got, ref) in results.items()}


CASES = [  # N, m, d_h, t, k, train, dtype, separate experts, noise
    (37, 16, 16, 16, 2, True, torch.float32, False, "philox"),
    (20, 27, 16, 32, 2, True, torch.float16, False, "tensor"),
    (33, 16, 27, 8, 1, True, torch.bfloat16, True, "philox"),
    (21, 16, 16, 16, 1, False, torch.float32, True, None),
    (33, 16, 16, 8, 8, True, torch.float32, False, "philox"),  # k = t: the load is the routing counts
]


@pytest.mark.parametrize("n,m,d_h,t,k,train,dtype,separate,noise_mode", CASES)
def test_matches_reference(n, m, d_h, t, k, train, dtype, separate, noise_mode):
    x = torch.randn(n, m, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    found = errors(run_both(x, make_params(m, d_h, t, separate, seed=t), k, train, dtype, noise_mode))
    bad = {name: e for name, e in found.items() if not e <= TOL[dtype]}
    assert not bad, f"per-row errors above {TOL[dtype]}: {bad} (all: {found})"


@pytest.mark.parametrize("k,experts", [(1, [3]), (2, [3, 5])])
def test_all_tokens_on_few_experts(k, experts):
    """Eval with W_g favouring ``experts`` for every token: the other experts are empty (zero
    gradients), and with k = 1 all tokens sit on one expert (one group spanning both gate tiles)."""
    n, m, d_h, t = 40, 16, 16, 16
    params = make_params(m, d_h, t, separate=True, seed=2)
    params["w_gate"] = torch.full((m, t), -1.0, dtype=torch.float64)
    for rank, e in enumerate(experts):
        params["w_gate"][:, e] = 1.0 - 0.25 * rank
    x = torch.rand(n, m, dtype=torch.float64) + 0.1
    results = run_both(x, params, k, False, torch.float32, None)
    found = errors(results)
    assert max(found.values()) <= TOL[torch.float32], found
    others = [e for e in range(t) if e not in experts]
    for name in ("dw1", "db1", "dv", "db_v", "dw2", "db2"):
        assert torch.count_nonzero(results[name][0][others]) == 0, name


def test_super_chunks(monkeypatch):
    """Groups spanning several super-chunks of gate tiles (2 tiles each here) gather the same rows."""
    monkeypatch.setattr(launch, "SUPER_TILES", 2)
    x = torch.randn(100, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    found = errors(run_both(x, make_params(16, 16, 8, separate=False, seed=4), 2, True, torch.float32))
    assert max(found.values()) <= TOL[torch.float32], found


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("separate", [True, False])
def test_weight_gradient_strips(monkeypatch, recompute, separate):
    """The weight gradients over several m column groups (16 columns each here), with a, u, dh
    recomputed or da, du, hc stored by the experts' backward and read; shared V / W2 summed over
    two slots of two experts."""
    monkeypatch.setattr(launch, "WEIGHT_GROUP_MAX", 16)
    monkeypatch.setattr(launch, "STRIP_PROGRAMS", 6)
    assert launch.expert_slots(4, 3, separate) == ((4, 1) if separate else (2, 2))
    monkeypatch.setattr(launch, "recompute_intermediates", lambda *args: recompute)
    assert launch.weight_groups(40)[0] == 3
    x = torch.randn(33, 40, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    found = errors(run_both(x, make_params(40, 16, 4, separate, seed=8), 2, True, torch.float32))
    assert max(found.values()) <= TOL[torch.float32], found


def test_weight_group_chunks():
    """A column group at most WEIGHT_SINGLE_CHUNK_MAX wide is one power-of-two chunk (padded, masked);
    wider ones keep the fewest power-of-two chunks."""
    assert launch.weight_groups(108) == (1, (128, 0, 0, 0))
    assert launch.weight_groups(40) == (1, (64, 0, 0, 0))
    assert launch.weight_groups(144) == (1, (16, 128, 0, 0))
    assert launch.weight_groups(384) == (1, (128, 256, 0, 0))


@pytest.mark.parametrize("recompute", [True, False])
def test_padded_weight_chunk(monkeypatch, recompute):
    """m = 40 in one 64-wide chunk: the 24 padded columns neither add to nor land in the gradients."""
    monkeypatch.setattr(launch, "recompute_intermediates", lambda *args: recompute)
    x = torch.randn(29, 40, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    found = errors(run_both(x, make_params(40, 16, 3, separate=True, seed=9), 2, True, torch.float32))
    assert max(found.values()) <= TOL[torch.float32], found


def test_recompute_rule():
    """Recomputed where it costs less modelled H100 time (one column group, large N) or where the
    stored intermediates would exceed the least traffic; else stored."""
    weights = 64 * 3 * 384 * 1536 * 4  # 384/1536/64 separate experts, fp32
    assert launch.recompute_intermediates(37120 * 2, 384, 1536, 2, weights // 64, 10**12, 10**12)
    assert not launch.recompute_intermediates(2048 * 2, 384, 1536, 2, weights, 10**12, 10**12)  # the weights' read
    # 3 column groups (m = 1024): stored (7.3 GB) unless the step's bytes would pass 3x the least
    assert not launch.recompute_intermediates(37120 * 4, 1024, 4096, 2, 0, 6 * 10**9, 8 * 10**9)
    assert launch.recompute_intermediates(37120 * 4, 1024, 4096, 2, 0, 3 * 10**9, 3 * 10**9)


def _forward(x, params, k, train, seed=11):
    return ops.dispatch_moe(x, *(params[name] for name in NAMES), torch.tensor([seed], device=DEVICE), None, k, train,
                            train, 0.0, 1e-2, 1e-2, 1e-2, True, True, x.dtype)


def test_routing_tables():
    """route (count, first) per gate tile and expert and the tile's pairs ordered by expert."""
    n, m, t, k = 45, 16, 16, 2
    params = {name: p.float().to(DEVICE) for name, p in make_params(m, 16, t, False, seed=3).items()}
    x = torch.randn(n, m, device=DEVICE)
    _, _, idx, gates, route, local, _, _, _ = _forward(x, params, k, True)
    idx, route, local = idx.long().cpu(), route.long().cpu(), local.long().cpu()
    block = launch.ROUTE_BLOCK_N
    torch.testing.assert_close(gates.sum(1).cpu(), torch.ones(n))
    for tile in range(-(-n // block)):
        experts = idx[tile * block:(tile + 1) * block].reshape(-1)
        count = torch.bincount(experts, minlength=t)
        assert torch.equal(route[tile, 0], count) and torch.equal(route[tile, 1], count.cumsum(0) - count)
        pairs = local[tile * block * k:][:experts.numel()]
        order = torch.argsort(experts, stable=True) + tile * block * k
        assert torch.equal(pairs, order)


@pytest.mark.parametrize("train", [True, False])
def test_bad_token_stays_in_its_row(train):
    """A NaN token at t = 16: its row is NaN and picks experts 0..k-1 (a NaN logit counts as −∞,
    ties go to the lowest index); every other row is finite and equal to the run without it within
    the fp32 tolerance, with the same routing; indices in [0, t)."""
    n, m, t, k = 40, 16, 16, 2
    params = {name: p.float().to(DEVICE) for name, p in make_params(m, 16, t, False, seed=5).items()}
    x = torch.randn(n, m, device=DEVICE)
    bad = x.clone()
    bad[7, 3] = float("nan")
    with torch.no_grad():
        clean, dirty = _forward(x, params, k, train), _forward(bad, params, k, train)
    others = torch.arange(n, device=DEVICE) != 7
    assert torch.isnan(dirty[0][7]).all() and torch.isfinite(dirty[0][others]).all()
    assert row_error(dirty[0][others], clean[0][others]) < TOL[torch.float32]
    assert torch.equal(dirty[2][others], clean[2][others])
    assert dirty[2].min() >= 0 and dirty[2].max() < t and torch.equal(dirty[2][7].cpu(), torch.tensor([0, 1],
                                                                                                     dtype=torch.int32))


def test_ties_pick_the_lowest_index():
    """W_g = 0 (the layer's initialisation), eval: every logit ties, every token picks 0..k-1."""
    layer = SharedSwiGLUMoE(16, 16, 16, k=2, dropout=0.0).eval()
    tri = SharedSwiGLUMoE(16, 16, 16, k=2, dropout=0.0, backend="triton").eval()
    tri.load_state_dict(layer.state_dict())
    x = torch.randn(33, 16)
    params = {name: p.detach().to(DEVICE) for name, p in tri.named_parameters()}
    with torch.no_grad():
        idx = _forward(x.to(DEVICE), params, 2, False)[2]
        assert torch.equal(idx.cpu(), torch.tensor([[0, 1]] * 33, dtype=torch.int32))
        assert row_error(tri.to(DEVICE)(x.to(DEVICE))[0], layer(x)[0]) < TOL[torch.float32]


@pytest.mark.parametrize("recompute", [True, False])
def test_every_config_computes_the_same_layer(monkeypatch, recompute):
    """Every row tile of the tuning candidates (the interpreter ignores warps), the weight
    gradients' intermediates recomputed or stored: forward and every gradient within the fp16
    tolerance of the first tile's, row by row (not bitwise: a tile's height changes how the sums
    are grouped, on a GPU and in numpy's matmul alike)."""
    monkeypatch.setattr(launch, "recompute_intermediates", lambda *args: recompute)
    n, m, t, k = 40, 16, 8, 2
    params = make_params(m, 16, t, True, seed=6)
    x = torch.randn(n, m, dtype=torch.float64)
    runs = []
    for config in {c.block_r: c for c in launch.configs_for(m)}.values():
        with launch.force_config(config):
            runs.append([got for got, _ in run_both(x, params, k, True, torch.float16).values()])
    assert len(runs) > 1
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert row_error(b, a) < TOL[torch.float16]


def test_dropout_in_the_combine():
    """Dropout fused into the combine: y = y₀ ⊙ keep / (1 − p) with the returned mask."""
    n, m, t, k, p = 40, 16, 16, 2, 0.3
    params = [v.float().to(DEVICE) for v in make_params(m, 16, t, False, seed=4).values()]
    x = torch.randn(n, m, device=DEVICE)
    seed = torch.tensor([77], device=DEVICE)
    y0 = ops.dispatch_moe(x, *params, seed, None, k, True, True, 0.0, 1e-2, 1e-2, 1e-2, True, True, torch.float32)
    y1 = ops.dispatch_moe(x, *params, seed, None, k, True, True, p, 1e-2, 1e-2, 1e-2, True, True, torch.float32)
    keep = y1[8]
    assert y0[8].numel() == 0 and keep.shape == (n, m) and 0.6 < keep.float().mean().item() < 0.8
    torch.testing.assert_close(y1[0], y0[0] * keep / (1 - p), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n", [2048, 256 * 145])
@pytest.mark.parametrize("m,d_h,t,k,shared", [(192, 768, 16, 2, ("v", "w2")), (384, 1536, 64, 2, ("v", "w2")),
                                              (384, 1536, 64, 4, ()), (1024, 2048, 8, 4, ())])
def test_layer_budgets(m, d_h, t, k, shared, n):
    """Pinned: training forward + backward ≤ 10 launches (the seed draw and five kernels, a sixth for
    shared V / W2), eval ≤ 3, no host sync, HBM bytes ≤ 3x the minimum (byte meter, dry run, fp16 autocast), at 2048
    tokens and at a classifier batch (256 × 145)."""
    layer = SharedSwiGLUMoE(m, d_h, t, k=k, shared=shared, backend="triton", triton_variant="dispatch")
    costs = measure_layer(layer, n)
    assert costs.launches <= 10 and costs.launches_eval <= 3, costs.kernels
    assert costs.syncs == 0 and costs.syncs_eval == 0
    assert costs.bytes <= 3 * costs.min_bytes and costs.bytes_eval <= 3 * costs.min_bytes_eval


def test_layer_with_separate_experts():
    """shared=() on the Triton backend: the dispatch variant runs whatever t (here t = 4, where
    "auto" would pick dense for shared V/W2), forward in eval against the reference."""
    torch.manual_seed(0)
    ref = SharedSwiGLUMoE(16, 16, 4, k=2, shared=(), dropout=0.0).eval()
    with torch.no_grad():
        ref.w_gate.normal_(0, 0.5)
    tri = SharedSwiGLUMoE(16, 16, 4, k=2, shared=(), dropout=0.0, backend="triton").eval()
    tri.load_state_dict(ref.state_dict())
    assert tri.resolved_variant == "dispatch"
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        assert row_error(tri.to(DEVICE)(x.to(DEVICE))[0], ref(x)[0]) < TOL[torch.float32]
    with pytest.raises(ValueError, match="variant 'dense' needs V and W2 shared"):
        moe_triton(x.reshape(-1, 16).to(DEVICE), *(p.detach().to(DEVICE) for p in tri.parameters()), 2, False,
                   variant="dense")
    with pytest.raises(ValueError, match="triton_variant: variant 'dense' needs V and W2 shared"):
        SharedSwiGLUMoE(16, 16, 4, shared=(), triton_variant="dense")  # refused when the layer is built
