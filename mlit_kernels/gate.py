"""Fused noisy top-k gate (SPEC §5, Eq. 2-9): Triton kernels, forward and backward.

One program handles a tile of BLOCK_N tokens. In one pass over the tile's rows of x it computes
``clean = x W_g`` and ``raw = x W_noise`` (fp32 accumulation, IEEE fp32 products), then in
registers: the noise scale ``softplus(raw) + eps``, the noisy logits H, the top-k selection, the
Softmax_k weights, Ψ(H) and P(x). It writes only what the rest of the layer needs:

* ``topk_idx`` (N, k) int32 and ``topk_gate`` (N, k) fp32, largest logit first;
* per-tile partial sums (tiles, t) of G (importance) and of P(x) (load) or of the routing
  counts; ``torch.sum`` over the tiles finishes them, so the result is deterministic.

No (N, t) tensor is written. The backward kernel recomputes the gate logits (t ≤ a few dozen, so
this is a small GEMM) rather than saving them, and writes dx (N, m) plus per-tile partial sums
of dW_g and dW_noise.

Noise: either passed in as an (N, t) tensor, or drawn in-kernel with Philox
``tl.randn(seed, row * t + col)``; :func:`gate_noise` returns exactly the draws for a seed so
that the reference can be fed the same noise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import interpreting, next_pow2

GATE_BLOCK_N = 16 if interpreting() else 32
NOISE_NONE, NOISE_GIVEN, NOISE_SEED = 0, 1, 2


@triton.jit
def _softplus(z):
    # torch.nn.functional.softplus with beta=1, threshold=20
    return tl.where(z > 20.0, z, tl.log(1.0 + tl.exp(tl.minimum(z, 20.0))))


@triton.jit
def _gate_logits(x_ptr, wg_ptr, wn_ptr, rows, cols, N, M, T, BLOCK_M: tl.constexpr, WITH_NOISE: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr):
    """clean = x W_g and raw = x W_noise for a tile of rows, fp32 accumulation."""
    clean = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
    raw = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
    row_ok = rows < N
    col_ok = cols < T
    for m0 in range(0, M, BLOCK_M):
        ks = m0 + tl.arange(0, BLOCK_M)
        k_ok = ks < M
        xb = tl.load(x_ptr + rows[:, None] * M + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        xb = xb.to(tl.float32)
        wmask = k_ok[:, None] & col_ok[None, :]
        wg = tl.load(wg_ptr + ks[:, None] * T + cols[None, :], mask=wmask, other=0.0).to(tl.float32)
        clean += tl.dot(xb, wg, input_precision="ieee")
        if WITH_NOISE:
            wn = tl.load(wn_ptr + ks[:, None] * T + cols[None, :], mask=wmask, other=0.0).to(tl.float32)
            raw += tl.dot(xb, wn, input_precision="ieee")
    return clean, raw


@triton.jit
def _noise_tile(noise_ptr, seed, rows, cols, N, T, NOISE_MODE: tl.constexpr):
    offs = rows[:, None] * T + cols[None, :]
    if NOISE_MODE == 1:
        eps = tl.load(noise_ptr + offs, mask=(rows[:, None] < N) & (cols[None, :] < T), other=0.0).to(tl.float32)
    else:
        eps = tl.randn(seed, offs)
    return eps


@triton.jit
def _kth_largest(h, cols, K: tl.constexpr, BLOCK_T: tl.constexpr):
    """Row-wise selection of the K largest entries of h (BLOCK_N, BLOCK_T; padding is -inf).

    Returns the selection mask, the K-th largest value, its column, and the (K+1)-th largest value
    and its column (-inf / garbage when K = t)."""
    work = h
    sel = h < float("-inf")  # all False
    kth = tl.max(work, axis=1)
    kth_col = tl.min(tl.where(work == kth[:, None], cols[None, :], BLOCK_T), axis=1)
    for _ in tl.static_range(K):
        kth = tl.max(work, axis=1)
        kth_col = tl.min(tl.where(work == kth[:, None], cols[None, :], BLOCK_T), axis=1)
        hit = cols[None, :] == kth_col[:, None]
        sel = sel | hit
        work = tl.where(hit, float("-inf"), work)
    nxt = tl.max(work, axis=1)
    nxt_col = tl.min(tl.where(work == nxt[:, None], cols[None, :], BLOCK_T), axis=1)
    return sel, kth, kth_col, nxt, nxt_col


@triton.jit
def _gate_fwd_kernel(
    x_ptr, wg_ptr, wn_ptr, noise_ptr, seed,
    idx_ptr, gate_ptr, imp_part_ptr, load_part_ptr,
    N, M, T, noise_eps,
    K: tl.constexpr, TRAIN: tl.constexpr, NOISE_MODE: tl.constexpr, LOAD_P: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_T)
    row_ok = rows < N
    col_ok = cols < T
    clean, raw = _gate_logits(x_ptr, wg_ptr, wn_ptr, rows, cols, N, M, T, BLOCK_M, TRAIN, BLOCK_N, BLOCK_T)
    if TRAIN:
        std = _softplus(raw) + noise_eps
        eps = _noise_tile(noise_ptr, seed, rows, cols, N, T, NOISE_MODE)
        h = clean + eps * std
    else:
        h = clean
    h = tl.where(col_ok[None, :], h, float("-inf"))
    sel, kth, _, nxt, _ = _kth_largest(h, cols, K, BLOCK_T)
    top = tl.max(h, axis=1)
    e = tl.where(sel, tl.exp(h - top[:, None]), 0.0)
    denom = tl.sum(e, axis=1)
    g = e / denom[:, None]
    # the selected experts in order, largest first (repeats the selection; t is tiny)
    work = h
    for j in tl.static_range(K):
        best = tl.max(work, axis=1)
        col = tl.min(tl.where(work == best[:, None], cols[None, :], BLOCK_T), axis=1)
        hit = cols[None, :] == col[:, None]
        gj = tl.sum(tl.where(hit, g, 0.0), axis=1)
        tl.store(idx_ptr + rows * K + j, col.to(tl.int32), mask=row_ok)
        tl.store(gate_ptr + rows * K + j, gj, mask=row_ok)
        work = tl.where(hit, float("-inf"), work)
    valid = row_ok[:, None] & col_ok[None, :]
    tl.store(imp_part_ptr + pid * T + cols, tl.sum(tl.where(valid, g, 0.0), axis=0), mask=col_ok)
    if LOAD_P:
        psi = tl.where(h >= kth[:, None], nxt[:, None], kth[:, None])
        z = (clean - psi) / std
        p = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
        tl.store(load_part_ptr + pid * T + cols, tl.sum(tl.where(valid, p, 0.0), axis=0), mask=col_ok)
    else:
        cnt = tl.where(valid & sel, 1.0, 0.0)
        tl.store(load_part_ptr + pid * T + cols, tl.sum(cnt, axis=0), mask=col_ok)


@triton.jit
def _gate_bwd_kernel(
    x_ptr, wg_ptr, wn_ptr, noise_ptr, seed,
    dgate_ptr, dimp_ptr, dload_ptr,
    dx_ptr, dwg_part_ptr, dwn_part_ptr,
    N, M, T, noise_eps,
    K: tl.constexpr, TRAIN: tl.constexpr, NOISE_MODE: tl.constexpr, LOAD_P: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_T)
    row_ok = rows < N
    col_ok = cols < T
    valid = row_ok[:, None] & col_ok[None, :]
    clean, raw = _gate_logits(x_ptr, wg_ptr, wn_ptr, rows, cols, N, M, T, BLOCK_M, TRAIN, BLOCK_N, BLOCK_T)
    if TRAIN:
        std = _softplus(raw) + noise_eps
        eps = _noise_tile(noise_ptr, seed, rows, cols, N, T, NOISE_MODE)
        h = clean + eps * std
    else:
        h = clean
    h = tl.where(col_ok[None, :], h, float("-inf"))
    sel, kth, kth_col, nxt, nxt_col = _kth_largest(h, cols, K, BLOCK_T)
    top = tl.max(h, axis=1)
    e = tl.where(sel, tl.exp(h - top[:, None]), 0.0)
    g = e / tl.sum(e, axis=1)[:, None]
    # dL/dG: the pair gradients scattered to their columns, plus the importance term (Σ_rows G)
    dimp = tl.load(dimp_ptr + cols, mask=col_ok, other=0.0)
    dg = tl.where(valid, dimp[None, :], 0.0)
    work = h
    for j in tl.static_range(K):
        best = tl.max(work, axis=1)
        col = tl.min(tl.where(work == best[:, None], cols[None, :], BLOCK_T), axis=1)
        hit = cols[None, :] == col[:, None]
        dgj = tl.load(dgate_ptr + rows * K + j, mask=row_ok, other=0.0)
        dg += tl.where(hit, dgj[:, None], 0.0)
        work = tl.where(hit, float("-inf"), work)
    # softmax over the selected entries; unselected entries of G are constant zeros
    dh = tl.where(sel & valid, g * (dg - tl.sum(tl.where(sel, g * dg, 0.0), axis=1)[:, None]), 0.0)
    dclean = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
    if LOAD_P:
        # P = Φ((clean - Ψ(H)) / std); Ψ gathers H at the k-th / (k+1)-th largest columns
        psi = tl.where(h >= kth[:, None], nxt[:, None], kth[:, None])
        z = (clean - psi) / std
        dload = tl.load(dload_ptr + cols, mask=col_ok, other=0.0)
        dz = tl.where(valid, dload[None, :] * tl.exp(-0.5 * z * z) * 0.3989422804014327, 0.0)
        dclean += dz / std
        dstd_load = -dz * z / std
        dpsi = -dz / std
        in_top = h >= kth[:, None]
        to_kth = tl.sum(tl.where(in_top, 0.0, dpsi), axis=1)  # entries not in the top k used l^k
        to_nxt = tl.sum(tl.where(in_top, dpsi, 0.0), axis=1)  # entries in the top k used l^(k+1)
        dh += tl.where(cols[None, :] == kth_col[:, None], to_kth[:, None], 0.0)
        dh += tl.where(cols[None, :] == nxt_col[:, None], to_nxt[:, None], 0.0)
    dclean += dh
    if TRAIN:
        dstd = dh * eps
        if LOAD_P:
            dstd += dstd_load
        draw = tl.where(valid, dstd * tl.sigmoid(raw), 0.0)
    dclean = tl.where(valid, dclean, 0.0)
    for m0 in range(0, M, BLOCK_M):
        ks = m0 + tl.arange(0, BLOCK_M)
        k_ok = ks < M
        xb = tl.load(x_ptr + rows[:, None] * M + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        xb = xb.to(tl.float32)
        wmask_t = col_ok[:, None] & k_ok[None, :]
        wg_t = tl.load(wg_ptr + ks[None, :] * T + cols[:, None], mask=wmask_t, other=0.0).to(tl.float32)
        dxb = tl.dot(dclean, wg_t, input_precision="ieee")
        dwg = tl.dot(tl.trans(xb), dclean, input_precision="ieee")
        pmask = k_ok[:, None] & col_ok[None, :]
        part = pid * M * T + ks[:, None] * T + cols[None, :]
        tl.store(dwg_part_ptr + part, dwg, mask=pmask)
        if TRAIN:
            wn_t = tl.load(wn_ptr + ks[None, :] * T + cols[:, None], mask=wmask_t, other=0.0).to(tl.float32)
            dxb += tl.dot(draw, wn_t, input_precision="ieee")
            dwn = tl.dot(tl.trans(xb), draw, input_precision="ieee")
            tl.store(dwn_part_ptr + part, dwn, mask=pmask)
        tl.store(dx_ptr + rows[:, None] * M + ks[None, :], dxb, mask=row_ok[:, None] & k_ok[None, :])


@triton.jit
def _noise_kernel(out_ptr, seed, total, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.randn(seed, offs), mask=offs < total)


def gate_noise(seed: int, n_tokens: int, num_experts: int, device="cpu") -> torch.Tensor:
    """The exact (N, t) standard-normal draws the gate kernels use for ``seed`` (fp32)."""
    out = torch.empty(n_tokens, num_experts, device=device, dtype=torch.float32)
    total = out.numel()
    if total:
        block = 1024
        _noise_kernel[(triton.cdiv(total, block),)](out, seed, total, BLOCK=block)
    return out


def _launch_meta(x, w_gate):
    n, m = x.shape
    t = w_gate.shape[1]
    block_t = max(16, next_pow2(t))
    block_m = min(32, max(16, next_pow2(m)))  # 64 spills in the backward on sm_90
    return n, m, t, block_t, block_m, triton.cdiv(n, GATE_BLOCK_N)


def gate_forward(x, w_gate, w_noise, k, train, noise=None, seed=0, noise_eps=1e-2):
    """Run the fused gate. x (N, m) any float dtype; w_gate, w_noise (m, t) fp32.

    Returns topk_idx (N, k) int32, topk_gate (N, k) fp32, importance (t,) fp32 = Σ_rows G, load
    (t,) fp32 = Σ_rows P(x) in training with k < t, else the routing counts."""
    n, m, t, block_t, block_m, tiles = _launch_meta(x, w_gate)
    dev = x.device
    idx = torch.empty(n, k, device=dev, dtype=torch.int32)
    gate = torch.empty(n, k, device=dev, dtype=torch.float32)
    imp_part = torch.empty(max(tiles, 1), t, device=dev, dtype=torch.float32)
    load_part = torch.empty(max(tiles, 1), t, device=dev, dtype=torch.float32)
    if tiles == 0:
        imp_part.zero_(), load_part.zero_()
    noise_mode = (NOISE_GIVEN if noise is not None else NOISE_SEED) if train else NOISE_NONE
    noise_arg = noise if noise is not None else gate  # unused pointer when drawing / evaluating
    if tiles:
        _gate_fwd_kernel[(tiles,)](
            x, w_gate, w_noise, noise_arg, int(seed), idx, gate, imp_part, load_part,
            n, m, t, float(noise_eps),
            K=k, TRAIN=bool(train), NOISE_MODE=noise_mode, LOAD_P=bool(train and k < t),
            BLOCK_N=GATE_BLOCK_N, BLOCK_M=block_m, BLOCK_T=block_t, num_warps=4,
        )
    return idx, gate, imp_part.sum(0), load_part.sum(0)


def gate_backward(x, w_gate, w_noise, k, train, noise, seed, noise_eps, d_gate, d_importance, d_load):
    """Gradients of the gate w.r.t. x (fp32, (N, m)), W_g and W_noise (fp32, (m, t)).

    d_gate (N, k) is dL/d topk_gate, d_importance and d_load (t,) are dL/d importance and load
    (d_load is ignored unless training with k < t, when the load is Σ P(x))."""
    n, m, t, block_t, block_m, tiles = _launch_meta(x, w_gate)
    dev = x.device
    dx = torch.empty(n, m, device=dev, dtype=torch.float32)
    dwg_part = torch.empty(max(tiles, 1), m, t, device=dev, dtype=torch.float32)
    dwn_part = torch.zeros(max(tiles, 1), m, t, device=dev, dtype=torch.float32) if not train or not tiles else (
        torch.empty(tiles, m, t, device=dev, dtype=torch.float32))
    if not tiles:
        dwg_part.zero_()
        return dx, dwg_part.sum(0), dwn_part.sum(0)
    noise_mode = (NOISE_GIVEN if noise is not None else NOISE_SEED) if train else NOISE_NONE
    noise_arg = noise if noise is not None else dx
    _gate_bwd_kernel[(tiles,)](
        x, w_gate, w_noise, noise_arg, int(seed),
        d_gate.float().contiguous(), d_importance.float().contiguous(), d_load.float().contiguous(),
        dx, dwg_part, dwn_part,
        n, m, t, float(noise_eps),
        K=k, TRAIN=bool(train), NOISE_MODE=noise_mode, LOAD_P=bool(train and k < t),
        BLOCK_N=GATE_BLOCK_N, BLOCK_M=block_m, BLOCK_T=block_t, num_warps=4,
    )
    return dx, dwg_part.sum(0), dwn_part.sum(0)


__all__ = ["gate_forward", "gate_backward", "gate_noise", "GATE_BLOCK_N"]
