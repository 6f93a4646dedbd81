"""The reference MoE path against the paper's worked examples and a direct, per-equation computation."""

import math

import pytest
import torch
import torch.nn.functional as F

from mlit_kernels import SharedSwiGLUMoE, reference

# SPEC §5, Eq. 4: H for k = 2, t = 4 and the gates and Ψ it gives, to 4 decimals.
H_EXAMPLE = torch.tensor(
    [[4.4742, -5.6365, 6.8226, 0.9960], [3.5298, 2.3049, 1.2113, -1.3946], [-2.2414, 0.3925, 1.6676, -1.9253]],
    dtype=torch.float64,
)
G_EXAMPLE = torch.tensor(
    [[0.0872, 0.0000, 0.9128, 0.0000], [0.7729, 0.2271, 0.0000, 0.0000], [0.0000, 0.2184, 0.7816, 0.0000]],
    dtype=torch.float64,
)
PSI_EXAMPLE = torch.tensor(
    [[0.9960, 4.4742, 0.9960, 4.4742], [1.2113, 1.2113, 2.3049, 2.3049], [0.3925, -1.9253, -1.9253, 0.3925]],
    dtype=torch.float64,
)


def make_layer(m=12, d_h=7, t=4, k=2, dtype=torch.float64, seed=0, **kwargs):
    """A layer with random (non-zero) gate weights, so that routing depends on x."""
    torch.manual_seed(seed)
    layer = SharedSwiGLUMoE(m, d_h, t, k=k, dropout=0.0, **kwargs).to(dtype)
    with torch.no_grad():
        layer.w_gate.normal_()
        layer.w_noise.normal_(std=0.3)
    return layer


def test_softmax_k_worked_example():
    gates, top = reference.softmax_k(H_EXAMPLE, 2)
    torch.testing.assert_close(gates, G_EXAMPLE, atol=5e-5, rtol=0)
    assert top.tolist() == [[2, 0], [0, 1], [2, 1]]


def test_psi_worked_example():
    torch.testing.assert_close(reference.psi(H_EXAMPLE, 2), PSI_EXAMPLE, atol=5e-5, rtol=0)


def test_coefficient_of_variation_variants():
    v = torch.tensor([1.0, 2.0, 6.0], dtype=torch.float64)
    mean, var_unbiased, var_biased = 3.0, 7.0, 14.0 / 3.0
    assert reference.coefficient_of_variation(v).item() == pytest.approx(var_unbiased / (mean**2 + 1e-10))
    assert reference.coefficient_of_variation(v, unbiased=False).item() == pytest.approx(var_biased / mean**2)
    assert reference.coefficient_of_variation(v, squared=False).item() == pytest.approx(math.sqrt(var_unbiased) / mean)
    assert reference.coefficient_of_variation(v[:1]).item() == 0.0


def naive_moe(layer: SharedSwiGLUMoE, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """Σ over each token's selected experts of G_i · E_i(x), every expert evaluated on its own."""

    def param(name, i):
        p = getattr(layer, name)
        shared_dims = {"w1": 2, "b1": 1, "v": 2, "b_v": 1, "w2": 2, "b2": 1}[name]
        return p if p.dim() == shared_dims else p[i]

    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for i in torch.nonzero(gates[n]).flatten().tolist():
            a = F.silu(x[n] @ param("w1", i) + param("b1", i))
            u = x[n] @ param("v", i) + param("b_v", i)
            out[n] += gates[n, i] * ((a * u) @ param("w2", i) + param("b2", i))
    return out


@pytest.mark.parametrize("shared", [("v", "w2"), ("v", "w1"), ("w1", "w2"), ()])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_factorised_experts_equal_naive_sum(shared, k):
    layer = make_layer(k=k, shared=shared)
    x = torch.randn(9, 12, dtype=torch.float64)
    gates, _, _ = reference.noisy_top_k_gating(x, layer.w_gate, layer.w_noise, k, train=False)
    y = reference.shared_swiglu_experts(x, gates, layer.w1, layer.b1, layer.v, layer.b_v, layer.w2, layer.b2)
    torch.testing.assert_close(y, naive_moe(layer, x, gates), atol=1e-10, rtol=1e-10)


def test_training_loss_matches_per_equation_computation():
    """Eq. 3-10 written out entry by entry with Python scalars."""
    layer = make_layer(m=6, d_h=5, t=4, k=2)
    layer.train()
    x = torch.randn(7, 6, dtype=torch.float64)
    noise = torch.randn(7, 4, dtype=torch.float64)
    _, aux = layer(x, noise=noise)

    clean = (x @ layer.w_gate).tolist()
    raw = (x @ layer.w_noise).tolist()
    eps, k, t = layer.noise_eps, 2, 4
    importance, load = [0.0] * t, [0.0] * t
    for r in range(7):
        std = [math.log1p(math.exp(raw[r][c])) + eps for c in range(t)]
        h = [clean[r][c] + noise[r, c].item() * std[c] for c in range(t)]
        ranked = sorted(h, reverse=True)
        kth, next_after = ranked[k - 1], ranked[k]
        top = [c for c in range(t) if h[c] >= kth]
        denom = sum(math.exp(h[c]) for c in top)
        for c in top:
            importance[c] += math.exp(h[c]) / denom
        for c in range(t):
            threshold = next_after if h[c] >= kth else kth
            load[c] += 0.5 * (1 + math.erf((clean[r][c] - threshold) / std[c] / math.sqrt(2)))

    def cv2(v):
        mean = sum(v) / len(v)
        var = sum((a - mean) ** 2 for a in v) / (len(v) - 1)
        return var / (mean**2 + 1e-10)

    expected = 1e-2 * cv2(importance) + 1e-2 * cv2(load)
    assert aux.item() == pytest.approx(expected, rel=1e-10)


def test_eval_load_is_token_count_and_no_noise():
    layer = make_layer(t=5, k=2).eval()
    x = torch.randn(11, 12, dtype=torch.float64)
    gates, top, load = reference.noisy_top_k_gating(x, layer.w_gate, layer.w_noise, 2, train=False)
    assert load.tolist() == torch.bincount(top.flatten(), minlength=5).double().tolist()
    torch.testing.assert_close(gates.sum(1), torch.ones(11, dtype=torch.float64))


def test_k_equal_t_uses_counts_in_training():
    layer = make_layer(t=3, k=3).train()
    x = torch.randn(5, 12, dtype=torch.float64)
    _, _, load = reference.noisy_top_k_gating(x, layer.w_gate, layer.w_noise, 3, train=True)
    assert load.tolist() == [5.0, 5.0, 5.0]


def test_gradients_reach_every_parameter():
    layer = make_layer().train()
    x = torch.randn(4, 6, 12, dtype=torch.float64, requires_grad=True)
    y, aux = layer(x)
    (y.square().sum() + aux).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"no gradient reaches {name}"
    assert x.grad.abs().sum() > 0


def test_load_loss_alone_trains_gate_and_noise_weights():
    """From the zero start the paper uses, the balancing loss still moves W_g and W_noise."""
    layer = SharedSwiGLUMoE(12, 7, 4, k=2, dropout=0.0).double().train()
    torch.manual_seed(1)
    _, aux = layer(torch.randn(32, 12, dtype=torch.float64))
    aux.backward()
    assert layer.w_gate.grad.abs().sum() > 0
    assert layer.w_noise.grad.abs().sum() > 0


def test_eval_is_deterministic_and_train_noise_is_reproducible():
    layer = SharedSwiGLUMoE(12, 7, 4, dropout=0.1).double()
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    layer.eval()
    y1, l1 = layer(x)
    y2, l2 = layer(x)
    assert torch.equal(y1, y2) and torch.equal(l1, l2)
    layer.train()
    layer.dropout.p = 0.0
    noise = torch.randn(15, 4, dtype=torch.float64)
    assert torch.equal(layer(x, noise=noise)[0], layer(x, noise=noise)[0])


def test_float32_and_float16_agree_with_float64():
    layer = make_layer(dtype=torch.float64).eval()
    x = torch.randn(20, 12, dtype=torch.float64)
    y64, _ = layer(x)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        y, _ = layer.to(dtype)(x.to(dtype))
        assert ((y.double() - y64).norm() / y64.norm()).item() < tol, dtype
        layer.double()


def test_state_dict_names_and_shapes():
    layer = SharedSwiGLUMoE(16, 8, 5)
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert shapes == {
        "w_gate": (16, 5),
        "w_noise": (16, 5),
        "w1": (5, 16, 8),
        "b1": (5, 8),
        "v": (16, 8),
        "b_v": (8,),
        "w2": (8, 16),
        "b2": (16,),
    }
    assert layer.w_gate.abs().sum() == 0 and layer.w_noise.abs().sum() == 0


@pytest.mark.parametrize(
    "kwargs, error, word",
    [
        (dict(k=5), ValueError, "k"),
        (dict(k=0), ValueError, "k"),
        (dict(shared=("u",)), ValueError, "shared"),
        (dict(dropout=1.5), ValueError, "dropout"),
        (dict(backend="cuda-magic"), ValueError, "backend"),
    ],
)
def test_bad_construction_names_the_argument(kwargs, error, word):
    with pytest.raises(error, match=word):
        SharedSwiGLUMoE(8, 4, 4, **kwargs)


def test_bad_input_names_the_argument():
    layer = SharedSwiGLUMoE(8, 4, 3)
    with pytest.raises(ValueError, match="x must have shape"):
        layer(torch.randn(2, 7))
    with pytest.raises(TypeError, match="x must be a floating-point"):
        layer(torch.ones(2, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="noise must have shape"):
        layer.train()(torch.randn(2, 8), noise=torch.randn(3, 3))


def test_noise_free_gating_in_training_counts_the_load():
    """noisy_gating=False, as the cited implementation's switch: no noise, the load is the token
    count per expert (no gradient, W_noise unused) — the same y and loss as evaluation."""
    layer = make_layer(t=4, k=2)
    layer.dropout.p = 0.0
    x = torch.randn(6, 12, dtype=torch.float64)
    expected = layer.eval()(x)
    layer.train().noisy_gating = False
    y, aux = layer(x)
    assert torch.equal(y, expected[0]) and torch.equal(aux, expected[1])
    aux.backward()
    assert layer.w_noise.grad is None


def test_top_k_ties_and_nan_follow_one_rule():
    """Equal logits: the lowest index wins; NaN counts as -inf, so indices stay in [0, t)."""
    h = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 2.0, 1.0, 2.0], [float("nan")] * 5,
                      [float("nan"), 1.0, float("-inf"), 1.0, float("nan")]])
    values, indices = reference.top_k_lowest_index(h, 2)
    assert indices.tolist() == [[0, 1], [1, 2], [0, 1], [1, 3]]
    gates, top = reference.softmax_k(h, 2)
    assert torch.equal(top, indices) and torch.isnan(gates[2, :2]).all() and torch.isfinite(gates[[0, 1, 3]]).all()


def test_reference_takes_the_dtypes_the_kernels_take():
    """fp16 tokens with the fp32 parameters of a model, without autocast: y in fp16, no dtype error."""
    layer = SharedSwiGLUMoE(12, 7, 4, dropout=0.0).eval()
    y, aux = layer(torch.randn(5, 12).half())
    assert y.dtype == torch.float16 and aux.dtype == torch.float32
