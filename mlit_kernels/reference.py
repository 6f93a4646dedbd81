"""The paper's MoE layer in plain PyTorch, written as its equations (SPEC §5).

This is the numerical oracle for the Triton kernels: every function works in any floating dtype,
float64 included, and is differentiable by autograd. Shapes: ``x`` is ``(N, m)`` (N tokens of
width m), ``t`` experts, ``k`` selected per token, hidden width ``d_h``.

Equations (paper numbering):

* Eq. 3   ``H(x) = x W_g + randn ⊙ (softplus(x W_noise) + eps)`` in training, ``x W_g`` otherwise
* Eq. 2/4 ``G(x) = Softmax_k(H(x))``
* Eq. 5-9 ``P(x) = Φ((x W_g − Ψ(H)) / (softplus(x W_noise) + eps))``
* Eq. 10  ``L = w_importance · CV(Σ_rows G) + w_load · CV(Σ_rows P)``
* Eq. 1/13 ``y = Σ_i G_i · ((silu(x W_i + b_i) ⊙ (x V + b_V)) W_2 + b_2)``

The epsilon 1e-2 on the noise scale comes from the implementation the paper cites (David Rau's
PyTorch MoE); so do the squared, unbiased coefficient of variation and the zero start of W_g and
W_noise.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .common.precision import max_row_error  # noqa: F401 - the measure, re-exported for tests and checks
from .common.settings import AUX_LOSS_WEIGHT, CV_EPS, NOISE_EPS


def top_k_lowest_index(h: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest entries of each row of h (N, t), largest first: (values (N, k), indices (N, k)).

    The selection rule every backend follows (reference, ONNX export, Triton kernels): among equal
    values the lowest index wins, and a NaN counts as -inf, so the indices always lie in [0, t)
    and a row of NaN picks experts 0..k-1 (its values, and so its output, stay NaN).
    """
    key = torch.where(torch.isnan(h), torch.full_like(h, float("-inf")), h)
    # Written with comparisons, a sum and an argmax rather than a stable sort, so that the ONNX
    # exporter can express it (it has no stable sort); same result. An entry's rank is the number
    # of entries before it in the order (larger, or equal with a lower index): a permutation of 0..t-1.
    t = h.shape[1]
    position = torch.arange(t, device=h.device)
    before = (key.unsqueeze(2) > key.unsqueeze(1)) | (
        (key.unsqueeze(2) == key.unsqueeze(1)) & (position.view(1, t, 1) < position.view(1, 1, t)))
    rank = before.sum(dim=1)  # (N, t)
    wanted = torch.arange(k, device=h.device).view(1, k, 1)
    indices = (rank.unsqueeze(1) == wanted).to(torch.int32).argmax(dim=2)  # (N, k): the entry of rank r
    return h.gather(1, indices), indices


def softmax_k(h: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over each row's k largest entries, zero elsewhere (Eq. 4).

    h: (N, t) logits. Returns gates (N, t) and the selected expert indices (N, k), the largest
    logit first (ties: lowest index, see :func:`top_k_lowest_index`).
    """
    top_values, top_indices = top_k_lowest_index(h, k)
    top_gates = torch.softmax(top_values, dim=1)
    gates = torch.zeros_like(h).scatter(1, top_indices, top_gates)
    return gates, top_indices


def psi(h: torch.Tensor, k: int) -> torch.Tensor:
    """Ψ(H) of Eq. 6-9: per entry, the threshold it has to beat to be (or stay) in the top k.

    With l^k and l^(k+1) the k-th and (k+1)-th largest value of a row of h (N, t):
    Ψ = l^(k+1) where the entry is in the top k (h ≥ l^k), else l^k. Needs k < t.
    """
    top_values = top_k_lowest_index(h, k + 1)[0]
    kth, next_after = top_values[:, k - 1 : k], top_values[:, k : k + 1]
    return torch.where(h >= kth, next_after, kth)


def normal_cdf(z: torch.Tensor) -> torch.Tensor:
    """Φ, the standard normal cumulative distribution function."""
    return 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))


def load_probability(clean: torch.Tensor, h: torch.Tensor, noise_std: torch.Tensor, k: int) -> torch.Tensor:
    """P(x) of Eq. 5: the probability that each expert stays in a token's top k under new noise.

    clean = x W_g, h = the noisy logits H(x), noise_std = softplus(x W_noise) + eps; all (N, t).
    """
    return normal_cdf((clean - psi(h, k)) / noise_std)


def coefficient_of_variation(v: torch.Tensor, squared: bool = True, unbiased: bool = True) -> torch.Tensor:
    """CV of a vector (t,): ``var / (mean² + CV_EPS)`` (CV_EPS = 1e-10) when squared, its square root otherwise.

    unbiased divides the variance by t − 1 (torch's default, as the cited implementation did);
    a single expert has no variation (0).
    """
    if v.numel() == 1:
        return v.new_zeros(())
    cv2 = v.var(unbiased=unbiased) / (v.mean() ** 2 + CV_EPS)
    return cv2 if squared else torch.sqrt(cv2 + CV_EPS**2)


def noisy_top_k_gating(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_noise: torch.Tensor,
    k: int,
    train: bool,
    noise: torch.Tensor | None = None,
    noise_eps: float = NOISE_EPS,
    noisy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noisy top-k gating (Eq. 2-9).

    x (N, m); w_gate, w_noise (m, t); noise (N, t) standard normal draws, or None to draw them.
    ``noisy=False`` gates without noise in training (the cited implementation's switch). Returns
    gates G (N, t), the selected experts (N, k), and load (t,): Σ_rows P(x) when training with
    noise and k < t, else the number of tokens routed to each expert (no gradient), as the cited
    implementation.
    """
    clean = x @ w_gate
    t = clean.shape[1]
    noisy = train and noisy
    if noisy:
        noise_std = F.softplus(x @ w_noise) + noise_eps
        if noise is None:
            noise = torch.randn_like(clean)
        h = clean + noise.to(clean.dtype) * noise_std
    else:
        h = clean
    gates, top_indices = softmax_k(h, k)
    if noisy and k < t:
        load = load_probability(clean, h, noise_std, k).sum(0)
    else:
        load = torch.zeros_like(h).scatter(1, top_indices, 1.0).sum(0)
    return gates, top_indices, load


def auxiliary_loss(
    gates: torch.Tensor,
    load: torch.Tensor,
    w_importance: float = AUX_LOSS_WEIGHT,
    w_load: float = AUX_LOSS_WEIGHT,
    squared_cv: bool = True,
    unbiased: bool = True,
) -> torch.Tensor:
    """L = w_importance · CV(importance) + w_load · CV(load) (Eq. 10); importance = Σ_rows G."""
    importance = gates.sum(0)
    return (w_importance * coefficient_of_variation(importance, squared_cv, unbiased)
            + w_load * coefficient_of_variation(load, squared_cv, unbiased))


def project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x W + b for one shared projection (weight (m, d), bias (d,)) → (N, d), or for one per
    expert (weight (t, m, d), bias (t, d)) → (N, t, d)."""
    if weight.dim() == 2:
        return x @ weight + bias
    return torch.einsum("nm,tmd->ntd", x, weight) + bias


def shared_swiglu_experts(
    x: torch.Tensor,
    gates: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    v: torch.Tensor,
    b_v: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
) -> torch.Tensor:
    """y = Σ_i G_i · E_i(x) with SwiGLU experts E_i = (silu(x W_i + b_i) ⊙ (x V + b_V)) W_2 + b_2.

    x (N, m); gates (N, t), each row summing to 1. Each of the three projections is either shared
    (w1 (m, d_h), v (m, d_h), w2 (d_h, m)) or per expert (a leading t). With W_2 shared the gates
    combine in the hidden space, so x V and the W_2 product are done once per token:
    y = ((x V + b_V) ⊙ Σ_i G_i silu(x W_i + b_i)) W_2 + b_2. Returns (N, m).
    """
    activated = F.silu(project(x, w1, b1))
    value = project(x, v, b_v)
    per_expert = activated.dim() == 3 or value.dim() == 3
    if per_expert:
        activated = activated if activated.dim() == 3 else activated.unsqueeze(1)
        value = value if value.dim() == 3 else value.unsqueeze(1)
    hidden = activated * value  # (N, d_h), or (N, t, d_h) with a per-expert W or V
    if w2.dim() == 2:
        if per_expert:
            hidden = torch.einsum("nt,ntd->nd", gates.to(hidden.dtype), hidden)
        return hidden @ w2 + b2
    if not per_expert:
        hidden = hidden.unsqueeze(1).expand(-1, gates.shape[1], -1)
    out = torch.einsum("ntd,tdm->ntm", hidden, w2) + b2
    return torch.einsum("nt,ntm->nm", gates.to(out.dtype), out)


def moe_reference(
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
    noisy_gating: bool = True,
    noise_eps: float = NOISE_EPS,
    dropout: float = 0.0,
    w_importance: float = AUX_LOSS_WEIGHT,
    w_load: float = AUX_LOSS_WEIGHT,
    squared_cv: bool = True,
    unbiased_cv: bool = True,
    norm: tuple | None = None,
    residual: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole MoE layer in plain PyTorch: (y (N, m), aux_loss ()), the twin of
    :func:`mlit_kernels.moe_triton` with the same arguments (any sharing of W_1, V, W_2).
    ``norm``: None, or (weight (m,), bias (m,), eps) of a LayerNorm applied to x first
    (``F.layer_norm``; outside autocast its weight and bias are cast to x's dtype); ``residual``:
    y = x + the layer's output.

    The gate and the balancing loss run in at least float32, also under autocast; the experts
    under autocast in its dtype, else in x's dtype (the weights are cast to it). ``dropout``
    applies to y in training (one mask per token, after the combine)."""
    inputs = x
    if norm is not None:
        weight, bias, eps = norm
        if not torch.is_autocast_enabled(x.device.type):
            weight, bias = weight.to(x.dtype), bias.to(x.dtype)
        x = F.layer_norm(x, x.shape[-1:], weight, bias, eps)
    gate_dtype = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        gates, _, load = noisy_top_k_gating(x.to(gate_dtype), w_gate.to(gate_dtype), w_noise.to(gate_dtype), k,
                                            training, noise, noise_eps, noisy_gating)
        aux = auxiliary_loss(gates, load, w_importance, w_load, squared_cv, unbiased_cv)
    if not torch.is_autocast_enabled(x.device.type):
        w1, b1, v, b_v, w2, b2 = (p.to(x.dtype) for p in (w1, b1, v, b_v, w2, b2))
    y = F.dropout(shared_swiglu_experts(x, gates, w1, b1, v, b_v, w2, b2), dropout, training)
    return (inputs + y if residual else y), aux
