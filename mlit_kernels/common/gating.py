"""The noisy top-k gate's math as Triton device functions (SPEC §5, Eq. 2-9), shared by the fused
layer kernels (:mod:`mlit_kernels.dense`) and the gate of the dispatch path
(:mod:`mlit_kernels.dispatch`); :func:`gate_noise` gives the gate's Philox draws.

All gate arithmetic is fp32 with IEEE products, whatever the activation dtype: the top-k choice
is discontinuous, and fp16 or tf32 logits would pick other experts than the reference for near
ties. A tile is BLOCK_N tokens × BLOCK_T expert columns (BLOCK_T ≥ 16 ≥ t, padding columns
excluded by ``col_ok``).

Selection rule (the reference's :func:`mlit_kernels.reference.top_k_lowest_index`): the largest
logits first, the lowest index among equal ones, NaN counted as -inf, so every index is in
[0, t) whatever the input.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .norm import normalized_cols
from .settings import CV_EPS, NOISE_GIVEN, NOISE_NONE, NOISE_PHILOX

_CV_EPS = tl.constexpr(CV_EPS)
_CV_EPS_SQUARED = tl.constexpr(CV_EPS * CV_EPS)
GATE_BLOCK_K = tl.constexpr(16)  # K chunk of the fp32 gate products: the whole m in registers spills on sm_90


@triton.jit
def softplus(z):
    """torch.nn.functional.softplus (beta 1, threshold 20)."""
    return tl.where(z > 20.0, z, tl.log(1.0 + tl.exp(tl.minimum(z, 20.0))))


@triton.jit
def gate_logits(x_ptr, wg_ptr, wn_ptr, rows, row_ok, cols, col_ok, M, T, NOISY: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, ln_w_ptr, ln_b_ptr, mean, rstd, NORM: tl.constexpr):
    """clean = x W_g and raw = x W_noise (fp32, (BLOCK_N, BLOCK_T)) for a tile of rows of x (N, M);
    with NORM, of LayerNorm(x) (weight, bias at ln_w_ptr / ln_b_ptr, the rows' mean and rstd
    (BLOCK_N,): :mod:`mlit_kernels.common.norm`)."""
    clean = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
    raw = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
    for k0 in range(0, M, GATE_BLOCK_K):
        ks = k0 + tl.arange(0, GATE_BLOCK_K)
        k_ok = ks < M
        xb = normalized_cols(x_ptr, rows, row_ok, ks, k_ok, M, ln_w_ptr, ln_b_ptr, mean, rstd, NORM)
        wmask = k_ok[:, None] & col_ok[None, :]
        wg = tl.load(wg_ptr + ks[:, None] * T + cols[None, :], mask=wmask, other=0.0).to(tl.float32)
        clean += tl.dot(xb, wg, input_precision="ieee")
        if NOISY:
            wn = tl.load(wn_ptr + ks[:, None] * T + cols[None, :], mask=wmask, other=0.0).to(tl.float32)
            raw += tl.dot(xb, wn, input_precision="ieee")
    return clean, raw


# sin x = x (1 + x² (S3 + x² (S5 + …))) on [-π/2, π/2], the Taylor terms to x¹¹ (truncation below 6e-8)
_SIN_TERMS = tl.constexpr((-1 / 6, 1 / 120, -1 / 5040, 1 / 362880, -1 / 39916800))
_TWO_PI = tl.constexpr(6.283185307179586)


@triton.jit
def _cos_two_pi(u):
    """cos(2π u) for u in [0, 1) (fp32, within 3e-7), by symmetry sin(2π z) of z = 1/4 -
    min(u, 1 - u) in [-1/4, 1/4], a polynomial: no argument reduction, unlike ``tl.cos`` (libdevice
    ``cosf``), whose slow path for huge arguments declares a local array that sm_90 kernels kept
    in local memory, inside their loops (bench/RESULTS.md, "sm_90 audit")."""
    x = _TWO_PI * (0.25 - tl.minimum(u, 1.0 - u))
    x2 = x * x
    p = _SIN_TERMS[4]
    for i in tl.static_range(3, -1, -1):
        p = _SIN_TERMS[i] + x2 * p
    return x + x * x2 * p


@triton.jit
def standard_normal(seed, offs):
    """Philox standard-normal draws (fp32, offs' shape): ``tl.randn``'s Box-Muller on the same two
    uniforms (equal to it within fp32 rounding of the cosine)."""
    i1, i2, _, _ = tl.randint4x(seed, offs)
    u1 = tl.maximum(1.0e-7, tl.uint_to_uniform_float(i1))
    return tl.sqrt(-2.0 * tl.log(u1)) * _cos_two_pi(tl.uint_to_uniform_float(i2))


@triton.jit
def gate_noise_tile(noise_ptr, seed, rows, row_ok, cols, col_ok, T, NOISE_MODE: tl.constexpr):
    """The standard-normal ε of a tile: loaded (N, T) fp32, or :func:`standard_normal` (seed, row·T + col)."""
    offs = rows[:, None] * T + cols[None, :]
    if NOISE_MODE == 1:
        return tl.load(noise_ptr + offs, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    return standard_normal(seed, offs)


@triton.jit
def gate_tile(x_ptr, wg_ptr, wn_ptr, noise_ptr, seed, rows, row_ok, cols, col_ok, M, T, noise_eps,
              NOISY: tl.constexpr, NOISE_MODE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr):
    """clean, raw, the noise scale std = softplus(raw) + eps, the noise ε and the logits h of a
    token tile (fp32, (BLOCK_N, BLOCK_T)); without noise std = 1, ε = 0 and h = clean."""
    return gate_tile_normed(x_ptr, wg_ptr, wn_ptr, noise_ptr, seed, rows, row_ok, cols, col_ok, M, T, noise_eps,
                            NOISY, NOISE_MODE, BLOCK_N, BLOCK_T, x_ptr, x_ptr, 0.0, 0.0, False)


@triton.jit
def gate_tile_normed(x_ptr, wg_ptr, wn_ptr, noise_ptr, seed, rows, row_ok, cols, col_ok, M, T, noise_eps,
                     NOISY: tl.constexpr, NOISE_MODE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
                     ln_w_ptr, ln_b_ptr, mean, rstd, NORM: tl.constexpr):
    """:func:`gate_tile` of LayerNorm(x) with NORM (the trailing arguments: see :func:`gate_logits`)."""
    clean, raw = gate_logits(x_ptr, wg_ptr, wn_ptr, rows, row_ok, cols, col_ok, M, T, NOISY, BLOCK_N, BLOCK_T,
                             ln_w_ptr, ln_b_ptr, mean, rstd, NORM)
    std = tl.full(clean.shape, 1.0, tl.float32)
    eps = tl.zeros(clean.shape, dtype=tl.float32)
    h = clean
    if NOISY:
        std = softplus(raw) + noise_eps
        eps = gate_noise_tile(noise_ptr, seed, rows, row_ok, cols, col_ok, T, NOISE_MODE)
        h = clean + eps * std
    return clean, raw, std, eps, h


@triton.jit
def pick_next(key, taken, cols, BLOCK_T: tl.constexpr):
    """The column of each row's largest not-yet-taken key (lowest index among equals).

    key (BLOCK_N, BLOCK_T) fp32 without NaN; taken int32 0/1 (padding columns marked taken)."""
    avail = taken == 0
    best = tl.max(tl.where(avail, key, float("-inf")), axis=1)
    return tl.min(tl.where(avail & (key == best[:, None]), cols[None, :], BLOCK_T), axis=1)


@triton.jit
def selection_key(h, col_ok):
    """The logits as the selection sees them (NaN → -inf) and the initial ``taken`` mask (padding
    columns taken, so never picked)."""
    key = tl.where(h != h, float("-inf"), h)
    taken = tl.where(col_ok[None, :], 0, 1) + tl.zeros(h.shape, dtype=tl.int32)
    return key, taken


@triton.jit
def select_top_k(key, taken, cols, idx_ptr, rows, row_ok, K: tl.constexpr, BLOCK_T: tl.constexpr):
    """Pick each row's k largest keys in order and store their columns in idx (N, K) int32.
    Returns the updated ``taken`` and the k-th pick's column."""
    col = pick_next(key, taken, cols, BLOCK_T)
    for j in tl.static_range(K):
        col = pick_next(key, taken, cols, BLOCK_T)
        tl.store(idx_ptr + rows.to(tl.int64) * K + j, col, mask=row_ok)
        taken = tl.where(cols[None, :] == col[:, None], 1, taken)
    return taken, col


@triton.jit
def load_top_k(taken, cols, idx_ptr, rows, row_ok, K: tl.constexpr):
    """The selection stored by :func:`select_top_k` (the forward's choice, reused by a backward
    so that recomputed logits can never pick differently). Returns ``taken`` and the k-th column."""
    col = tl.zeros(rows.shape, dtype=tl.int32)
    for j in tl.static_range(K):
        col = tl.load(idx_ptr + rows.to(tl.int64) * K + j, mask=row_ok, other=0)
        taken = tl.where(cols[None, :] == col[:, None], 1, taken)
    return taken, col


@triton.jit
def gate_probs(h, key, taken, col_ok, kth_col, cols, BLOCK_T: tl.constexpr):
    """Softmax_k over the selected logits, after :func:`select_top_k` / :func:`load_top_k`.

    Returns sel (int32 0/1: selected), g (the gates, zero off the selection), kth (the k-th largest
    logit), nxt / nxt_col (the (k+1)-th and its column; unused when k = t)."""
    sel = taken * tl.where(col_ok[None, :], 1, 0)
    nxt_col = pick_next(key, taken, cols, BLOCK_T)
    kth = tl.sum(tl.where(cols[None, :] == kth_col[:, None], h, 0.0), axis=1)
    nxt = tl.sum(tl.where(cols[None, :] == nxt_col[:, None], h, 0.0), axis=1)
    top = tl.max(tl.where(sel != 0, key, float("-inf")), axis=1)
    e = tl.where(sel != 0, tl.exp(h - top[:, None]), 0.0)
    g = e / tl.sum(e, axis=1)[:, None]
    return sel, g, kth, nxt, nxt_col


@triton.jit
def load_probability(clean, h, std, kth, nxt):
    """P(x) = Φ((clean − Ψ(H)) / std), Ψ = l^(k+1) where h ≥ l^k, else l^k (Eq. 5-9)."""
    psi = tl.where(h >= kth[:, None], nxt[:, None], kth[:, None])
    z = (clean - psi) / std
    return 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))


@triton.jit
def gate_grads(dg, h, clean, std, eps, raw, sel, g, kth, kth_col, nxt, nxt_col, d_load, valid, cols,
                  NOISY: tl.constexpr, LOAD_P: tl.constexpr):
    """d clean and d raw (fp32, (BLOCK_N, BLOCK_T)) from dL/dG (``dg``, importance term included)
    and dL/d load (``d_load`` (BLOCK_T,), used when LOAD_P): autograd of the reference, through
    Softmax_k, the noise scale and P(x), whose Ψ gathers H at the k-th / (k+1)-th columns."""
    selected = (sel != 0) & valid
    dh = tl.where(selected, g * (dg - tl.sum(tl.where(selected, g * dg, 0.0), axis=1)[:, None]), 0.0)
    dclean = tl.zeros(h.shape, dtype=tl.float32)
    dstd = tl.zeros(h.shape, dtype=tl.float32)
    if LOAD_P:
        psi = tl.where(h >= kth[:, None], nxt[:, None], kth[:, None])
        z = (clean - psi) / std
        dz = tl.where(valid, d_load[None, :] * tl.exp(-0.5 * z * z) * 0.3989422804014327, 0.0)
        dclean += dz / std
        dstd -= dz * z / std
        dpsi = -dz / std
        in_top = h >= kth[:, None]
        to_kth = tl.sum(tl.where(in_top, 0.0, dpsi), axis=1)  # entries outside the top k used l^k
        to_nxt = tl.sum(tl.where(in_top, dpsi, 0.0), axis=1)  # entries inside used l^(k+1)
        dh += tl.where(cols[None, :] == kth_col[:, None], to_kth[:, None], 0.0)
        dh += tl.where(cols[None, :] == nxt_col[:, None], to_nxt[:, None], 0.0)
    dclean += dh
    draw = tl.zeros(h.shape, dtype=tl.float32)
    if NOISY:
        draw = tl.where(valid, (dstd + dh * eps) * tl.sigmoid(raw), 0.0)
    return tl.where(valid, dclean, 0.0), draw


@triton.jit
def token_tile(tile, seed_ptr, N, T, NEEDS_SEED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr):
    """Token tile ``tile`` (a program's index, or an offset one): rows, row_ok, the gate columns,
    col_ok, valid (both), and the Philox seed (read only when something is drawn: the seed tensor
    is left unset otherwise)."""
    rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_T)
    seed = 0
    if NEEDS_SEED:
        seed = tl.load(seed_ptr)
    return rows, rows < N, cols, cols < T, (rows < N)[:, None] & (cols < T)[None, :], seed


@triton.jit
def gate_from_selection(x_ptr, wg_ptr, wn_ptr, noise_ptr, seed, idx_ptr, rows, row_ok, cols, col_ok, M, T, noise_eps,
                         K: tl.constexpr, NOISY: tl.constexpr, NOISE_MODE: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_T: tl.constexpr):
    """The gate of a token tile recomputed with the forward's stored selection (so that recomputed
    logits can never pick other experts): clean, raw, std, ε, h, sel, g, kth, kth_col, nxt, nxt_col."""
    return gate_from_selection_normed(x_ptr, wg_ptr, wn_ptr, noise_ptr, seed, idx_ptr, rows, row_ok, cols, col_ok, M, T,
                                      noise_eps, K, NOISY, NOISE_MODE, BLOCK_N, BLOCK_T, x_ptr, x_ptr, 0.0, 0.0, False)


@triton.jit
def gate_from_selection_normed(x_ptr, wg_ptr, wn_ptr, noise_ptr, seed, idx_ptr, rows, row_ok, cols, col_ok, M, T,
                               noise_eps, K: tl.constexpr, NOISY: tl.constexpr, NOISE_MODE: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, ln_w_ptr, ln_b_ptr, mean, rstd,
                               NORM: tl.constexpr):
    """:func:`gate_from_selection` of LayerNorm(x) with NORM (the trailing arguments: see :func:`gate_logits`)."""
    clean, raw, std, eps, h = gate_tile_normed(x_ptr, wg_ptr, wn_ptr, noise_ptr, seed, rows, row_ok, cols, col_ok, M, T,
                                        noise_eps, NOISY, NOISE_MODE, BLOCK_N, BLOCK_T, ln_w_ptr, ln_b_ptr, mean,
                                        rstd, NORM)
    key, taken = selection_key(h, col_ok)
    taken, kth_col = load_top_k(taken, cols, idx_ptr, rows, row_ok, K)
    sel, g, kth, nxt, nxt_col = gate_probs(h, key, taken, col_ok, kth_col, cols, BLOCK_T)
    return clean, raw, std, eps, h, sel, g, kth, kth_col, nxt, nxt_col


@triton.jit
def cv_grad(v_ptr, scale, cols, col_ok, T, SQUARED: tl.constexpr, UNBIASED: tl.constexpr):
    """scale · d CV(v) / d v (BLOCK_T,) of the reference's coefficient of variation of v (T,) fp32:
    cv² = var / (mean² + CV_EPS); the plain CV is sqrt(cv² + CV_EPS²). Zero for T = 1, and zero
    where ``scale`` (the loss weight times d aux) is 0 — the balancing loss not differentiated —
    even when v is not finite: a NaN token's statistics must not reach the other tokens' gradients
    through a term nobody asked for (0 · NaN)."""
    v = tl.load(v_ptr + cols, mask=col_ok, other=0.0)
    mean = tl.sum(v, axis=0) / T
    dev = tl.where(col_ok, v - mean, 0.0)
    ddof = 1 if UNBIASED else 0
    var = tl.sum(dev * dev, axis=0) / tl.maximum(T - ddof, 1)
    denom = mean * mean + _CV_EPS
    dvar = 2.0 * dev / tl.maximum(T - ddof, 1)
    grad = (dvar * denom - var * 2.0 * mean / T) / (denom * denom)
    if not SQUARED:
        grad = grad / (2.0 * tl.sqrt(var / denom + _CV_EPS_SQUARED))
    grad = tl.where(col_ok & (T > 1), grad, 0.0)
    return tl.where(scale != 0, scale * grad, 0.0)


@triton.jit
def cv_value(v, col_ok, T, SQUARED: tl.constexpr, UNBIASED: tl.constexpr):
    """CV(v) of a (BLOCK_T,) fp32 vector over its first T entries, as the reference."""
    mean = tl.sum(tl.where(col_ok, v, 0.0), axis=0) / T
    dev = tl.where(col_ok, v - mean, 0.0)
    ddof = 1 if UNBIASED else 0
    cv2 = tl.sum(dev * dev, axis=0) / tl.maximum(T - ddof, 1) / (mean * mean + _CV_EPS)
    if not SQUARED:
        cv2 = tl.sqrt(cv2 + _CV_EPS_SQUARED)
    return tl.where(T > 1, cv2, 0.0)


@triton.jit
def noise_kernel(out_ptr, seed_ptr, total, BLOCK: tl.constexpr):
    """out[i] = :func:`standard_normal` (seed, i) for i < total: the gate noise the kernels draw, as a tensor."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, standard_normal(tl.load(seed_ptr), offs), mask=offs < total)


def gate_noise(seed: int | torch.Tensor, n_tokens: int, num_experts: int, device="cpu") -> torch.Tensor:
    """The exact (N, t) standard-normal draws the gate kernels use for ``seed`` (fp32): an int, or
    the (1,) int64 seed tensor a layer call drew."""
    seed = torch.as_tensor(seed, dtype=torch.int64).reshape(1).to(device)
    out = torch.empty(n_tokens, num_experts, device=device, dtype=torch.float32)
    total = out.numel()
    if total:
        block = 1024
        noise_kernel[(triton.cdiv(total, block),)](out, seed, total, BLOCK=block)
    return out


__all__ = ["softplus", "gate_logits", "gate_noise_tile", "gate_tile", "gate_tile_normed", "gate_from_selection_normed",
           "selection_key", "select_top_k", "load_top_k",
           "gate_probs", "load_probability", "gate_grads", "cv_grad", "cv_value", "NOISE_NONE", "NOISE_GIVEN",
           "NOISE_PHILOX", "token_tile", "gate_from_selection", "pick_next", "noise_kernel", "gate_noise",
           "standard_normal"]
