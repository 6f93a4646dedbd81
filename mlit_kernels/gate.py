"""The noisy top-k gate as kernels of its own, for the dispatch path (many experts; SPEC §5,
Eq. 2-9). The fused path (:mod:`mlit_kernels.fused`) computes the same gate inline.

One program handles a tile of BLOCK_N tokens with the device functions of
:mod:`mlit_kernels.gating`: logits (fp32), noise, top-k (lowest index wins, NaN counts as -inf),
Softmax_k, P(x). It writes ``topk_idx`` (N, k) int32 and ``topk_gate`` (N, k) fp32 (largest
first) and per-tile partial sums (tiles, t) of G (importance) and of P(x) or the routing counts
(load), which ``torch.sum`` finishes in a fixed order. The backward kernel recomputes the logits
with the forward's stored selection and writes dx plus per-tile partials of dW_g and dW_noise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common.gating import (NOISE_GIVEN, NOISE_NONE, NOISE_PHILOX, gate_from_selection, gate_grads, gate_probs,
                            gate_tile, load_probability, pick_next, selection_key, token_tile)
from .common.gating import noise_kernel as _noise_kernel
from .common.tiling import interpreting, next_pow2

GATE_BLOCK_N = 16 if interpreting() else 32


@triton.jit
def _gate_fwd_kernel(
    x_ptr, wg_ptr, wn_ptr, noise_ptr, seed_ptr,
    idx_ptr, gate_ptr, imp_part_ptr, load_part_ptr,
    N, M, T, noise_eps,
    K: tl.constexpr, NOISY: tl.constexpr, NOISE_MODE: tl.constexpr, LOAD_P: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid, rows, row_ok, cols, col_ok, valid, seed = token_tile(seed_ptr, N, T, NOISE_MODE == 2, BLOCK_N, BLOCK_T)
    clean, raw, std, eps, h = gate_tile(x_ptr, wg_ptr, wn_ptr, noise_ptr, seed, rows, row_ok, cols, col_ok, M, T,
                                        noise_eps, NOISY, NOISE_MODE, BLOCK_N, BLOCK_T)
    key, taken = selection_key(h, col_ok)
    # the picks stay in registers (rank: the pick order of each selected column, -1 elsewhere): a
    # load of idx here would race its store, which no barrier orders across the program's threads
    rank = tl.full(h.shape, -1, tl.int32)
    kth_col = tl.zeros(rows.shape, dtype=tl.int32)
    for j in tl.static_range(K):
        kth_col = pick_next(key, taken, cols, BLOCK_T)
        tl.store(idx_ptr + rows.to(tl.int64) * K + j, kth_col, mask=row_ok)
        picked = cols[None, :] == kth_col[:, None]
        taken = tl.where(picked, 1, taken)
        rank = tl.where(picked, j, rank)
    sel, g, kth, nxt, nxt_col = gate_probs(h, key, taken, col_ok, kth_col, cols, BLOCK_T)
    for j in tl.static_range(K):
        tl.store(gate_ptr + rows.to(tl.int64) * K + j, tl.sum(tl.where(rank == j, g, 0.0), axis=1), mask=row_ok)
    tl.store(imp_part_ptr + pid * T + cols, tl.sum(tl.where(valid, g, 0.0), axis=0), mask=col_ok)
    if LOAD_P:
        load = tl.where(valid, load_probability(clean, h, std, kth, nxt), 0.0)
    else:
        load = tl.where(valid & (sel != 0), 1.0, 0.0)
    tl.store(load_part_ptr + pid * T + cols, tl.sum(load, axis=0), mask=col_ok)


@triton.jit
def _gate_bwd_kernel(
    x_ptr, wg_ptr, wn_ptr, noise_ptr, seed_ptr, idx_ptr,
    dgate_ptr, dimp_ptr, dload_ptr,
    dx_ptr, dwg_part_ptr, dwn_part_ptr,
    N, M, T, noise_eps,
    K: tl.constexpr, NOISY: tl.constexpr, NOISE_MODE: tl.constexpr, LOAD_P: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid, rows, row_ok, cols, col_ok, valid, seed = token_tile(seed_ptr, N, T, NOISE_MODE == 2, BLOCK_N, BLOCK_T)
    clean, raw, std, eps, h, sel, g, kth, kth_col, nxt, nxt_col = gate_from_selection(
        x_ptr, wg_ptr, wn_ptr, noise_ptr, seed, idx_ptr, rows, row_ok, cols, col_ok, M, T, noise_eps, K, NOISY,
        NOISE_MODE, BLOCK_N, BLOCK_T)
    # dL/dG: the pair gradients scattered to their columns, plus the importance term (Σ_rows G)
    dg = tl.where(valid, tl.load(dimp_ptr + cols, mask=col_ok, other=0.0)[None, :], 0.0)
    for j in tl.static_range(K):
        col = tl.load(idx_ptr + rows.to(tl.int64) * K + j, mask=row_ok, other=0)
        dgj = tl.load(dgate_ptr + rows.to(tl.int64) * K + j, mask=row_ok, other=0.0)
        dg += tl.where(cols[None, :] == col[:, None], dgj[:, None], 0.0)
    d_load = tl.load(dload_ptr + cols, mask=col_ok, other=0.0)
    dclean, draw = gate_grads(dg, h, clean, std, eps, raw, sel, g, kth, kth_col, nxt, nxt_col, d_load, valid,
                              cols, NOISY, LOAD_P)
    dwg_tile = dwg_part_ptr + pid.to(tl.int64) * M * T  # this tile's (M, T) partials
    dwn_tile = dwn_part_ptr + pid.to(tl.int64) * M * T
    for m0 in range(0, M, BLOCK_M):
        ks = m0 + tl.arange(0, BLOCK_M)
        k_ok = ks < M
        xb = tl.load(x_ptr + rows[:, None].to(tl.int64) * M + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                     other=0.0).to(tl.float32)
        wmask_t = col_ok[:, None] & k_ok[None, :]
        wg_t = tl.load(wg_ptr + ks[None, :] * T + cols[:, None], mask=wmask_t, other=0.0).to(tl.float32)
        dxb = tl.dot(dclean, wg_t, input_precision="ieee")
        pmask = k_ok[:, None] & col_ok[None, :]
        part = ks[:, None] * T + cols[None, :]
        tl.store(dwg_tile + part, tl.dot(tl.trans(xb), dclean, input_precision="ieee"), mask=pmask)
        if NOISY:
            wn_t = tl.load(wn_ptr + ks[None, :] * T + cols[:, None], mask=wmask_t, other=0.0).to(tl.float32)
            dxb += tl.dot(draw, wn_t, input_precision="ieee")
            tl.store(dwn_tile + part, tl.dot(tl.trans(xb), draw, input_precision="ieee"), mask=pmask)
        tl.store(dx_ptr + rows[:, None].to(tl.int64) * M + ks[None, :], dxb, mask=row_ok[:, None] & k_ok[None, :])


def gate_noise(seed: int | torch.Tensor, n_tokens: int, num_experts: int, device="cpu") -> torch.Tensor:
    """The exact (N, t) standard-normal draws the gate kernels use for ``seed`` (fp32): an int, or
    the (1,) int64 seed tensor a layer call drew."""
    seed = torch.as_tensor(seed, dtype=torch.int64).reshape(1).to(device)
    out = torch.empty(n_tokens, num_experts, device=device, dtype=torch.float32)
    total = out.numel()
    if total:
        block = 1024
        _noise_kernel[(triton.cdiv(total, block),)](out, seed, total, BLOCK=block)
    return out


def _launch_meta(x, w_gate, training, noisy, noise, k):
    n, m = x.shape
    t = w_gate.shape[1]
    noisy = bool(training and noisy)
    mode = (NOISE_GIVEN if noise is not None else NOISE_PHILOX) if noisy else NOISE_NONE
    meta = dict(NOISY=noisy, NOISE_MODE=mode, LOAD_P=noisy and k < t, BLOCK_N=GATE_BLOCK_N,
                BLOCK_T=max(16, next_pow2(t)))
    return n, m, t, triton.cdiv(n, GATE_BLOCK_N), meta


def gate_forward(x, w_gate, w_noise, k, training, noisy, noise, seed, noise_eps):
    """x (N, m) any float dtype; w_gate, w_noise (m, t) fp32; seed (1,) int64 on x's device.

    Returns topk_idx (N, k) int32, topk_gate (N, k) fp32, importance (t,) fp32 = Σ_rows G, load
    (t,) fp32 = Σ_rows P(x) when training with noise and k < t, else the routing counts."""
    n, m, t, tiles, meta = _launch_meta(x, w_gate, training, noisy, noise, k)
    dev = x.device
    idx = torch.empty(n, k, device=dev, dtype=torch.int32)
    gate = torch.empty(n, k, device=dev, dtype=torch.float32)
    imp_part = torch.zeros(max(tiles, 1), t, device=dev) if not tiles else torch.empty(tiles, t, device=dev)
    load_part = torch.zeros(max(tiles, 1), t, device=dev) if not tiles else torch.empty(tiles, t, device=dev)
    if tiles:
        _gate_fwd_kernel[(tiles,)](x, w_gate, w_noise, noise if noise is not None else gate, seed, idx, gate, imp_part,
                                   load_part, n, m, t, float(noise_eps), K=k, **meta, num_warps=4)
    return idx, gate, imp_part.sum(0), load_part.sum(0)


def gate_backward(x, w_gate, w_noise, k, training, noisy, noise, seed, noise_eps, idx, d_gate, d_importance, d_load):
    """Gradients of the gate w.r.t. x (fp32, (N, m)), W_g and W_noise (fp32, (m, t)); the
    selection is the forward's ``idx``. d_load is used only when the load is Σ P(x)."""
    n, m, t, tiles, meta = _launch_meta(x, w_gate, training, noisy, noise, k)
    dev = x.device
    dx = torch.empty(n, m, device=dev, dtype=torch.float32)
    dwg_part = torch.empty(max(tiles, 1), m, t, device=dev)
    dwn_part = torch.zeros(max(tiles, 1), m, t, device=dev) if not (tiles and meta["NOISY"]) else (
        torch.empty(tiles, m, t, device=dev))
    if not tiles:
        dwg_part.zero_()
        return dx, dwg_part.sum(0), dwn_part.sum(0)
    _gate_bwd_kernel[(tiles,)](
        x, w_gate, w_noise, noise if noise is not None else dx, seed, idx,
        d_gate.float().contiguous(), d_importance.float().contiguous(), d_load.float().contiguous(),
        dx, dwg_part, dwn_part, n, m, t, float(noise_eps),
        K=k, BLOCK_M=min(32, max(16, next_pow2(m))), **meta, num_warps=4,
    )
    return dx, dwg_part.sum(0), dwn_part.sum(0)


__all__ = ["gate_forward", "gate_backward", "gate_noise", "GATE_BLOCK_N"]
