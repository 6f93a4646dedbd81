"""The Triton kernels of the many-expert path: the noisy top-k gate with in-tile routing, the
per-pair SwiGLU experts over tokens grouped by expert (gathered in-kernel), the combine, and
their backward.

Pair p = n·k + j is token n's j-th pick, with expert e = idx[n, j] and gate g_p. Every pair runs
its expert's SwiGLU (a projection shared by all experts has expert stride 0):

    E_p = (silu(x_n W1_e + b1_e) ⊙ (x_n V_e + bV_e)) W2_e + b2_e,      y_n = dropout(Σ_j g_p E_p)

Routing without a sort launch. The gate kernel's program for token tile τ (ROUTE_BLOCK_N tokens)
writes, besides the gates, its tile's pairs ordered by expert (a counting sort inside the
program: ``local[τ]``) and per expert the count and the first slot (``route[τ] = (count, first)``).
A grouped program (row tile r of expert e inside super-chunk s of SUPER_TILES gate tiles) sums
its expert's counts over the super-chunk's tiles, finds each of its rows' tile by a prefix sum
and gathers the pair ids from ``local``: tokens grouped per expert with no copy of x, no global
sort and no host read; rows are padded only to the row tile of each (expert, super-chunk).

The weight gradients need every pair's da = dh ⊙ u ⊙ silu'(a), du = dh ⊙ silu(a) and
hc = silu(a) ⊙ u (dh = g dy' W2ᵀ). With RECOMPUTE the weight-gradient programs recompute a, u and
dh from x and dy (three products per pair over the whole m) instead of reading them: no per-pair
(N·k, d_h) intermediates in HBM. Without it the experts' backward stores them and the
weight-gradient programs read them (:func:`mlit_kernels.dispatch.launch.recompute_intermediates`
decides).

Reductions are config independent: each weight-gradient element is summed by one program over
its rows in a fixed order (expert by expert, blocks of WEIGHT_BLOCK_R rows in token order; a
shared V / W2 per slot of experts, the slots then added in order by a second launch), the combine
over j in order, and no float atomics are used. Nothing a launch loads is stored by the
same launch.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..common.gating import (cv_grad, gate_from_selection, gate_grads, gate_probs, gate_tile, load_probability,
                             pick_next, selection_key, token_tile)
from ..dense.kernels import _DROPOUT_STREAM, _add_product_by_chunk, _fused_aux_kernel, _mma, _store_rows, _zeros_by_chunk

ROUTE_BLOCK_N = 32  # tokens per gate program: the routing tile (not tuned)
SUPER_TILES = 64  # gate tiles per super-chunk of the grouped kernels (ROUTE_BLOCK_N · SUPER_TILES tokens)
WEIGHT_BLOCK_R = tl.constexpr(16)  # rows per reduction step of the weight gradients (fixes the summation order)
BLOCK_K = tl.constexpr(16)  # K chunk of the products over m (not tuned)
# Software-pipelining depth of the weight strips' recompute loops (a, u, dh over m): at Triton's default of 3
# the dispatch weight kernel kept spills inside its loops on sm_90 (Triton 3.6: mLiT-S 8 B, 16x192 24 B;
# bench/results/sm90-audit.md); at 2 one K chunk stays in flight and none of the models' shapes does.
RECOMPUTE_STAGES = tl.constexpr(2)
DX_CHUNK = tl.constexpr(32)  # m columns of a dx step of the weight kernel (its fp32 dots; 64 spilled at m = 384)


# ----------------------------------------------------------------------------------------------
# device helpers


@triton.jit
def _expert_rows(route_ptr, local_ptr, e, sc, r0, tiles, T, K: tl.constexpr, BR: tl.constexpr,
                 SUPER: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows [r0, r0 + BR) of expert e's pairs in super-chunk sc (token order): the pair ids (BR,)
    and which rows exist."""
    ts = sc * SUPER + tl.arange(0, SUPER)
    t_ok = ts < tiles
    count = tl.load(route_ptr + ts * 2 * T + e, mask=t_ok, other=0)
    first = tl.load(route_ptr + ts * 2 * T + T + e, mask=t_ok, other=0)
    upto = tl.cumsum(count, 0)
    total = tl.sum(count, 0)
    rows = r0 + tl.arange(0, BR)
    row_ok = rows < total
    tile = tl.sum((upto[None, :] <= rows[:, None]).to(tl.int32), axis=1)  # the tile holding each row
    at = tl.arange(0, SUPER)[None, :] == tile[:, None]
    skip = tl.sum(tl.where(at, upto - count, 0), axis=1)
    start = tl.sum(tl.where(at, first, 0), axis=1)
    slot = (sc * SUPER + tile).to(tl.int64) * (BLOCK_N * K) + start + rows - skip
    return tl.load(local_ptr + slot, mask=row_ok, other=0), row_ok


@triton.jit
def _expert_count(route_ptr, e, sc, tiles, T, SUPER: tl.constexpr):
    """How many pairs expert e has in super-chunk sc."""
    ts = sc * SUPER + tl.arange(0, SUPER)
    return tl.sum(tl.load(route_ptr + ts * 2 * T + e, mask=ts < tiles, other=0), 0)


@triton.jit
def _grouped_tile(pid, T, RT):
    """(row tile, expert, rest) of program ``pid`` of a grouped launch (row tiles fastest)."""
    return pid % RT, (pid // RT) % T, pid // (RT * T)


@triton.jit
def _expert_weights(e, w1_ptr, b1_ptr, v_ptr, bv_ptr, w2_ptr, b2_ptr, M, D, SEP_W1: tl.constexpr, SEP_V: tl.constexpr,
                    SEP_W2: tl.constexpr):
    """Expert e's W1, b1, V, bV, W2, b2 (a shared projection: the one weight, SEP_* = 0)."""
    e64 = tl.cast(e, tl.int64)
    return (w1_ptr + SEP_W1 * e64 * M * D, b1_ptr + SEP_W1 * e64 * D, v_ptr + SEP_V * e64 * M * D,
            bv_ptr + SEP_V * e64 * D, w2_ptr + SEP_W2 * e64 * D * M, b2_ptr + SEP_W2 * e64 * M)


@triton.jit
def _x_times(x_ptr, tok, row_ok, w_ptr, b_ptr, ds, d_ok, M, D, BR: tl.constexpr, DC: tl.constexpr,
             DTYPE: tl.constexpr, DOT_F32: tl.constexpr, STAGES: tl.constexpr):
    """x[tok] W[:, ds] + b[ds] (fp32, (BR, DC)) with W (M, D) row-major, over K chunks of m pipelined
    STAGES deep (None: the launch's num_stages)."""
    acc = tl.zeros((BR, DC), dtype=tl.float32)
    for k0 in tl.range(0, M, BLOCK_K, num_stages=STAGES):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < M
        xa = tl.load(x_ptr + tok[:, None].to(tl.int64) * M + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                     other=0.0).to(DTYPE)
        w = tl.load(w_ptr + ks[:, None] * D + ds[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0).to(DTYPE)
        acc = _mma(xa, w, acc, DOT_F32)
    return acc + tl.load(b_ptr + ds, mask=d_ok, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _preacts(x_ptr, tok, row_ok, w1_ptr, b1_ptr, v_ptr, bv_ptr, d0, M, D, BR: tl.constexpr, DC: tl.constexpr,
             DTYPE: tl.constexpr, DOT_F32: tl.constexpr):
    """The d_h chunk [d0, d0 + DC): its columns, which exist, a = x W1 + b1 and u = x V + bV (fp32)."""
    ds = d0 + tl.arange(0, DC)
    d_ok = ds < D
    a = _x_times(x_ptr, tok, row_ok, w1_ptr, b1_ptr, ds, d_ok, M, D, BR, DC, DTYPE, DOT_F32, None)
    return ds, d_ok, a, _x_times(x_ptr, tok, row_ok, v_ptr, bv_ptr, ds, d_ok, M, D, BR, DC, DTYPE, DOT_F32, None)


@triton.jit
def _grad_out(dy_ptr, keep_ptr, tok, row_ok, cols, col_ok, M, drop_p, DROPOUT: tl.constexpr):
    """dL/d(Σ_j g E) of rows ``tok``, columns ``cols``: dy through the dropout keep mask (fp32)."""
    offs = tok[:, None].to(tl.int64) * M + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if DROPOUT:
        keep = tl.load(keep_ptr + offs, mask=mask, other=0)
        dy = tl.where(keep != 0, dy / (1.0 - drop_p), 0.0)
    return dy


@triton.jit
def _dy_times_t(dy_ptr, keep_ptr, tok, row_ok, g, w2_ptr, ds, d_ok, M, drop_p, BR: tl.constexpr, DC: tl.constexpr,
                DROPOUT: tl.constexpr, DTYPE: tl.constexpr, DOT_F32: tl.constexpr, STAGES: tl.constexpr):
    """dh = (g dy'[tok]) W2[ds, :]ᵀ (fp32, (BR, DC)), W2 (D, M) row-major, over K chunks of m
    pipelined STAGES deep (None: the launch's num_stages)."""
    acc = tl.zeros((BR, DC), dtype=tl.float32)
    for k0 in tl.range(0, M, BLOCK_K, num_stages=STAGES):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < M
        de = (g[:, None] * _grad_out(dy_ptr, keep_ptr, tok, row_ok, ks, k_ok, M, drop_p, DROPOUT)).to(DTYPE)
        wt = tl.load(w2_ptr + ds[None, :] * M + ks[:, None], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        acc = _mma(de, wt.to(DTYPE), acc, DOT_F32)
    return acc


@triton.jit
def _swiglu_grads(a, u, dh):
    """hc = silu(a) ⊙ u and the gradients da = dh ⊙ u ⊙ silu'(a), du = dh ⊙ silu(a) (fp32, a's shape)."""
    sig = tl.sigmoid(a)
    act = a * sig
    return act * u, dh * u * (sig * (1.0 + a * (1.0 - sig))), dh * act


@triton.jit
def _store_chunk(acc, b_ptr, ptr, rows, row_ok, M, c0: tl.constexpr, W: tl.constexpr, BIAS: tl.constexpr):
    """acc (+ b[chunk] with BIAS) into rows ``rows`` of a (·, M) matrix, columns [c0, c0 + W)."""
    if BIAS:
        cols = c0 + tl.arange(0, W)
        acc += tl.load(b_ptr + cols, mask=cols < M, other=0.0).to(tl.float32)[None, :]
    _store_rows(ptr, acc, rows, row_ok, M, c0, W)


@triton.jit
def _store_row_chunks(y, b_ptr, ptr, rows, row_ok, M, STARTS: tl.constexpr, WIDTHS: tl.constexpr,
                      BIAS: tl.constexpr):
    """The width chunks of a row block (a tuple, see :func:`mlit_kernels.common.tiling.width_chunks`), stored."""
    for i in tl.static_range(len(WIDTHS)):
        if WIDTHS[i] > 0:
            _store_chunk(y[i], b_ptr, ptr, rows, row_ok, M, STARTS[i], WIDTHS[i], BIAS)


# ----------------------------------------------------------------------------------------------
# forward


@triton.jit
def _gate_route_kernel(
    x_ptr, wg_ptr, wn_ptr, noise_ptr, seed_ptr,
    idx_ptr, gates_ptr, part_ptr, route_ptr, local_ptr,
    N, M, T, noise_eps,
    K: tl.constexpr, NOISY: tl.constexpr, NOISE_MODE: tl.constexpr, LOAD_P: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Per token tile: gate (logits, noise, top-k, Softmax_k, P(x)); writes idx, gates (N, k),
    the importance/load partials (tiles, 2, t), and the tile's routing (route, local). The
    program past the last tile writes the tables' spare row (no pairs)."""
    pid = tl.program_id(0)
    rows, row_ok, cols, col_ok, valid, seed = token_tile(pid, seed_ptr, N, T, NOISE_MODE == 2, BLOCK_N, BLOCK_T)
    clean, raw, std, eps, h = gate_tile(x_ptr, wg_ptr, wn_ptr, noise_ptr, seed, rows, row_ok, cols, col_ok, M, T,
                                        noise_eps, NOISY, NOISE_MODE, BLOCK_N, BLOCK_T)
    key, taken = selection_key(h, col_ok)
    rank = tl.full((BLOCK_N, BLOCK_T), -1, tl.int32)  # the pick number j of each selected column
    kth_col = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for j in range(K):
        kth_col = pick_next(key, taken, cols, BLOCK_T)
        hit = cols[None, :] == kth_col[:, None]
        taken = tl.where(hit, 1, taken)
        rank = tl.where(hit, j, rank)
    sel, g, kth, nxt, nxt_col = gate_probs(h, key, taken, col_ok, kth_col, cols, BLOCK_T)
    picked = (rank >= 0) & valid
    slot = rows[:, None].to(tl.int64) * K + rank
    tl.store(idx_ptr + slot, cols[None, :] + tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.int32), mask=picked)
    tl.store(gates_ptr + slot, g, mask=picked)
    tl.store(part_ptr + pid * 2 * T + cols, tl.sum(tl.where(valid, g, 0.0), axis=0), mask=col_ok)
    if LOAD_P:
        load = tl.where(valid, load_probability(clean, h, std, kth, nxt), 0.0)
    else:
        load = tl.where(picked, 1.0, 0.0)
    tl.store(part_ptr + pid * 2 * T + T + cols, tl.sum(load, axis=0), mask=col_ok)
    # the tile's pairs ordered by expert, token order within an expert
    chosen = picked.to(tl.int32)
    count = tl.sum(chosen, axis=0)
    first = tl.cumsum(count, 0) - count
    before = tl.cumsum(chosen, 0) - chosen
    tl.store(route_ptr + pid * 2 * T + cols, count, mask=col_ok)
    tl.store(route_ptr + pid * 2 * T + T + cols, first, mask=col_ok)
    base = local_ptr + pid.to(tl.int64) * (BLOCK_N * K)
    tl.store(base + first[None, :] + before, rows[:, None] * K + rank, mask=picked)
    filled = tl.sum(count, 0)
    for j in range(K):  # the slots of tokens past N (a defined value: the outputs are compared, e.g. by opcheck)
        q = j * BLOCK_N + tl.arange(0, BLOCK_N)
        tl.store(base + q, tl.zeros((BLOCK_N,), dtype=tl.int32), mask=q >= filled)


@triton.jit
def _experts_fwd_kernel(
    x_ptr, w1_ptr, b1_ptr, v_ptr, bv_ptr, w2_ptr, b2_ptr, route_ptr, local_ptr, o_ptr,
    M, D, T, tiles, RT,
    K: tl.constexpr, SEP_W1: tl.constexpr, SEP_V: tl.constexpr, SEP_W2: tl.constexpr,
    M0: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr, M3: tl.constexpr, DC: tl.constexpr,
    BR: tl.constexpr, SUPER: tl.constexpr, BLOCK_N: tl.constexpr, DTYPE: tl.constexpr, DOT_F32: tl.constexpr,
):
    """Program (row tile r, expert e, super-chunk s): o[p] = E_p(x_n) (o's dtype) for its pairs."""
    WIDTHS: tl.constexpr = (M0, M1, M2, M3)
    STARTS: tl.constexpr = (0, M0, M0 + M1, M0 + M1 + M2)
    r, e, sc = _grouped_tile(tl.program_id(0), T, RT)
    if r * BR < _expert_count(route_ptr, e, sc, tiles, T, SUPER):
        pair, row_ok = _expert_rows(route_ptr, local_ptr, e, sc, r * BR, tiles, T, K, BR, SUPER, BLOCK_N)
        tok = pair // K
        w1_e, b1_e, v_e, bv_e, w2_e, b2_e = _expert_weights(e, w1_ptr, b1_ptr, v_ptr, bv_ptr, w2_ptr, b2_ptr, M, D,
                                                            SEP_W1, SEP_V, SEP_W2)
        y = _zeros_by_chunk(BR, WIDTHS)
        for d0 in range(0, D, DC):
            ds, d_ok, a, u = _preacts(x_ptr, tok, row_ok, w1_e, b1_e, v_e, bv_e, d0, M, D, BR, DC, DTYPE, DOT_F32)
            hc = (a * tl.sigmoid(a) * u).to(DTYPE)
            y = _add_product_by_chunk(y, hc, w2_e, ds, d_ok, M, D, STARTS, WIDTHS, False, DTYPE, DOT_F32)
        _store_row_chunks(y, b2_e, o_ptr, pair, row_ok, M, STARTS, WIDTHS, True)


@triton.jit
def _combine_kernel(
    o_ptr, gates_ptr, part_ptr, seed_ptr, y_ptr, keep_ptr, stats_ptr, aux_ptr,
    N, M, T, gate_tiles, drop_p, w_importance, w_load,
    K: tl.constexpr, DROPOUT: tl.constexpr, SQUARED: tl.constexpr, UNBIASED: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Per token tile: y = dropout(Σ_j g_p o_p) (j in order) in y's dtype, the keep mask (uint8);
    the last program sums the gate's partials into importance, load and the auxiliary loss."""
    pid = tl.program_id(0)
    if pid == tl.cdiv(N, BLOCK_N):
        _fused_aux_kernel(part_ptr, stats_ptr, aux_ptr, gate_tiles, T, w_importance, w_load, SQUARED, UNBIASED, 64,
                          BLOCK_T)
    else:
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        seed = 0
        if DROPOUT:
            seed = tl.load(seed_ptr)
        for c0 in range(0, M, BLOCK_M):
            cols = c0 + tl.arange(0, BLOCK_M)
            mask = row_ok[:, None] & (cols < M)[None, :]
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for j in range(K):
                p = rows.to(tl.int64) * K + j
                gj = tl.load(gates_ptr + p, mask=row_ok, other=0.0)
                oj = tl.load(o_ptr + p[:, None] * M + cols[None, :], mask=mask, other=0.0)
                acc += gj[:, None] * oj.to(tl.float32)
            offs = rows[:, None].to(tl.int64) * M + cols[None, :]
            if DROPOUT:
                keep = tl.rand(seed + _DROPOUT_STREAM, rows[:, None] * M + cols[None, :]) >= drop_p
                acc = tl.where(keep, acc / (1.0 - drop_p), 0.0)
                tl.store(keep_ptr + offs, keep.to(tl.uint8), mask=mask)
            tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# backward


@triton.jit
def _gate_bwd_tile(tile, x_ptr, wg_ptr, wn_ptr, noise_ptr, seed_ptr, idx_ptr, o_ptr, dy_ptr, keep_ptr, stats_ptr,
                   daux_ptr, dgate_ptr, N, M, T, noise_eps, drop_p, w_importance, w_load,
                   K: tl.constexpr, NOISY: tl.constexpr, NOISE_MODE: tl.constexpr, LOAD_P: tl.constexpr,
                   DROPOUT: tl.constexpr, SQUARED: tl.constexpr, UNBIASED: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr):
    """The gate's backward for one token tile: dL/dG_p = <dy'_n, o_p> (+ the importance term),
    through Softmax_k, the noise scale and P(x); writes dgate (N, 2, t) = (d clean, d raw) fp32."""
    rows, row_ok, cols, col_ok, valid, seed = token_tile(tile, seed_ptr, N, T, NOISE_MODE == 2, BLOCK_N, BLOCK_T)
    clean, raw, std, eps, h, sel, g, kth, kth_col, nxt, nxt_col = gate_from_selection(
        x_ptr, wg_ptr, wn_ptr, noise_ptr, seed, idx_ptr, rows, row_ok, cols, col_ok, M, T, noise_eps, K, NOISY,
        NOISE_MODE, BLOCK_N, BLOCK_T)
    d_aux = tl.load(daux_ptr)
    dg = tl.where(valid, cv_grad(stats_ptr, w_importance * d_aux, cols, col_ok, T, SQUARED, UNBIASED)[None, :], 0.0)
    for j in range(K):
        p = rows.to(tl.int64) * K + j
        dot = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for c0 in range(0, M, BLOCK_M):
            cm = c0 + tl.arange(0, BLOCK_M)
            cm_ok = cm < M
            gy = _grad_out(dy_ptr, keep_ptr, rows, row_ok, cm, cm_ok, M, drop_p, DROPOUT)
            o = tl.load(o_ptr + p[:, None] * M + cm[None, :], mask=row_ok[:, None] & cm_ok[None, :],
                        other=0.0).to(tl.float32)
            dot += tl.sum(gy * o, axis=1)
        ej = tl.load(idx_ptr + p, mask=row_ok, other=-1)
        dg += tl.where(cols[None, :] == ej[:, None], dot[:, None], 0.0)
    d_load = cv_grad(stats_ptr + T, w_load * d_aux, cols, col_ok, T, SQUARED, UNBIASED)
    dclean, draw = gate_grads(dg, h, clean, std, eps, raw, sel, g, kth, kth_col, nxt, nxt_col, d_load, valid, cols,
                              NOISY, LOAD_P)
    gslot = rows[:, None].to(tl.int64) * 2 * T + cols[None, :]
    tl.store(dgate_ptr + gslot, dclean, mask=valid)
    tl.store(dgate_ptr + gslot + T, draw, mask=valid)


@triton.jit
def _experts_bwd_kernel(
    x_ptr, dy_ptr, keep_ptr, gates_ptr, w1_ptr, b1_ptr, v_ptr, bv_ptr, w2_ptr, route_ptr, local_ptr,
    wg_ptr, wn_ptr, noise_ptr, seed_ptr, idx_ptr, o_ptr, stats_ptr, daux_ptr,
    da_ptr, du_ptr, hc_ptr, dxp_ptr, dgate_ptr,
    N, M, D, T, tiles, RT, noise_eps, drop_p, w_importance, w_load,
    K: tl.constexpr, SEP_W1: tl.constexpr, SEP_V: tl.constexpr, SEP_W2: tl.constexpr, NOISY: tl.constexpr,
    NOISE_MODE: tl.constexpr, LOAD_P: tl.constexpr, DROPOUT: tl.constexpr, SQUARED: tl.constexpr,
    UNBIASED: tl.constexpr, RECOMPUTE: tl.constexpr, M0: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr,
    M3: tl.constexpr, DC: tl.constexpr, BR: tl.constexpr, SUPER: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr, DTYPE: tl.constexpr, DOT_F32: tl.constexpr,
):
    """Programs [0, grouped) — (row tile, expert, super-chunk) — for their pairs recompute
    a = x W1_e + b1, u = x V_e + bV, dh = g dy' W2_eᵀ and write dxp = da W1_eᵀ + du V_eᵀ (N·k, m)
    in the compute dtype, and without RECOMPUTE also da, du and hc (N·k, d_h) for the weight
    gradients (:func:`_swiglu_grads`); the remaining programs run the gate's backward per token
    tile."""
    WIDTHS: tl.constexpr = (M0, M1, M2, M3)
    STARTS: tl.constexpr = (0, M0, M0 + M1, M0 + M1 + M2)
    pid = tl.program_id(0)
    grouped = RT * T * tl.cdiv(tiles, SUPER)
    if pid < grouped:
        r, e, sc = _grouped_tile(pid, T, RT)
        if r * BR < _expert_count(route_ptr, e, sc, tiles, T, SUPER):
            pair, row_ok = _expert_rows(route_ptr, local_ptr, e, sc, r * BR, tiles, T, K, BR, SUPER, BLOCK_N)
            tok = pair // K
            g = tl.load(gates_ptr + pair, mask=row_ok, other=0.0)
            w1_e, b1_e, v_e, bv_e, w2_e, _ = _expert_weights(e, w1_ptr, b1_ptr, v_ptr, bv_ptr, w2_ptr, w2_ptr, M, D,
                                                             SEP_W1, SEP_V, SEP_W2)
            dx = _zeros_by_chunk(BR, WIDTHS)
            for d0 in range(0, D, DC):
                ds, d_ok, a, u = _preacts(x_ptr, tok, row_ok, w1_e, b1_e, v_e, bv_e, d0, M, D, BR, DC, DTYPE, DOT_F32)
                dh = _dy_times_t(dy_ptr, keep_ptr, tok, row_ok, g, w2_e, ds, d_ok, M, drop_p, BR, DC, DROPOUT, DTYPE,
                                 DOT_F32, None)
                hc, da, du = _swiglu_grads(a, u, dh)
                da = da.to(DTYPE)
                du = du.to(DTYPE)
                if not RECOMPUTE:
                    offs = pair[:, None].to(tl.int64) * D + ds[None, :]
                    mask = row_ok[:, None] & d_ok[None, :]
                    tl.store(hc_ptr + offs, hc.to(hc_ptr.dtype.element_ty), mask=mask)
                    tl.store(da_ptr + offs, da.to(da_ptr.dtype.element_ty), mask=mask)
                    tl.store(du_ptr + offs, du.to(du_ptr.dtype.element_ty), mask=mask)
                dx = _add_product_by_chunk(dx, da, w1_e, ds, d_ok, M, D, STARTS, WIDTHS, True, DTYPE, DOT_F32)
                dx = _add_product_by_chunk(dx, du, v_e, ds, d_ok, M, D, STARTS, WIDTHS, True, DTYPE, DOT_F32)
            _store_row_chunks(dx, b1_e, dxp_ptr, pair, row_ok, M, STARTS, WIDTHS, False)
    else:
        _gate_bwd_tile(pid - grouped, x_ptr, wg_ptr, wn_ptr, noise_ptr, seed_ptr, idx_ptr, o_ptr, dy_ptr, keep_ptr,
                       stats_ptr, daux_ptr, dgate_ptr, N, M, T, noise_eps, drop_p, w_importance, w_load, K,
                       NOISY, NOISE_MODE, LOAD_P, DROPOUT, SQUARED, UNBIASED, BLOCK_N, 64, BLOCK_T)


@triton.jit
def _vector_zeros_by_chunk(WIDTHS: tl.constexpr):
    """fp32 zeros (width,) per chunk."""
    out = ()
    for i in tl.static_range(len(WIDTHS)):
        if WIDTHS[i] > 0:
            out = out + (tl.zeros((WIDTHS[i],), dtype=tl.float32),)
    return out


@triton.jit
def _pair_grads(x_ptr, dy_ptr, keep_ptr, da_ptr, du_ptr, hc_ptr, pair, tok, row_ok, g, w1_e, b1_e, v_e, bv_e, w2_e,
                ds, d_ok, M, D, drop_p, R: tl.constexpr, WD: tl.constexpr, RECOMPUTE: tl.constexpr,
                DROPOUT: tl.constexpr, DTYPE: tl.constexpr, DOT_F32: tl.constexpr):
    """da, du, hc (R, WD) of rows ``pair`` in d_h columns ``ds`` (DTYPE): recomputed from x and dy
    when RECOMPUTE (a = x W1_e + b1, u = x V_e + bV, dh = g dy' W2_eᵀ over the whole m), else read
    where the experts' backward stored them."""
    if RECOMPUTE:
        a = _x_times(x_ptr, tok, row_ok, w1_e, b1_e, ds, d_ok, M, D, R, WD, DTYPE, DOT_F32, RECOMPUTE_STAGES)
        u = _x_times(x_ptr, tok, row_ok, v_e, bv_e, ds, d_ok, M, D, R, WD, DTYPE, DOT_F32, RECOMPUTE_STAGES)
        dh = _dy_times_t(dy_ptr, keep_ptr, tok, row_ok, g, w2_e, ds, d_ok, M, drop_p, R, WD, DROPOUT, DTYPE, DOT_F32,
                         RECOMPUTE_STAGES)
        hc, da, du = _swiglu_grads(a, u, dh)
    else:
        offs = pair[:, None].to(tl.int64) * D + ds[None, :]
        mask = row_ok[:, None] & d_ok[None, :]
        da = tl.load(da_ptr + offs, mask=mask, other=0.0)
        du = tl.load(du_ptr + offs, mask=mask, other=0.0)
        hc = tl.load(hc_ptr + offs, mask=mask, other=0.0)
    return da.to(DTYPE), du.to(DTYPE), hc.to(DTYPE)


@triton.jit
def _add_weight_products(acc1, accv, acc2, bias2, x_ptr, dy_ptr, keep_ptr, tok, row_ok, g, da, du, hc, c0, M, drop_p,
                         STARTS: tl.constexpr, WIDTHS: tl.constexpr, DROPOUT: tl.constexpr, DTYPE: tl.constexpr,
                         DOT_F32: tl.constexpr):
    """A block of pairs added per m chunk [c0 + start, c0 + start + width) of a column group, each
    gradient transposed, (WD, width): acc1 + daᵀ x_chunk, accv + duᵀ x_chunk (dW1ᵀ, dVᵀ) and acc2 +
    hcᵀ (g dy'_chunk) (dW2), and bias2 + Σ_rows g dy'_chunk (db2). Products 16 (WD) rows high stay on
    mma.sync on sm_90; as x_chunkᵀ da, a chunk's width high, they compiled to wgmma 16 wide beside
    the kernel's other tensor-core dots, the pattern Triton 3.6–3.7 miscompile (bench/sm90_audit.py)."""
    o1 = ()
    ov = ()
    o2 = ()
    ob = ()
    for i in tl.static_range(len(WIDTHS)):
        if WIDTHS[i] > 0:
            cols = c0 + STARTS[i] + tl.arange(0, WIDTHS[i])
            col_ok = cols < M
            xc = tl.load(x_ptr + tok[:, None].to(tl.int64) * M + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                         other=0.0).to(DTYPE)
            gdy = (g[:, None] * _grad_out(dy_ptr, keep_ptr, tok, row_ok, cols, col_ok, M, drop_p, DROPOUT)).to(DTYPE)
            o1 = o1 + (_mma(tl.trans(da), xc, acc1[i], DOT_F32),)
            ov = ov + (_mma(tl.trans(du), xc, accv[i], DOT_F32),)
            o2 = o2 + (_mma(tl.trans(hc), gdy, acc2[i], DOT_F32),)
            ob = ob + (bias2[i] + tl.sum(gdy.to(tl.float32), axis=0),)
    return o1, ov, o2, ob


@triton.jit
def _store_weight_grads(acc1, bias1, accv, biasv, acc2, bias2, dw1_ptr, db1_ptr, dv_ptr, dbv_ptr, dw2_ptr, db2_ptr,
                        e, d0, c0, M, D, W1: tl.constexpr, V: tl.constexpr, W2: tl.constexpr,
                        SEP_W1: tl.constexpr, SEP_V: tl.constexpr, SEP_W2: tl.constexpr, WD: tl.constexpr,
                        STARTS: tl.constexpr, WIDTHS: tl.constexpr):
    """The strip's gradients of those projections W1 / V / W2 names (expert e's slice of a per-expert
    one), from the (WD, width) accumulators of :func:`_add_weight_products`: dW1, dV (M, D) rows of
    the column group at c0, columns ds; dW2 (D, M) rows ds, the group's columns; db1, dbV by the
    strips of the first group, db2 by those of the first d_h chunk."""
    ds = d0 + tl.arange(0, WD)
    d_ok = ds < D
    e64 = tl.cast(e, tl.int64)
    first_group = (ds * 0 + c0) == 0
    if W1:
        tl.store(db1_ptr + SEP_W1 * e64 * D + ds, bias1.to(db1_ptr.dtype.element_ty), mask=d_ok & first_group)
    if V:
        tl.store(dbv_ptr + SEP_V * e64 * D + ds, biasv.to(dbv_ptr.dtype.element_ty), mask=d_ok & first_group)
    for i in tl.static_range(len(WIDTHS)):
        if WIDTHS[i] > 0:
            rows = c0 + STARTS[i] + tl.arange(0, WIDTHS[i])
            row_ok = rows < M
            mask = d_ok[:, None] & row_ok[None, :]
            offs = rows[None, :] * D + ds[:, None]
            if W1:
                tl.store(dw1_ptr + SEP_W1 * e64 * M * D + offs, acc1[i].to(dw1_ptr.dtype.element_ty), mask=mask)
            if V:
                tl.store(dv_ptr + SEP_V * e64 * M * D + offs, accv[i].to(dv_ptr.dtype.element_ty), mask=mask)
            if W2:
                w2_e = dw2_ptr + SEP_W2 * e64 * D * M
                tl.store(w2_e + ds[:, None] * M + rows[None, :], acc2[i].to(dw2_ptr.dtype.element_ty), mask=mask)
                tl.store(db2_ptr + SEP_W2 * e64 * M + rows, bias2[i].to(db2_ptr.dtype.element_ty),
                         mask=row_ok & ((rows * 0 + d0) == 0))


@triton.jit
def _weight_strip(x_ptr, dy_ptr, keep_ptr, gates_ptr, da_ptr, du_ptr, hc_ptr, route_ptr, local_ptr, w1_ptr, b1_ptr,
                  v_ptr, bv_ptr, w2_ptr, dw1_ptr, db1_ptr, dv_ptr, dbv_ptr, dw2_ptr, db2_ptr, part_ptr, e0, e1, d0, c0,
                  M, D, T, tiles, drop_p, K: tl.constexpr, SEP_W1: tl.constexpr, SEP_V: tl.constexpr,
                  SEP_W2: tl.constexpr, RECOMPUTE: tl.constexpr, DROPOUT: tl.constexpr, WD: tl.constexpr,
                  STARTS: tl.constexpr, WIDTHS: tl.constexpr, SUPER: tl.constexpr, BLOCK_N: tl.constexpr,
                  DTYPE: tl.constexpr, DOT_F32: tl.constexpr):
    """One strip of every weight gradient: d_h columns [d0, d0 + WD) × the m column group at c0 of
    dW1, dV (and db1, dbV), its transpose in dW2 (and db2), summed over the pairs of experts
    [e0, e1) (expert by expert, in blocks of WEIGHT_BLOCK_R rows). A per-expert gradient is stored
    after its expert; a shared one's partial sum over the range into ``part_ptr`` (fp32, laid out
    dV (M·D), dbV (D), dW2 (D·M), db2 (M)), for :func:`_shared_grads_kernel` to add."""
    ds = d0 + tl.arange(0, WD)
    d_ok = ds < D
    acc1 = _zeros_by_chunk(WD, WIDTHS)
    accv = _zeros_by_chunk(WD, WIDTHS)
    acc2 = _zeros_by_chunk(WD, WIDTHS)
    bias1 = tl.zeros((WD,), dtype=tl.float32)
    biasv = tl.zeros((WD,), dtype=tl.float32)
    bias2 = _vector_zeros_by_chunk(WIDTHS)
    for e in range(e0, e1):
        if SEP_W1:
            acc1 = _zeros_by_chunk(WD, WIDTHS)
            bias1 = tl.zeros((WD,), dtype=tl.float32)
        if SEP_V:
            accv = _zeros_by_chunk(WD, WIDTHS)
            biasv = tl.zeros((WD,), dtype=tl.float32)
        if SEP_W2:
            acc2 = _zeros_by_chunk(WD, WIDTHS)
            bias2 = _vector_zeros_by_chunk(WIDTHS)
        w1_e, b1_e, v_e, bv_e, w2_e, _ = _expert_weights(e, w1_ptr, b1_ptr, v_ptr, bv_ptr, w2_ptr, w2_ptr, M, D,
                                                         SEP_W1, SEP_V, SEP_W2)
        for sc in range(0, tl.cdiv(tiles, SUPER)):
            for r0 in range(0, _expert_count(route_ptr, e, sc, tiles, T, SUPER), WEIGHT_BLOCK_R):
                pair, row_ok = _expert_rows(route_ptr, local_ptr, e, sc, r0, tiles, T, K, WEIGHT_BLOCK_R, SUPER,
                                            BLOCK_N)
                tok = pair // K
                g = tl.load(gates_ptr + pair, mask=row_ok, other=0.0)
                da, du, hc = _pair_grads(x_ptr, dy_ptr, keep_ptr, da_ptr, du_ptr, hc_ptr, pair, tok, row_ok, g, w1_e,
                                         b1_e, v_e, bv_e, w2_e, ds, d_ok, M, D, drop_p, WEIGHT_BLOCK_R, WD,
                                         RECOMPUTE, DROPOUT, DTYPE, DOT_F32)
                bias1 += tl.sum(da.to(tl.float32), axis=0)
                biasv += tl.sum(du.to(tl.float32), axis=0)
                acc1, accv, acc2, bias2 = _add_weight_products(acc1, accv, acc2, bias2, x_ptr, dy_ptr, keep_ptr, tok,
                                                               row_ok, g, da, du, hc, c0, M, drop_p, STARTS, WIDTHS,
                                                               DROPOUT, DTYPE, DOT_F32)
        _store_weight_grads(acc1, bias1, accv, biasv, acc2, bias2, dw1_ptr, db1_ptr, dv_ptr, dbv_ptr, dw2_ptr, db2_ptr,
                            e, d0, c0, M, D, SEP_W1, SEP_V, SEP_W2, SEP_W1, SEP_V, SEP_W2, WD, STARTS, WIDTHS)
    _store_weight_grads(acc1, bias1, accv, biasv, acc2, bias2, dw1_ptr, db1_ptr, part_ptr, part_ptr + M * D,
                        part_ptr + M * D + D, part_ptr + 2 * M * D + D, e0, d0, c0, M, D, 1 - SEP_W1, 1 - SEP_V,
                        1 - SEP_W2, SEP_W1, SEP_V, SEP_W2, WD, STARTS, WIDTHS)


@triton.jit
def _weights_dx_kernel(
    x_ptr, dy_ptr, keep_ptr, gates_ptr, da_ptr, du_ptr, hc_ptr, dgate_ptr, dxp_ptr, route_ptr, local_ptr, wg_ptr,
    wn_ptr, w1_ptr, b1_ptr, v_ptr, bv_ptr, w2_ptr, dw1_ptr, db1_ptr, dv_ptr, dbv_ptr, dw2_ptr, db2_ptr, part_ptr,
    dwg_ptr, dwn_ptr, dx_ptr,
    N, M, D, T, tiles, per_slot, drop_p,
    K: tl.constexpr, SEP_W1: tl.constexpr, SEP_V: tl.constexpr, SEP_W2: tl.constexpr, NOISY: tl.constexpr,
    DROPOUT: tl.constexpr, RECOMPUTE: tl.constexpr, WD: tl.constexpr, G0: tl.constexpr, G1: tl.constexpr,
    G2: tl.constexpr, G3: tl.constexpr, WB: tl.constexpr, SUPER: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr, DTYPE: tl.constexpr, DOT_F32: tl.constexpr,
):
    """Every weight gradient, each element summed by one program in a fixed order, and dx.

    Programs, in order: the strips of the expert weights' gradients (:func:`_weight_strip`: per
    slot of ``per_slot`` experts, d_h chunk of WD, m column group of G0 + … + G3 columns; biases
    with them; shared V / W2 as partial sums per slot), the m chunks (WB) of dW_g / dW_noise, then
    per token tile
    dx = d clean W_gᵀ + d raw W_noiseᵀ + Σ_j dxp (x's dtype)."""
    WIDTHS: tl.constexpr = (G0, G1, G2, G3)
    STARTS: tl.constexpr = (0, G0, G0 + G1, G0 + G1 + G2)
    pid = tl.program_id(0)
    nm = tl.cdiv(M, WB)
    nd = tl.cdiv(D, WD)
    groups = tl.cdiv(M, G0 + G1 + G2 + G3)
    strips = tl.cdiv(T, per_slot) * nd * groups
    if pid < strips:
        expert_slot = pid // (nd * groups)
        e0 = expert_slot * per_slot
        part = part_ptr + expert_slot.to(tl.int64) * (2 * M * D + D + M)
        _weight_strip(x_ptr, dy_ptr, keep_ptr, gates_ptr, da_ptr, du_ptr, hc_ptr, route_ptr, local_ptr, w1_ptr, b1_ptr,
                      v_ptr, bv_ptr, w2_ptr, dw1_ptr, db1_ptr, dv_ptr, dbv_ptr, dw2_ptr, db2_ptr, part, e0,
                      tl.minimum(e0 + per_slot, T), (pid // groups) % nd * WD, pid % groups * (G0 + G1 + G2 + G3), M,
                      D, T, tiles, drop_p, K, SEP_W1, SEP_V, SEP_W2, RECOMPUTE, DROPOUT, WD, STARTS, WIDTHS, SUPER,
                      BLOCK_N, DTYPE, DOT_F32)
    elif pid < strips + nm:  # dW_g, dW_noise rows of an m chunk: Σ_n x[n, chunk]ᵀ (d clean, d raw)[n]
        ri = (pid - strips) * WB + tl.arange(0, WB)
        cols = tl.arange(0, BLOCK_T)
        col_ok = cols < T
        acc_g = tl.zeros((WB, BLOCK_T), dtype=tl.float32)
        acc_n = tl.zeros((WB, BLOCK_T), dtype=tl.float32)
        for n0 in range(0, N, WEIGHT_BLOCK_R):
            rows = n0 + tl.arange(0, WEIGHT_BLOCK_R)
            row_ok = rows < N
            xt = tl.trans(tl.load(x_ptr + rows[:, None].to(tl.int64) * M + ri[None, :],
                                  mask=row_ok[:, None] & (ri < M)[None, :], other=0.0).to(tl.float32))
            slot = dgate_ptr + rows[:, None].to(tl.int64) * 2 * T + cols[None, :]
            mask = row_ok[:, None] & col_ok[None, :]
            acc_g = tl.dot(xt, tl.load(slot, mask=mask, other=0.0), acc_g, input_precision="ieee")
            if NOISY:
                acc_n = tl.dot(xt, tl.load(slot + T, mask=mask, other=0.0), acc_n, input_precision="ieee")
        omask = (ri < M)[:, None] & col_ok[None, :]
        tl.store(dwg_ptr + ri[:, None] * T + cols[None, :], acc_g.to(dwg_ptr.dtype.element_ty), mask=omask)
        tl.store(dwn_ptr + ri[:, None] * T + cols[None, :], acc_n.to(dwn_ptr.dtype.element_ty), mask=omask)
    else:  # dx of a token tile
        rows = (pid - strips - nm) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        cols = tl.arange(0, BLOCK_T)
        col_ok = cols < T
        slot = dgate_ptr + rows[:, None].to(tl.int64) * 2 * T + cols[None, :]
        dclean = tl.load(slot, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        draw = tl.load(slot + T, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        for c0 in range(0, M, DX_CHUNK):
            cm = c0 + tl.arange(0, DX_CHUNK)
            mask = row_ok[:, None] & (cm < M)[None, :]
            wmask = col_ok[:, None] & (cm < M)[None, :]
            wg_t = tl.load(wg_ptr + cm[None, :] * T + cols[:, None], mask=wmask, other=0.0).to(tl.float32)
            acc = tl.dot(dclean, wg_t, input_precision="ieee")
            if NOISY:
                wn_t = tl.load(wn_ptr + cm[None, :] * T + cols[:, None], mask=wmask, other=0.0).to(tl.float32)
                acc = tl.dot(draw, wn_t, acc, input_precision="ieee")
            for j in range(K):
                acc += tl.load(dxp_ptr + (rows[:, None].to(tl.int64) * K + j) * M + cm[None, :], mask=mask,
                               other=0.0).to(tl.float32)
            tl.store(dx_ptr + rows[:, None].to(tl.int64) * M + cm[None, :], acc.to(dx_ptr.dtype.element_ty), mask=mask)

@triton.jit
def _shared_grads_kernel(part_ptr, dv_ptr, dbv_ptr, dw2_ptr, db2_ptr, slots, M, D, BLOCK: tl.constexpr):
    """Shared V / W2: dV, dbV, dW2, db2 = Σ_s part[s] over the slots in order (part (slots,
    2·M·D + D + M) fp32 as :func:`_weight_strip` lays it out), in the parameters' dtypes."""
    total = 2 * M * D + D + M
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(slots):
        acc += tl.load(part_ptr + tl.cast(s, tl.int64) * total + offs, mask=offs < total, other=0.0)
    v_end = M * D
    bv_end = v_end + D
    w2_end = bv_end + D * M
    tl.store(dv_ptr + offs, acc.to(dv_ptr.dtype.element_ty), mask=offs < v_end)
    tl.store(dbv_ptr + offs - v_end, acc.to(dbv_ptr.dtype.element_ty), mask=(offs >= v_end) & (offs < bv_end))
    tl.store(dw2_ptr + offs - bv_end, acc.to(dw2_ptr.dtype.element_ty), mask=(offs >= bv_end) & (offs < w2_end))
    tl.store(db2_ptr + offs - w2_end, acc.to(db2_ptr.dtype.element_ty), mask=(offs >= w2_end) & (offs < total))


__all__ = ["ROUTE_BLOCK_N", "SUPER_TILES", "WEIGHT_BLOCK_R"]
