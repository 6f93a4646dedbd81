"""Shared-V/W2 SwiGLU experts for the dispatch path (many experts; SPEC §5, Eq. 1/13): Triton
kernels over tokens grouped by expert, forward and backward. (Few experts run the fused kernels
of :mod:`mlit_kernels.fused` instead.)

Per token n with selected experts e_j and gates g_j (j < k):

    a_nj = x_n W_{e_j} + b_{e_j}          (per pair; the only per-expert product)
    c_n  = Σ_j g_j silu(a_nj)            (combine in the hidden space, fixed j order)
    u_n  = x_n V + b_V                   (once per token)
    y_n  = (c_n ⊙ u_n) W_2 + b_2         (once per token)

Forward: ``_grouped_preact_kernel`` (kernel A) is a grouped GEMM over the expert groups of
:func:`mlit_kernels.dispatch.route` (no padding; each program finds its (expert, row tile) from
the group offsets on the device, no host sync); it gathers x rows and writes a (N·k, d_h) in pair
order. ``_combine_fwd_kernel`` (kernel B), per token tile: u = x V + b_V, the prologue
c = Σ_j g_j silu(a_j) from the token's k pair rows, h = c ⊙ u, and y = h W_2 + b_2 in the
epilogue. In training it also saves u (N, d_h). Backward:

* ``_combine_bwd_kernel`` per token tile: dh = dy W_2ᵀ, recomputes c from a, writes h = c ⊙ u
  (for dW_2), du = dh ⊙ c, the pair gradients da_j = g_j (dh ⊙ u) ⊙ silu'(a_j) and the gate
  gradients dg_j = <dh ⊙ u, silu(a_j)> (fp32);
* ``_grouped_dx_kernel``: per expert group, da W_eᵀ per pair (fp32, pair order); ``_dx_kernel``
  per token tile: dx = du Vᵀ + the token's k pair rows summed in a fixed order;
* ``_grouped_dw_kernel``: per expert, dW_e = Σ_pairs x_nᵀ da and db_e, split over row chunks
  into partial sums that torch adds in a fixed order (deterministic);
* the shared weights' gradients (dW_2 = hᵀ dy, dV = xᵀ du, db_2, db_V) are plain cuBLAS
  products / reductions in torch.

All accumulation is fp32; the GEMM operands are the activation dtype (fp16/bf16 tensor cores, or
fp32 with IEEE precision). Nothing uses float atomics: forward and backward are deterministic.
The per-token kernels loop over d_h in chunks of BLOCK_DC = min(32, next_pow2(d_h)); kernel A
tiles (row tile, d_h chunk) on a 2-D grid; the grouped dx / dW kernels hold the whole d_h.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import Routing, route
from .common.tiling import interpreting, next_pow2

_KEY = ["M", "D", "T", "K"]


def _configs(options):
    """Autotune configurations (keyed by m, d_h, t, k); a single one under the interpreter."""
    if interpreting():
        options = options[:1]
    return [triton.Config(kw, num_warps=w, num_stages=s) for kw, w, s in options]


_ROW_CFGS = _configs([
    ({"BLOCK_R": 16, "BLOCK_M": 32}, 4, 2),  # small tiles: the whole d_h row block stays in registers
    ({"BLOCK_R": 32, "BLOCK_M": 32}, 4, 2),
    ({"BLOCK_R": 32, "BLOCK_M": 32}, 8, 2),
    ({"BLOCK_R": 64, "BLOCK_M": 32}, 8, 2),
    ({"BLOCK_R": 64, "BLOCK_M": 64}, 8, 3),
])
_DW_SPLIT = 2 if interpreting() else 16


@triton.jit
def _silu_and_grad(a):
    sig = tl.sigmoid(a)
    return a * sig, sig * (1.0 + a * (1.0 - sig))


@triton.jit
def _find_group(off_ptr, pid, T, BLOCK_R: tl.constexpr):
    """The expert and sorted-row range [lo, hi) of row tile ``pid`` of the grouped GEMMs; the
    tiles of expert e follow those of expert e - 1 (expert = -1, empty range, past the end)."""
    expert = pid * 0 - 1
    lo = pid * 0
    hi = pid * 0
    start = pid * 0
    for e in range(T):
        a = tl.load(off_ptr + e)
        b = tl.load(off_ptr + e + 1)
        nt = (b - a + BLOCK_R - 1) // BLOCK_R
        hit = (pid >= start) & (pid < start + nt)
        expert = tl.where(hit, e, expert)
        lo = tl.where(hit, a + (pid - start) * BLOCK_R, lo)
        hi = tl.where(hit, b, hi)
        start += nt
    return expert, lo, hi


@triton.autotune(configs=_ROW_CFGS, key=_KEY)
@triton.jit
def _grouped_preact_kernel(
    x_ptr, w1_ptr, b1_ptr, sorted_ptr, off_ptr, a_ptr,
    M, D, T, K,
    BLOCK_DC: tl.constexpr, PREC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Kernel A: a[pair] = x[token] W_e + b_e for one row tile of one expert group, one d_h chunk."""
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    expert, lo, hi = _find_group(off_ptr, pid, T, BLOCK_R)
    e = tl.maximum(expert, 0)
    pos = lo + tl.arange(0, BLOCK_R)
    ok = pos < hi
    pair = tl.load(sorted_ptr + pos, mask=ok, other=0)
    tok = pair // K
    ds = pid_d * BLOCK_DC + tl.arange(0, BLOCK_DC)
    d_ok = ds < D
    acc = tl.zeros((BLOCK_R, BLOCK_DC), dtype=tl.float32)
    w_base = w1_ptr + e * M * D  # t·m·d_h < 2**31 (checked by the launcher)
    for m0 in range(0, M, BLOCK_M):
        ms = m0 + tl.arange(0, BLOCK_M)
        m_ok = ms < M
        xb = tl.load(x_ptr + tok[:, None].to(tl.int64) * M + ms[None, :], mask=ok[:, None] & m_ok[None, :], other=0.0)
        wb = tl.load(w_base + ms[:, None] * D + ds[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.dot(xb, wb, input_precision=PREC)
    acc += tl.load(b1_ptr + e * D + ds, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(a_ptr + pair[:, None].to(tl.int64) * D + ds[None, :], acc.to(a_ptr.dtype.element_ty),
             mask=ok[:, None] & d_ok[None, :])


@triton.jit
def _project_chunk(x_ptr, w_ptr, b_ptr, rows, row_ok, ds, d_ok, M, D, PREC: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DC: tl.constexpr):
    """x W[:, ds] + b[ds] for a tile of tokens (fp32); W (m, d_h) row-major."""
    acc = tl.zeros((BLOCK_R, BLOCK_DC), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        ms = m0 + tl.arange(0, BLOCK_M)
        m_ok = ms < M
        xb = tl.load(x_ptr + rows[:, None].to(tl.int64) * M + ms[None, :], mask=row_ok[:, None] & m_ok[None, :],
                     other=0.0)
        wb = tl.load(w_ptr + ms[:, None] * D + ds[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.dot(xb, wb, input_precision=PREC)
    return acc + tl.load(b_ptr + ds, mask=d_ok, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _shared_down_chunk(c, x_ptr, v_ptr, bv_ptr, w2_ptr, u_ptr, rows, row_ok, ds, d_ok, mo, M, D,
                       SAVE: tl.constexpr, PREC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_DC: tl.constexpr):
    """The once-per-token part of a d_h chunk: u = x V + b_V (stored when SAVE), h = c ⊙ u, and
    h W_2[chunk], returned as this chunk's fp32 contribution to y (BLOCK_R, BLOCK_MO)."""
    u = _project_chunk(x_ptr, v_ptr, bv_ptr, rows, row_ok, ds, d_ok, M, D, PREC, BLOCK_R, BLOCK_M, BLOCK_DC)
    if SAVE:
        mask = row_ok[:, None] & d_ok[None, :]
        tl.store(u_ptr + rows[:, None].to(tl.int64) * D + ds[None, :], u.to(u_ptr.dtype.element_ty), mask=mask)
    h = (c * u).to(x_ptr.dtype.element_ty)
    w2 = tl.load(w2_ptr + ds[:, None] * M + mo[None, :], mask=d_ok[:, None] & (mo < M)[None, :], other=0.0)
    return tl.dot(h, w2, input_precision=PREC)


@triton.jit
def _store_output(y, b2_ptr, y_ptr, rows, row_ok, mo, M):
    mo_ok = mo < M
    y += tl.load(b2_ptr + mo, mask=mo_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None].to(tl.int64) * M + mo[None, :], y.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & mo_ok[None, :])


@triton.autotune(configs=_ROW_CFGS, key=_KEY)
@triton.jit
def _combine_fwd_kernel(
    x_ptr, v_ptr, bv_ptr, w2_ptr, b2_ptr, a_ptr, gate_ptr, y_ptr, u_ptr,
    N, M, D, T,
    K: tl.constexpr, SAVE: tl.constexpr, BLOCK_DC: tl.constexpr, BLOCK_MO: tl.constexpr, PREC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Kernel B, per token tile and per d_h chunk: prologue c = Σ_j g_j silu(a_j); u = x V + b_V;
    h = c ⊙ u; y += h W_2[chunk] (the whole output row block accumulates in registers); + b_2."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    mo = tl.arange(0, BLOCK_MO)
    y = tl.zeros((BLOCK_R, BLOCK_MO), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_DC):
        ds = d0 + tl.arange(0, BLOCK_DC)
        d_ok = ds < D
        mask = row_ok[:, None] & d_ok[None, :]
        c = tl.zeros((BLOCK_R, BLOCK_DC), dtype=tl.float32)
        for j in tl.static_range(K):
            pair = rows.to(tl.int64) * K + j
            g = tl.load(gate_ptr + pair, mask=row_ok, other=0.0)
            a = tl.load(a_ptr + pair[:, None] * D + ds[None, :], mask=mask, other=0.0).to(tl.float32)
            c += g[:, None] * (a * tl.sigmoid(a))
        y += _shared_down_chunk(c, x_ptr, v_ptr, bv_ptr, w2_ptr, u_ptr, rows, row_ok, ds, d_ok, mo, M, D, SAVE, PREC,
                                BLOCK_R, BLOCK_M, BLOCK_DC)
    _store_output(y, b2_ptr, y_ptr, rows, row_ok, mo, M)


@triton.autotune(configs=_ROW_CFGS, key=_KEY)
@triton.jit
def _combine_bwd_kernel(
    dy_ptr, w2_ptr, a_ptr, gate_ptr, u_ptr, h_ptr, du_ptr, da_ptr, dgate_ptr,
    N, M, D, T,
    K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DC: tl.constexpr, PREC: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Per token tile and d_h chunk: dh = dy W_2ᵀ; writes h, du = dh ⊙ c, da_j; accumulates dg_j."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    kcols = tl.arange(0, BLOCK_K)
    dg = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_DC):
        ds = d0 + tl.arange(0, BLOCK_DC)
        d_ok = ds < D
        mask = row_ok[:, None] & d_ok[None, :]
        dh = tl.zeros((BLOCK_R, BLOCK_DC), dtype=tl.float32)
        for m0 in range(0, M, BLOCK_M):
            ms = m0 + tl.arange(0, BLOCK_M)
            m_ok = ms < M
            dyb = tl.load(dy_ptr + rows[:, None].to(tl.int64) * M + ms[None, :],
                          mask=row_ok[:, None] & m_ok[None, :], other=0.0)
            w2t = tl.load(w2_ptr + ds[None, :] * M + ms[:, None], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
            dh += tl.dot(dyb, w2t, input_precision=PREC)
        tile = rows[:, None].to(tl.int64) * D + ds[None, :]
        u = tl.load(u_ptr + tile, mask=mask, other=0.0).to(tl.float32)
        c = tl.zeros((BLOCK_R, BLOCK_DC), dtype=tl.float32)
        for j in tl.static_range(K):
            pair = rows.to(tl.int64) * K + j
            g = tl.load(gate_ptr + pair, mask=row_ok, other=0.0)
            a = tl.load(a_ptr + pair[:, None] * D + ds[None, :], mask=mask, other=0.0).to(tl.float32)
            c += g[:, None] * (a * tl.sigmoid(a))
        tl.store(h_ptr + tile, (c * u).to(h_ptr.dtype.element_ty), mask=mask)
        tl.store(du_ptr + tile, (dh * c).to(du_ptr.dtype.element_ty), mask=mask)
        dc = dh * u
        for j in tl.static_range(K):
            pair = rows.to(tl.int64) * K + j
            g = tl.load(gate_ptr + pair, mask=row_ok, other=0.0)
            a = tl.load(a_ptr + pair[:, None] * D + ds[None, :], mask=mask, other=0.0).to(tl.float32)
            s, ds_da = _silu_and_grad(a)
            dg += tl.where(kcols[None, :] == j, tl.sum(tl.where(mask, dc * s, 0.0), axis=1)[:, None], 0.0)
            tl.store(da_ptr + pair[:, None] * D + ds[None, :], (g[:, None] * dc * ds_da).to(da_ptr.dtype.element_ty),
                     mask=mask)
    tl.store(dgate_ptr + rows[:, None].to(tl.int64) * K + kcols[None, :], dg,
             mask=row_ok[:, None] & (kcols < K)[None, :])


@triton.autotune(configs=_ROW_CFGS, key=_KEY)
@triton.jit
def _grouped_dx_kernel(
    da_ptr, w1_ptr, sorted_ptr, off_ptr, dxp_ptr,
    M, D, T, K,
    BLOCK_D: tl.constexpr, PREC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """dxp[pair] = da[pair] W_eᵀ (fp32) for one row tile of one expert group and one m block."""
    pid = tl.program_id(0)
    pid_m = tl.program_id(1)
    expert, lo, hi = _find_group(off_ptr, pid, T, BLOCK_R)
    e = tl.maximum(expert, 0)
    pos = lo + tl.arange(0, BLOCK_R)
    ok = pos < hi
    pair = tl.load(sorted_ptr + pos, mask=ok, other=0).to(tl.int64)
    ds = tl.arange(0, BLOCK_D)
    d_ok = ds < D
    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = ms < M
    dab = tl.load(da_ptr + pair[:, None] * D + ds[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
    wt = tl.load(w1_ptr + e.to(tl.int64) * M * D + ms[None, :] * D + ds[:, None], mask=d_ok[:, None] & m_ok[None, :],
                 other=0.0)
    dxb = tl.dot(dab, wt, input_precision=PREC)
    tl.store(dxp_ptr + pair[:, None] * M + ms[None, :], dxb, mask=ok[:, None] & m_ok[None, :])


@triton.autotune(configs=_ROW_CFGS, key=_KEY)
@triton.jit
def _grouped_dw_kernel(
    x_ptr, da_ptr, sorted_ptr, off_ptr, dw_part_ptr, db_part_ptr,
    M, D, T, K,
    SPLIT: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Partial dW_e = Σ x_nᵀ da_p and db_e = Σ da_p over one chunk of expert e's group."""
    e = tl.program_id(0)
    pid_m = tl.program_id(1)
    split = tl.program_id(2)
    lo = tl.load(off_ptr + e)
    hi = tl.load(off_ptr + e + 1)
    chunk = ((hi - lo + SPLIT - 1) // SPLIT + BLOCK_R - 1) // BLOCK_R * BLOCK_R
    start = lo + split * chunk
    end = tl.minimum(hi, start + chunk)
    ds = tl.arange(0, BLOCK_D)
    d_ok = ds < D
    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = ms < M
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    db = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        pos = r0 + tl.arange(0, BLOCK_R)
        ok = pos < end
        pair = tl.load(sorted_ptr + pos, mask=ok, other=0)
        tok = (pair // K).to(tl.int64)
        xt = tl.load(x_ptr + tok[None, :] * M + ms[:, None], mask=m_ok[:, None] & ok[None, :], other=0.0)
        dab = tl.load(da_ptr + pair[:, None].to(tl.int64) * D + ds[None, :], mask=ok[:, None] & d_ok[None, :],
                      other=0.0)
        acc += tl.dot(xt, dab, input_precision=PREC)
        db += tl.sum(dab.to(tl.float32), axis=0)
    slot = split * T + e
    tl.store(dw_part_ptr + slot.to(tl.int64) * M * D + ms[:, None] * D + ds[None, :], acc,
             mask=m_ok[:, None] & d_ok[None, :])
    tl.store(db_part_ptr + slot * D + ds, db, mask=d_ok & ((ds * 0 + pid_m) == 0))


@triton.autotune(configs=_ROW_CFGS, key=_KEY)
@triton.jit
def _dx_kernel(
    du_ptr, v_ptr, dxp_ptr, dx_ptr,
    N, M, D, T,
    K: tl.constexpr, BLOCK_DC: tl.constexpr, PREC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """dx = du Vᵀ + Σ_j dxp[token, j] (the token's k pair rows in fixed order), per token tile and
    m block; stored in the activation dtype."""
    pid = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = ms < M
    acc = tl.zeros((BLOCK_R, BLOCK_M), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_DC):
        ds = d0 + tl.arange(0, BLOCK_DC)
        d_ok = ds < D
        dub = tl.load(du_ptr + rows[:, None].to(tl.int64) * D + ds[None, :], mask=row_ok[:, None] & d_ok[None, :],
                      other=0.0)
        vt = tl.load(v_ptr + ms[None, :] * D + ds[:, None], mask=d_ok[:, None] & m_ok[None, :], other=0.0)
        acc += tl.dot(dub, vt, input_precision=PREC)
    mask = row_ok[:, None] & m_ok[None, :]
    for j in tl.static_range(K):
        pair = rows.to(tl.int64) * K + j
        acc += tl.load(dxp_ptr + pair[:, None] * M + ms[None, :], mask=mask, other=0.0)
    tl.store(dx_ptr + rows[:, None].to(tl.int64) * M + ms[None, :], acc.to(dx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Python launchers


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _chunk(d_h: int) -> int:
    """The d_h chunk the per-token kernels loop over: 32 (16 when d_h ≤ 16). 64 spills registers
    on sm_90 at m = d_h = 144 (``bench/gpu_report.py --compile-check 90``)."""
    return min(32, max(16, next_pow2(d_h)))


def _row_tiles(n):
    return lambda meta: (triton.cdiv(n, meta["BLOCK_R"]),)


def experts_forward(x, topk_idx, topk_gate, w1, b1, v, b_v, w2, b2, save=False):
    """y (N, m) of the shared-V/W2 SwiGLU experts with tokens grouped by expert; with ``save``
    also (a, u, routing) for backward.

    x (N, m), w1 (t, m, d_h), b1 (t, d_h), v (m, d_h), b_v (d_h,), w2 (d_h, m), b2 (m,) in one
    dtype; topk_idx (N, k) int32; topk_gate (N, k) fp32."""
    n, m = x.shape
    t, _, d = w1.shape
    k = topk_idx.shape[1]
    if w1.numel() >= 2**31 or n * k >= 2**31:
        raise ValueError(f"w1 ({tuple(w1.shape)}) or N·k ({n}·{k}) too large for 32-bit offsets")
    dev, dt = x.device, x.dtype
    y = torch.empty(n, m, device=dev, dtype=dt)
    a = torch.empty(n * k, d, device=dev, dtype=dt)
    u = torch.empty(n, d, device=dev, dtype=dt) if save else y
    if n == 0:
        return y, (a, u, route(topk_idx, t))
    block_dc = _chunk(d)
    block_mo = max(16, next_pow2(m))
    prec = _prec(dt)
    routing = route(topk_idx, t)
    grid = lambda meta: (triton.cdiv(n * k, meta["BLOCK_R"]) + t, triton.cdiv(d, block_dc))  # noqa: E731
    _grouped_preact_kernel[grid](x, w1, b1, routing.sorted_pairs, routing.expert_offsets, a, m, d, t, k,
                                 BLOCK_DC=block_dc, PREC=prec)
    _combine_fwd_kernel[_row_tiles(n)](x, v, b_v, w2, b2, a, topk_gate, y, u, n, m, d, t, K=k, SAVE=bool(save),
                                       BLOCK_DC=block_dc, BLOCK_MO=block_mo, PREC=prec)
    return y, (a, u, routing)


def experts_backward(dy, x, topk_idx, topk_gate, w1, v, w2, a, u, routing: Routing):
    """Gradients (dx, d_topk_gate fp32, dw1, db1, dv, db_v, dw2, db2) of :func:`experts_forward`."""
    n, m = x.shape
    t, _, d = w1.shape
    k = topk_idx.shape[1]
    dev, dt = x.device, x.dtype
    dy = dy.to(dt).contiguous()
    if n == 0:
        z = lambda ref: torch.zeros_like(ref)  # noqa: E731
        return (z(x), torch.zeros(0, k, device=dev), z(w1), torch.zeros(t, d, device=dev, dtype=dt), z(v),
                torch.zeros(d, device=dev, dtype=dt), z(w2), torch.zeros(m, device=dev, dtype=dt))
    block_d = max(16, next_pow2(d))
    prec = _prec(dt)
    h = torch.empty(n, d, device=dev, dtype=dt)
    du = torch.empty(n, d, device=dev, dtype=dt)
    da = torch.empty(n * k, d, device=dev, dtype=dt)
    dgate = torch.empty(n, k, device=dev, dtype=torch.float32)
    _combine_bwd_kernel[_row_tiles(n)](dy, w2, a, topk_gate, u, h, du, da, dgate, n, m, d, t,
                                       K=k, BLOCK_K=max(2, next_pow2(k)), BLOCK_DC=_chunk(d), PREC=prec)
    dxp = torch.empty(n * k, m, device=dev, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(n * k, meta["BLOCK_R"]) + t, triton.cdiv(m, meta["BLOCK_M"]))  # noqa: E731
    _grouped_dx_kernel[grid](da, w1, routing.sorted_pairs, routing.expert_offsets, dxp, m, d, t, k,
                             BLOCK_D=block_d, PREC=prec)
    dw_part = torch.empty(_DW_SPLIT, t, m, d, device=dev, dtype=torch.float32)
    db_part = torch.empty(_DW_SPLIT, t, d, device=dev, dtype=torch.float32)
    grid = lambda meta: (t, triton.cdiv(m, meta["BLOCK_M"]), _DW_SPLIT)  # noqa: E731
    _grouped_dw_kernel[grid](x, da, routing.sorted_pairs, routing.expert_offsets, dw_part, db_part, m, d, t, k,
                             SPLIT=_DW_SPLIT, BLOCK_D=block_d, PREC=prec)
    dx = torch.empty(n, m, device=dev, dtype=dt)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_R"]), triton.cdiv(m, meta["BLOCK_M"]))  # noqa: E731
    _dx_kernel[grid](du, v, dxp, dx, n, m, d, t, K=k, BLOCK_DC=_chunk(d), PREC=prec)
    dw1 = dw_part.sum(0).to(w1.dtype)
    db1 = db_part.sum(0).to(w1.dtype)
    dv = x.t() @ du
    db_v = du.float().sum(0).to(dt)
    dw2 = h.t() @ dy
    db2 = dy.float().sum(0).to(dt)
    return dx, dgate, dw1, db1, dv, db_v, dw2, db2


__all__ = ["experts_forward", "experts_backward"]
