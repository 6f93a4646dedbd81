"""Triton kernels of the fused pre-norm attention half-block ``y = x + proj(GQA(LN(x)))``.

Shapes (N = B·n tokens of B sequences of n tokens; D = model width; H query heads of HD columns in
G groups; E = D + 2·G·HD, the fused q | k | v width; widths padded to the powers of two D_PAD,
HD_PAD ≥ 16 inside a kernel, masked at the edges):

forward (two launches)
  ``_ln_qkv_fwd_kernel``   per token tile: LayerNorm (mean, rstd saved) → qkv (N, E) = LN(x) W_qkvᵀ + b
  ``_attn_fwd_kernel``     per (query tile, sequence): every head's flash attention (online softmax,
                           logsumexp saved in log2 units), its output o (N, D) saved, the output
                           projection summed over the heads, + bias + the residual x → y (N, D)
backward (four launches)
  ``_proj_bwd_kernel``     per split of tokens: the split's partial dW_proj, db_proj; per token
                           tile: dO = dy W_proj per head, Δ = rowsum(dO ⊙ O)
  ``_attn_bwd_kernel``     per (key tile | query tile, sequence): key-tile programs sum dK, dV over
                           their group's heads and every query tile (no atomics); query-tile programs
                           compute dQ over every key tile; both recompute P from the logsumexp
  ``_ln_qkv_bwd_kernel``   per split: the partial dW_qkv, db_qkv, dγ, dβ of the split; per token
                           tile: dx = LayerNorm backward of dqkv W_qkv + dy (the residual)
  (then the ordered split sum, :mod:`mlit_kernels.common.split_sum`: the partial weight gradients summed
  over the splits in split order)

Weights arrive in their own dtype (fp32 under autocast) and are cast in registers to DTYPE, the
compute dtype of the products; every product accumulates in fp32. Reduction boundaries (BLOCK_M,
BLOCK_N, BLOCK_E, the splits) are fixed by the shape, never by the tuned configuration (warps). The weight gradients are summed by few long programs (the
splits) while, in the same launch, one short program per token tile does the per-token work, so
the per-token work spreads over the whole GPU. No kernel loads a buffer it stores.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _mma(a, b, acc, DOT_F32: tl.constexpr):
    """acc + a @ b with fp32 accumulation; DOT_F32: fp32 operands, IEEE products (fp32 inputs, and
    bf16 under the interpreter, whose tl.dot mishandles bfloat16)."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _normalized(x_ptr, mean_ptr, rstd_ptr, rows, rmask, cols, cmask, stride_x):
    """x̂ = (x - mean) · rstd of a token tile (BLOCK_M, D_PAD) fp32 (0 outside), and rstd (BLOCK_M,);
    x's rows ``stride_x`` elements apart."""
    mask = rmask[:, None] & cmask[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + rows, mask=rmask, other=0.0)
    rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
    return tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0), rstd


@triton.jit
def _ln_qkv_fwd_kernel(x_ptr, lnw_ptr, lnb_ptr, w_ptr, b_ptr, qkv_ptr, mean_ptr, rstd_ptr, N, D, E, eps, stride_x,
                       D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, DTYPE: tl.constexpr,
                       DOT_F32: tl.constexpr, HAS_BIAS: tl.constexpr):
    """x (N, D) (rows ``stride_x`` apart), γ, β (D,), W_qkv (E, D), b_qkv (E,) (with HAS_BIAS) →
    qkv (N, E) DTYPE, mean, rstd (N,) fp32. Also :mod:`mlit_kernels.norm_linear`'s forward."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, D_PAD)
    rmask, cmask = rows < N, cols < D
    mask = rmask[:, None] & cmask[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)
    tl.store(mean_ptr + rows, mean, mask=rmask)
    tl.store(rstd_ptr + rows, rstd, mask=rmask)
    gamma = tl.load(lnw_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    beta = tl.load(lnb_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    xn = (xc * rstd[:, None] * gamma[None, :] + beta[None, :]).to(DTYPE)
    for e0 in range(0, E, BLOCK_E):
        es = e0 + tl.arange(0, BLOCK_E)
        emask = es < E
        wt = tl.load(w_ptr + es[None, :] * D + cols[:, None], mask=cmask[:, None] & emask[None, :], other=0.0)
        acc = _mma(xn, wt.to(DTYPE), tl.zeros((BLOCK_M, BLOCK_E), tl.float32), DOT_F32)
        if HAS_BIAS:
            acc += tl.load(b_ptr + es, mask=emask, other=0.0).to(tl.float32)[None, :]
        tl.store(qkv_ptr + rows[:, None] * E + es[None, :], acc.to(DTYPE),
                 mask=rmask[:, None] & emask[None, :])


@triton.jit
def _attn_fwd_kernel(qkv_ptr, x_ptr, pw_ptr, pb_ptr, o_ptr, lse_ptr, y_ptr, n_tok, D, E, H, G, HD, sm_scale,
                     D_PAD: tl.constexpr, HD_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     DTYPE: tl.constexpr, DOT_F32: tl.constexpr):
    """qkv (N, E), x (N, D), W_proj (D, D), b_proj (D,) → o (N, D) DTYPE (heads side by side),
    lse (N, H) fp32 (log2 units of the scaled scores), y = x + o W_projᵀ + b_proj (N, D) in y's dtype.
    Grid: (query tiles, B)."""
    b = tl.program_id(1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = offs_m < n_tok
    rows = b * n_tok + offs_m
    dcols = tl.arange(0, HD_PAD)
    dmask = dcols < HD
    cols = tl.arange(0, D_PAD)
    cmask = cols < D
    qk_scale = sm_scale * LOG2E
    heads_per_group = H // G
    out = tl.zeros((BLOCK_M, D_PAD), tl.float32)
    for h in range(H):
        g = h // heads_per_group
        q = tl.load(qkv_ptr + rows[:, None] * E + h * HD + dcols[None, :], mask=mmask[:, None] & dmask[None, :],
                    other=0.0)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, HD_PAD), tl.float32)
        for n0 in range(0, n_tok, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            nmask = offs_n < n_tok
            keys = b * n_tok + offs_n
            kt = tl.load(qkv_ptr + keys[None, :] * E + D + g * HD + dcols[:, None],
                         mask=dmask[:, None] & nmask[None, :], other=0.0)
            s = _mma(q, kt, tl.zeros((BLOCK_M, BLOCK_N), tl.float32), DOT_F32) * qk_scale
            s = tl.where(nmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(qkv_ptr + keys[:, None] * E + D + (G + g) * HD + dcols[None, :],
                        mask=nmask[:, None] & dmask[None, :], other=0.0)
            acc = _mma(p.to(DTYPE), v, acc * alpha[:, None], DOT_F32)
            m_i = m_new
        o = (acc / l_i[:, None]).to(DTYPE)
        tl.store(o_ptr + rows[:, None] * D + h * HD + dcols[None, :], o, mask=mmask[:, None] & dmask[None, :])
        tl.store(lse_ptr + rows * H + h, m_i + tl.log2(l_i), mask=mmask)
        wt = tl.load(pw_ptr + cols[None, :] * D + h * HD + dcols[:, None], mask=dmask[:, None] & cmask[None, :],
                     other=0.0)  # (HD_PAD, D_PAD): W_proj[:, head h]ᵀ
        out = _mma(o, wt.to(DTYPE), out, DOT_F32)
    mask = mmask[:, None] & cmask[None, :]
    bias = tl.load(pb_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = x + out + bias[None, :]
    tl.store(y_ptr + rows[:, None] * D + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _proj_bwd_kernel(dy_ptr, o_ptr, pw_ptr, do_ptr, delta_ptr, part_ptr, N, D, H, HD, splits, rows_per_split, P,
                     D_PAD: tl.constexpr, HD_PAD: tl.constexpr, ROWS: tl.constexpr, BLOCK_M: tl.constexpr,
                     DTYPE: tl.constexpr, DOT_F32: tl.constexpr):
    """dy (N, D), o (N, D), W_proj (D, D) → dO = dy W_proj (N, D) DTYPE, Δ (N, H) fp32, and the
    partial dW_proj (D, D), db_proj (D,) fp32 of every split at ``part[split, :D·D + D]`` (rows P
    apart: the caller passes the dW_proj columns of the block's partial-sum buffer).
    Grid: (splits + token tiles,): the first ``splits`` programs sum the weight gradients of their
    rows, ROWS at a time; the others compute dO and Δ of BLOCK_M tokens, every head. dW_proj is
    summed transposed per head, oᵀ dy (HD_PAD, D_PAD): a product HD_PAD (16, 32) rows high stays on
    mma.sync on sm_90 — as dyᵀ o, D_PAD rows high, it compiled to a wgmma 16 or 32 wide beside the
    token programs' mma.sync, the pattern Triton 3.6–3.7 miscompile (bench/sm90_audit.py)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, D_PAD)
    cmask = cols < D
    dcols = tl.arange(0, HD_PAD)
    dmask = dcols < HD
    if pid < splits:
        r0 = pid * rows_per_split
        r_end = tl.minimum(r0 + rows_per_split, N)
        part = part_ptr + pid * P
        for h in range(H):
            dw_t = tl.zeros((HD_PAD, D_PAD), tl.float32)  # dW_proj[:, head h]ᵀ
            for t0 in range(r0, r_end, ROWS):
                rows = t0 + tl.arange(0, ROWS)
                rmask = rows < r_end
                dy = tl.load(dy_ptr + rows[:, None] * D + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                             other=0.0).to(DTYPE)
                o = tl.load(o_ptr + rows[:, None] * D + h * HD + dcols[None, :], mask=rmask[:, None] & dmask[None, :],
                            other=0.0)
                dw_t = _mma(tl.trans(o), dy, dw_t, DOT_F32)
            tl.store(part + cols[None, :] * D + h * HD + dcols[:, None], dw_t, mask=dmask[:, None] & cmask[None, :])
        db = tl.zeros((D_PAD,), tl.float32)
        for t0 in range(r0, r_end, ROWS):
            rows = t0 + tl.arange(0, ROWS)
            dy = tl.load(dy_ptr + rows[:, None] * D + cols[None, :], mask=(rows < r_end)[:, None] & cmask[None, :],
                         other=0.0).to(tl.float32)
            db += tl.sum(dy, axis=0)
        tl.store(part + D * D + cols, db, mask=cmask)
    else:
        rows = (pid - splits) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < N
        dy = tl.load(dy_ptr + rows[:, None] * D + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                     other=0.0).to(DTYPE)
        hmask = rmask[:, None] & dmask[None, :]
        for h in range(H):
            wp = tl.load(pw_ptr + cols[:, None] * D + h * HD + dcols[None, :], mask=cmask[:, None] & dmask[None, :],
                         other=0.0).to(DTYPE)  # (D_PAD, HD_PAD): W_proj[:, head h]
            do = _mma(dy, wp, tl.zeros((BLOCK_M, HD_PAD), tl.float32), DOT_F32).to(DTYPE)
            tl.store(do_ptr + rows[:, None] * D + h * HD + dcols[None, :], do, mask=hmask)
            o = tl.load(o_ptr + rows[:, None] * D + h * HD + dcols[None, :], mask=hmask, other=0.0)
            tl.store(delta_ptr + rows * H + h, tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1), mask=rmask)


@triton.jit
def _attn_bwd_kernel(qkv_ptr, do_ptr, lse_ptr, delta_ptr, dqkv_ptr, n_tok, D, E, H, G, HD, sm_scale, kv_tiles,
                     HD_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DTYPE: tl.constexpr,
                     DOT_F32: tl.constexpr):
    """qkv (N, E), dO (N, D), lse, Δ (N, H) → dqkv (N, E) DTYPE. Grid: (kv_tiles + query tiles, B):
    the first kv_tiles programs of a sequence write dK, dV of one key tile (summed over the group's
    heads and every query tile), the others dQ of one query tile (over every key tile)."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    dcols = tl.arange(0, HD_PAD)
    dmask = dcols < HD
    qk_scale = sm_scale * LOG2E
    heads_per_group = H // G
    if pid < kv_tiles:
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = offs_n < n_tok
        keys = b * n_tok + offs_n
        kmask = nmask[:, None] & dmask[None, :]
        for g in range(G):
            k = tl.load(qkv_ptr + keys[:, None] * E + D + g * HD + dcols[None, :], mask=kmask, other=0.0)
            v = tl.load(qkv_ptr + keys[:, None] * E + D + (G + g) * HD + dcols[None, :], mask=kmask, other=0.0)
            dk = tl.zeros((BLOCK_N, HD_PAD), tl.float32)
            dv = tl.zeros((BLOCK_N, HD_PAD), tl.float32)
            for hh in range(heads_per_group):
                h = g * heads_per_group + hh
                for m0 in range(0, n_tok, BLOCK_M):
                    offs_m = m0 + tl.arange(0, BLOCK_M)
                    mmask = offs_m < n_tok
                    rows = b * n_tok + offs_m
                    qmask = mmask[:, None] & dmask[None, :]
                    q = tl.load(qkv_ptr + rows[:, None] * E + h * HD + dcols[None, :], mask=qmask, other=0.0)
                    do = tl.load(do_ptr + rows[:, None] * D + h * HD + dcols[None, :], mask=qmask, other=0.0)
                    lse = tl.load(lse_ptr + rows * H + h, mask=mmask, other=0.0)
                    delta = tl.load(delta_ptr + rows * H + h, mask=mmask, other=0.0)
                    s = _mma(q, tl.trans(k), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), DOT_F32) * qk_scale
                    p = tl.where(mmask[:, None] & nmask[None, :], tl.exp2(s - lse[:, None]), 0.0)
                    dv = _mma(tl.trans(p.to(DTYPE)), do, dv, DOT_F32)
                    dp = _mma(do, tl.trans(v), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), DOT_F32)
                    ds = p * (dp - delta[:, None])
                    dk = _mma(tl.trans(ds.to(DTYPE)), q, dk, DOT_F32)
            tl.store(dqkv_ptr + keys[:, None] * E + D + g * HD + dcols[None, :], (dk * sm_scale).to(DTYPE), mask=kmask)
            tl.store(dqkv_ptr + keys[:, None] * E + D + (G + g) * HD + dcols[None, :], dv.to(DTYPE), mask=kmask)
    else:
        offs_m = (pid - kv_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
        mmask = offs_m < n_tok
        rows = b * n_tok + offs_m
        qmask = mmask[:, None] & dmask[None, :]
        for h in range(H):
            g = h // heads_per_group
            q = tl.load(qkv_ptr + rows[:, None] * E + h * HD + dcols[None, :], mask=qmask, other=0.0)
            do = tl.load(do_ptr + rows[:, None] * D + h * HD + dcols[None, :], mask=qmask, other=0.0)
            lse = tl.load(lse_ptr + rows * H + h, mask=mmask, other=0.0)
            delta = tl.load(delta_ptr + rows * H + h, mask=mmask, other=0.0)
            dq = tl.zeros((BLOCK_M, HD_PAD), tl.float32)
            for n0 in range(0, n_tok, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                nmask = offs_n < n_tok
                keys = b * n_tok + offs_n
                kmask = nmask[:, None] & dmask[None, :]
                k = tl.load(qkv_ptr + keys[:, None] * E + D + g * HD + dcols[None, :], mask=kmask, other=0.0)
                v = tl.load(qkv_ptr + keys[:, None] * E + D + (G + g) * HD + dcols[None, :], mask=kmask, other=0.0)
                s = _mma(q, tl.trans(k), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), DOT_F32) * qk_scale
                p = tl.where(nmask[None, :], tl.exp2(s - lse[:, None]), 0.0)
                dp = _mma(do, tl.trans(v), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), DOT_F32)
                ds = p * (dp - delta[:, None])
                dq = _mma(ds.to(DTYPE), k, dq, DOT_F32)
            tl.store(dqkv_ptr + rows[:, None] * E + h * HD + dcols[None, :], (dq * sm_scale).to(DTYPE), mask=qmask)


@triton.jit
def _dxn(dqkv_ptr, w_ptr, rows, rmask, cols, cmask, D, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr,
         D_PAD: tl.constexpr, DTYPE: tl.constexpr, DOT_F32: tl.constexpr):
    """The gradient of a token tile's normalised input: dqkv (BLOCK_M, E) W_qkv (E, D) → (BLOCK_M, D_PAD) fp32."""
    dxn = tl.zeros((BLOCK_M, D_PAD), tl.float32)
    for e0 in range(0, E, BLOCK_E):
        es = e0 + tl.arange(0, BLOCK_E)
        emask = es < E
        dq = tl.load(dqkv_ptr + rows[:, None] * E + es[None, :], mask=rmask[:, None] & emask[None, :], other=0.0)
        w = tl.load(w_ptr + es[:, None] * D + cols[None, :], mask=emask[:, None] & cmask[None, :], other=0.0)
        dxn = _mma(dq, w.to(DTYPE), dxn, DOT_F32)
    return dxn


@triton.jit
def _ln_qkv_bwd_kernel(x_ptr, dy_ptr, lnw_ptr, lnb_ptr, w_ptr, mean_ptr, rstd_ptr, dqkv_ptr, dx_ptr, part_ptr, N, D,
                       E, splits, rows_per_split, P, stride_x, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_E: tl.constexpr, DTYPE: tl.constexpr, DOT_F32: tl.constexpr,
                       HAS_RESIDUAL: tl.constexpr):
    """x (N, D) (rows ``stride_x`` apart), dy (N, D), γ, β (D,), W_qkv (E, D), mean, rstd (N,), dqkv
    (N, E) → dx (N, D) contiguous in dx's dtype (LayerNorm backward of dqkv W_qkv, + dy with
    HAS_RESIDUAL) and the partial dW_qkv (E, D), db_qkv (E,), dγ, dβ (D,) fp32 of every split at
    ``part[split, :E·D + E + 2·D]``. Grid: (splits + token tiles,): the first ``splits`` programs
    sum the weight gradients of their rows (recomputing dqkv W_qkv for dγ, dβ), the others compute
    dx of BLOCK_M tokens. Also :mod:`mlit_kernels.norm_linear`'s backward."""
    pid = tl.program_id(0)
    cols = tl.arange(0, D_PAD)
    cmask = cols < D
    gamma = tl.load(lnw_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    if pid < splits:
        r0 = pid * rows_per_split
        r_end = tl.minimum(r0 + rows_per_split, N)
        part = part_ptr + pid * P
        beta = tl.load(lnb_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        for e0 in range(0, E, BLOCK_E):  # dW_qkv, db_qkv: one chunk of output rows at a time
            es = e0 + tl.arange(0, BLOCK_E)
            emask = es < E
            dw = tl.zeros((BLOCK_E, D_PAD), tl.float32)
            db = tl.zeros((BLOCK_E,), tl.float32)
            for t0 in range(r0, r_end, BLOCK_M):
                rows = t0 + tl.arange(0, BLOCK_M)
                rmask = rows < r_end
                xhat, _ = _normalized(x_ptr, mean_ptr, rstd_ptr, rows, rmask, cols, cmask, stride_x)
                xn = tl.where(rmask[:, None], xhat * gamma[None, :] + beta[None, :], 0.0).to(DTYPE)
                dq = tl.load(dqkv_ptr + rows[:, None] * E + es[None, :], mask=rmask[:, None] & emask[None, :],
                             other=0.0)
                dw = _mma(tl.trans(dq), xn, dw, DOT_F32)
                db += tl.sum(dq.to(tl.float32), axis=0)
            tl.store(part + es[:, None] * D + cols[None, :], dw, mask=emask[:, None] & cmask[None, :])
            tl.store(part + E * D + es, db, mask=emask)
        dgamma = tl.zeros((D_PAD,), tl.float32)
        dbeta = tl.zeros((D_PAD,), tl.float32)
        for t0 in range(r0, r_end, BLOCK_M):  # the LayerNorm's parameters
            rows = t0 + tl.arange(0, BLOCK_M)
            rmask = rows < r_end
            dxn = _dxn(dqkv_ptr, w_ptr, rows, rmask, cols, cmask, D, E, BLOCK_M, BLOCK_E, D_PAD, DTYPE, DOT_F32)
            xhat, _ = _normalized(x_ptr, mean_ptr, rstd_ptr, rows, rmask, cols, cmask, stride_x)
            dgamma += tl.sum(dxn * xhat, axis=0)
            dbeta += tl.sum(dxn, axis=0)
        tl.store(part + E * D + E + cols, dgamma, mask=cmask)
        tl.store(part + E * D + E + D + cols, dbeta, mask=cmask)
    else:
        rows = (pid - splits) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < N
        dxn = _dxn(dqkv_ptr, w_ptr, rows, rmask, cols, cmask, D, E, BLOCK_M, BLOCK_E, D_PAD, DTYPE, DOT_F32)
        xhat, rstd = _normalized(x_ptr, mean_ptr, rstd_ptr, rows, rmask, cols, cmask, stride_x)
        gx = dxn * gamma[None, :]
        c1 = tl.sum(gx * xhat, axis=1) / D
        c2 = tl.sum(gx, axis=1) / D
        mask = rmask[:, None] & cmask[None, :]
        dx = (gx - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        if HAS_RESIDUAL:
            dx += tl.load(dy_ptr + rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + rows[:, None] * D + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
