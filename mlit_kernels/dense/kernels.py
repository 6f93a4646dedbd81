"""The dense variant's Triton kernels: the whole MoE layer for few experts, two forward and three
backward kernels (the launch code is :mod:`mlit_kernels.dense.launch`).

Per token n, with gates g (zero off the token's top k) and shared V, W_2 (SPEC §5):

    a_e = x W_e + b_e   (every expert a tile routes to; t ≤ 16)     u = x V + b_V
    c   = Σ_e g_e silu(a_e)          h = c ⊙ u          y = dropout(h W_2 + b_2)

Forward
  1. ``_fused_fwd_kernel``, one program per BLOCK_N-token tile: gate logits (fp32), noise (Philox
     from a device seed) and noise scale, top-k (:mod:`mlit_kernels.common.gating`'s rule),
     Softmax_k, P(x); the partial sums of G (importance) and of P(x) or the routing counts (load)
     per group of SUM_ROWS tokens; then, looping over d_h chunks: u, every routed expert's a_e, c,
     h, and y accumulated in registers over the chunks; b_2 and dropout in the epilogue. Writes y,
     the top-k indices (N, k) int32, the partial sums and (with dropout) the keep mask (N, m) uint8.
  2. ``_fused_aux_kernel``, one program: sums the partials in group order and writes importance,
     load and the auxiliary loss (no chain of torch ops over two (t,) vectors).

Backward
  3. ``_fused_bwd_tokens_kernel``, per token tile: recomputes the gate (with the forward's stored
     selection) and u, a_e, c; dh = dy W_2ᵀ; writes dx = du Vᵀ + Σ_e da_e W_eᵀ + the gate's part,
     and the fp16/bf16 intermediates of the weight gradients: da (N, k, d_h) per (token, pick),
     du = dh ⊙ c, h = c ⊙ u (N, d_h), and dclean / draw (N, 2, t) fp32.
  4. ``_fused_bwd_weights_kernel``: one program per (weight tile, N split): W_e[:, chunk],
     V[:, chunk], W_2[chunk, :] (+ their biases) and W_g / W_noise, each summing its split's
     tokens in registers, ROWS at a time; writes per-split partials.
  5. the ordered split sum (:mod:`mlit_kernels.common.split_sum`): sums the splits in a fixed order
     into the gradients (parameter dtype).

With NORM the layer's input is LayerNorm(x) (:mod:`mlit_kernels.common.norm`): kernel 1 computes
each row's mean and rstd and stores them ((2, N) fp32), every kernel normalizes x where it reads
it, kernel 3 applies the norm's backward per row (it holds whole rows of dL/dLN(x)) and writes
the per-16-token partial sums of the norm's weight and bias gradients, which kernel 4 adds up per
split in extra programs (appended to the flat gradient). With RESIDUAL the output is x + y (added
in the store) and dx gets dy added.

Nothing uses float atomics, and every sum over tokens has boundaries fixed by the shape
(:mod:`mlit_kernels.common.settings`: SUM_ROWS, the splits, ROWS), not by the tuned BLOCK_N: every
configuration gives the same bits. Widths m are covered by up to four power-of-two chunks
(:func:`mlit_kernels.common.tiling.width_chunks`: 144 = 16 + 128, no padding) held as a tuple of
register tiles, d_h by a loop of DC-wide chunks. x, the weights and dy are read in the dtype they
are stored in and converted in registers (fp32 masters under autocast need no cast kernels).
Expert products run on the activation dtype (fp16/bf16 tensor cores, fp32 accumulation; fp32
activations use IEEE fp32); the gate is fp32 throughout.

Width chunks: a kernel takes their widths M0 ≤ M1 ≤ M2 ≤ M3 (0 = absent, after the present ones)
as constexprs and makes ``WIDTHS = (M0, M1, M2, M3)`` and ``STARTS`` (their first columns); a
helper loops over them with ``tl.static_range`` and keeps one register tile per present chunk in a
tuple.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..common.gating import (cv_grad, cv_value, gate_from_selection_normed, gate_grads, gate_probs,
                             gate_tile_normed, load_probability, select_top_k, selection_key, token_tile)
from ..common.norm import norm_backward_sums, norm_input_grad, norm_row_stats, normalized_cols

_DROPOUT_STREAM = tl.constexpr(0x5EED)  # Philox key offset of the dropout draws (the gate noise uses the seed itself)


# ----------------------------------------------------------------------------------------------
# device helpers: one column chunk


@triton.jit
def _mma(a, b, acc, DOT_F32: tl.constexpr):
    """acc + a @ b with fp32 accumulation. DOT_F32 (fp32 operands, IEEE) is for fp32 activations,
    and for bf16 under the interpreter, whose tl.dot mishandles bfloat16 (the values are the same
    bf16-rounded numbers; only the product hardware differs)."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _load_cols(ptr, rows, row_ok, ld, c0: tl.constexpr, W: tl.constexpr, ncols, DTYPE: tl.constexpr):
    """Columns [c0, c0 + W) of rows ``rows`` of a row-major (·, ld) matrix, zero-padded past
    ``ncols``, converted to DTYPE."""
    cols = c0 + tl.arange(0, W)
    mask = row_ok[:, None] & (cols < ncols)[None, :]
    return tl.load(ptr + rows[:, None].to(tl.int64) * ld + cols[None, :], mask=mask, other=0.0).to(DTYPE)


@triton.jit
def _times_rows(x, acc, w_ptr, ld, ds, d_ok, M, c0: tl.constexpr, W: tl.constexpr, DTYPE: tl.constexpr,
                DOT_F32: tl.constexpr):
    """acc + x @ W[c0:c0+W, ds]: a column chunk x (BLOCK_N, W) times the matching rows of W (M, ld)."""
    r = c0 + tl.arange(0, W)
    w = tl.load(w_ptr + r[:, None] * ld + ds[None, :], mask=(r < M)[:, None] & d_ok[None, :], other=0.0)
    return _mma(x, w.to(DTYPE), acc, DOT_F32)


@triton.jit
def _times_rows_t(p, acc, w_ptr, ld, ds, d_ok, M, c0: tl.constexpr, W: tl.constexpr, DTYPE: tl.constexpr,
                  DOT_F32: tl.constexpr):
    """acc + p @ W[c0:c0+W, ds]ᵀ: p (BLOCK_N, DC) times the transposed rows of W (M, ld)."""
    r = c0 + tl.arange(0, W)
    wt = tl.load(w_ptr + r[None, :] * ld + ds[:, None], mask=d_ok[:, None] & (r < M)[None, :], other=0.0)
    return _mma(p, wt.to(DTYPE), acc, DOT_F32)


@triton.jit
def _times_cols(p, acc, w_ptr, ld, ds, d_ok, M, c0: tl.constexpr, W: tl.constexpr, DTYPE: tl.constexpr,
                DOT_F32: tl.constexpr):
    """acc + p @ W[ds, c0:c0+W]: p (BLOCK_N, DC) times rows ds of W (D, ld = M), columns chunk."""
    c = c0 + tl.arange(0, W)
    w = tl.load(w_ptr + ds[:, None] * ld + c[None, :], mask=d_ok[:, None] & (c < M)[None, :], other=0.0)
    return _mma(p, w.to(DTYPE), acc, DOT_F32)


@triton.jit
def _times_cols_t(p, acc, w_ptr, ld, ds, d_ok, M, c0: tl.constexpr, W: tl.constexpr, DTYPE: tl.constexpr,
                  DOT_F32: tl.constexpr):
    """acc + p @ W[ds, c0:c0+W]ᵀ: p (BLOCK_N, W) times the transposed columns chunk of W (D, ld = M)."""
    c = c0 + tl.arange(0, W)
    wt = tl.load(w_ptr + ds[None, :] * ld + c[:, None], mask=(c < M)[:, None] & d_ok[None, :], other=0.0)
    return _mma(p, wt.to(DTYPE), acc, DOT_F32)


@triton.jit
def _gate_dx(dx, dclean, draw, wg_ptr, wn_ptr, M, T, cols, c0: tl.constexpr, W: tl.constexpr, NOISY: tl.constexpr):
    """dx[:, chunk] += dclean W_g[chunk]ᵀ (+ draw W_noise[chunk]ᵀ) in fp32, as T rank-1 updates (an
    fp32 tl.dot over K = BLOCK_T gives each thread its rows of dclean whole, and makes 16 products
    where T = 5 needs 5: as a dot, the token kernel's sm_90 spills were larger)."""
    r = c0 + tl.arange(0, W)
    r_ok = r < M
    for e in range(T):
        wg = tl.load(wg_ptr + r * T + e, mask=r_ok, other=0.0).to(tl.float32)
        dx += _expert_column(dclean, cols, e)[:, None] * wg[None, :]
        if NOISY:
            wn = tl.load(wn_ptr + r * T + e, mask=r_ok, other=0.0).to(tl.float32)
            dx += _expert_column(draw, cols, e)[:, None] * wn[None, :]
    return dx


@triton.jit
def _store_rows(ptr, val, rows, row_ok, M, c0: tl.constexpr, W: tl.constexpr):
    cols = c0 + tl.arange(0, W)
    tl.store(ptr + rows[:, None].to(tl.int64) * M + cols[None, :], val.to(ptr.dtype.element_ty),
             mask=row_ok[:, None] & (cols < M)[None, :])


@triton.jit
def _expert_column(mat, cols, e):
    """Column e of a (BLOCK_N, BLOCK_T) tile, as (BLOCK_N,)."""
    return tl.sum(tl.where(cols[None, :] == e, mat, 0), axis=1)


@triton.jit
def _keep_mask(seed, rows, M, c0: tl.constexpr, W: tl.constexpr, drop_p):
    """Dropout keep decisions of a column chunk: Philox ``rand(seed + stream, row·m + col) ≥ p``."""
    cols = c0 + tl.arange(0, W)
    offs = rows[:, None] * M + cols[None, :]
    return tl.rand(seed + _DROPOUT_STREAM, offs) >= drop_p


@triton.jit
def _store_out(y, b2_ptr, y_ptr, keep_ptr, x_ptr, seed, rows, row_ok, M, c0: tl.constexpr, W: tl.constexpr, drop_p,
               DROPOUT: tl.constexpr, RESIDUAL: tl.constexpr):
    """y + b_2 for a column chunk, dropout (keep mask stored as uint8), + x with RESIDUAL, stored in
    y's dtype."""
    cols = c0 + tl.arange(0, W)
    col_ok = cols < M
    mask = row_ok[:, None] & col_ok[None, :]
    y += tl.load(b2_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    offs = rows[:, None].to(tl.int64) * M + cols[None, :]
    if DROPOUT:
        keep = _keep_mask(seed, rows, M, c0, W, drop_p)
        y = tl.where(keep, y / (1.0 - drop_p), 0.0)
        tl.store(keep_ptr + offs, keep.to(tl.uint8), mask=mask)
    if RESIDUAL:
        y += tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _plus_residual_grad(dx, dy_ptr, rows, row_ok, M, c0: tl.constexpr, W: tl.constexpr, RESIDUAL: tl.constexpr):
    """dx of a column chunk, + dy there with RESIDUAL (the gradient through the residual add)."""
    if RESIDUAL:
        cols = c0 + tl.arange(0, W)
        mask = row_ok[:, None] & (cols < M)[None, :]
        dx += tl.load(dy_ptr + rows[:, None].to(tl.int64) * M + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    return dx


@triton.jit
def _load_grad_out(dy_ptr, keep_ptr, rows, row_ok, M, c0: tl.constexpr, W: tl.constexpr, drop_p,
                   DROPOUT: tl.constexpr, DTYPE: tl.constexpr):
    """dL/d(h W_2 + b_2) for a column chunk: dy through the stored dropout mask, in DTYPE."""
    cols = c0 + tl.arange(0, W)
    mask = row_ok[:, None] & (cols < M)[None, :]
    offs = rows[:, None].to(tl.int64) * M + cols[None, :]
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if DROPOUT:
        keep = tl.load(keep_ptr + offs, mask=mask, other=0)
        dy = tl.where(keep != 0, dy / (1.0 - drop_p), 0.0)
    return dy.to(DTYPE)


# ----------------------------------------------------------------------------------------------
# device helpers: a whole width m, as a tuple of register tiles (one per present chunk)


@triton.jit
def _zeros_by_chunk(R: tl.constexpr, WIDTHS: tl.constexpr):
    """fp32 accumulators (R, width) per chunk."""
    out = ()
    for i in tl.static_range(len(WIDTHS)):
        if WIDTHS[i] > 0:
            out = out + (tl.zeros((R, WIDTHS[i]), dtype=tl.float32),)
    return out


@triton.jit
def _input_rows_by_chunk(x_ptr, rows, row_ok, M, ln_w_ptr, ln_b_ptr, mean, rstd, NORM: tl.constexpr,
                         STARTS: tl.constexpr, WIDTHS: tl.constexpr, DTYPE: tl.constexpr):
    """The layer's input rows ``rows``, per chunk, in DTYPE: x (N, M), or with NORM LayerNorm(x)
    (the rows' mean and rstd (BLOCK_N,))."""
    out = ()
    for i in tl.static_range(len(WIDTHS)):
        if WIDTHS[i] > 0:
            cols = STARTS[i] + tl.arange(0, WIDTHS[i])
            if NORM:
                out = out + (normalized_cols(x_ptr, rows, row_ok, cols, cols < M, M, ln_w_ptr, ln_b_ptr, mean, rstd,
                                             NORM).to(DTYPE),)
            else:
                out = out + (_load_cols(x_ptr, rows, row_ok, M, STARTS[i], WIDTHS[i], M, DTYPE),)
    return out


@triton.jit
def _norm_stats(ln_stats_ptr, rows, row_ok, N, NORM: tl.constexpr):
    """The rows' LayerNorm mean and rstd (fp32, rows' shape) from the forward's (2, N) statistics;
    zeros without NORM."""
    mean = tl.zeros(rows.shape, dtype=tl.float32)
    rstd = mean
    if NORM:
        mean = tl.load(ln_stats_ptr + rows, mask=row_ok, other=0.0)
        rstd = tl.load(ln_stats_ptr + N + rows, mask=row_ok, other=0.0)
    return mean, rstd


@triton.jit
def _input_cols(x_ptr, rows, row_ok, M, c0: tl.constexpr, W: tl.constexpr, DTYPE: tl.constexpr, ln_w_ptr, ln_b_ptr,
                ln_stats_ptr, N, NORM: tl.constexpr):
    """Columns [c0, c0 + W) of the layer's input rows ``rows`` in DTYPE: x (N, M), or with NORM
    LayerNorm(x) from the forward's mean and rstd (ln_stats (2, N))."""
    if NORM:
        cols = c0 + tl.arange(0, W)
        mean, rstd = _norm_stats(ln_stats_ptr, rows, row_ok, N, NORM)
        return normalized_cols(x_ptr, rows, row_ok, cols, cols < M, M, ln_w_ptr, ln_b_ptr, mean, rstd, NORM).to(DTYPE)
    return _load_cols(x_ptr, rows, row_ok, M, c0, W, M, DTYPE)


@triton.jit
def _grad_out_by_chunk(dy_ptr, keep_ptr, rows, row_ok, M, drop_p, STARTS: tl.constexpr, WIDTHS: tl.constexpr,
                       DROPOUT: tl.constexpr, DTYPE: tl.constexpr):
    """:func:`_load_grad_out` per chunk."""
    out = ()
    for i in tl.static_range(len(WIDTHS)):
        if WIDTHS[i] > 0:
            out = out + (_load_grad_out(dy_ptr, keep_ptr, rows, row_ok, M, STARTS[i], WIDTHS[i], drop_p, DROPOUT,
                                        DTYPE),)
    return out


@triton.jit
def _project(x, w_ptr, b_ptr, ds, d_ok, M, D, STARTS: tl.constexpr, WIDTHS: tl.constexpr, BLOCK_N: tl.constexpr,
             DC: tl.constexpr, DTYPE: tl.constexpr, DOT_F32: tl.constexpr):
    """x W[:, ds] + b[ds] (fp32, (BLOCK_N, DC)) from the chunks of x; W (M, D) row-major."""
    acc = tl.zeros((BLOCK_N, DC), dtype=tl.float32)
    for i in tl.static_range(len(WIDTHS)):
        if WIDTHS[i] > 0:
            acc = _times_rows(x[i], acc, w_ptr, D, ds, d_ok, M, STARTS[i], WIDTHS[i], DTYPE, DOT_F32)
    return acc + tl.load(b_ptr + ds, mask=d_ok, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _grad_hidden(dy, w2_ptr, ds, d_ok, M, STARTS: tl.constexpr, WIDTHS: tl.constexpr, BLOCK_N: tl.constexpr,
                 DC: tl.constexpr, DTYPE: tl.constexpr, DOT_F32: tl.constexpr):
    """dh[:, ds] = dy W_2[ds, :]ᵀ (fp32, (BLOCK_N, DC)) from the chunks of dy; W_2 (D, M) row-major."""
    acc = tl.zeros((BLOCK_N, DC), dtype=tl.float32)
    for i in tl.static_range(len(WIDTHS)):
        if WIDTHS[i] > 0:
            acc = _times_cols_t(dy[i], acc, w2_ptr, M, ds, d_ok, M, STARTS[i], WIDTHS[i], DTYPE, DOT_F32)
    return acc


@triton.jit
def _add_product_by_chunk(acc, p, w_ptr, ds, d_ok, M, D, STARTS: tl.constexpr, WIDTHS: tl.constexpr,
                          W_IS_M_BY_D: tl.constexpr, DTYPE: tl.constexpr, DOT_F32: tl.constexpr):
    """acc + p B per chunk, p (BLOCK_N, DC) and B the chunk's (DC, width) block of a weight:
    W (M, D) read transposed, W[chunk, ds]ᵀ (dx + da W_eᵀ, the gradient of x W) when W_IS_M_BY_D,
    else W (D, M), W[ds, chunk] (y + h W_2)."""
    out = ()
    for i in tl.static_range(len(WIDTHS)):
        if WIDTHS[i] > 0:
            if W_IS_M_BY_D:
                out = out + (_times_rows_t(p, acc[i], w_ptr, D, ds, d_ok, M, STARTS[i], WIDTHS[i], DTYPE, DOT_F32),)
            else:
                out = out + (_times_cols(p, acc[i], w_ptr, M, ds, d_ok, M, STARTS[i], WIDTHS[i], DTYPE, DOT_F32),)
    return out


@triton.jit
def _store_output(y, b2_ptr, y_ptr, keep_ptr, x_ptr, seed, rows, row_ok, M, drop_p, STARTS: tl.constexpr,
                  WIDTHS: tl.constexpr, DROPOUT: tl.constexpr, RESIDUAL: tl.constexpr):
    """:func:`_store_out` per chunk."""
    for i in tl.static_range(len(WIDTHS)):
        if WIDTHS[i] > 0:
            _store_out(y[i], b2_ptr, y_ptr, keep_ptr, x_ptr, seed, rows, row_ok, M, STARTS[i], WIDTHS[i], drop_p,
                       DROPOUT, RESIDUAL)


@triton.jit
def _store_input_grad(dx, dclean, draw, wg_ptr, wn_ptr, dy_ptr, dx_ptr, rows, row_ok, cols, col_ok, M, T,
                      STARTS: tl.constexpr, WIDTHS: tl.constexpr, NOISY: tl.constexpr, RESIDUAL: tl.constexpr):
    """dx + the gate's part (dclean W_gᵀ + draw W_noiseᵀ) (+ dy with RESIDUAL) per chunk, stored in
    dx's dtype."""
    for i in tl.static_range(len(WIDTHS)):
        if WIDTHS[i] > 0:
            grad = _gate_dx(dx[i], dclean, draw, wg_ptr, wn_ptr, M, T, cols, STARTS[i], WIDTHS[i], NOISY)
            _store_rows(dx_ptr, _plus_residual_grad(grad, dy_ptr, rows, row_ok, M, STARTS[i], WIDTHS[i], RESIDUAL),
                        rows, row_ok, M, STARTS[i], WIDTHS[i])


@triton.jit
def _store_group_sums(part_ptr, vals, rows, cols, col_ok, N, T, pid, SUM_ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    """part[group, :T] = Σ of vals (BLOCK_N, BLOCK_T; zero on invalid rows) over each SUM_ROWS-token
    group of the tile: boundaries fixed by N alone, whatever BLOCK_N. part rows are 2T apart."""
    for j in tl.static_range(BLOCK_N // SUM_ROWS):
        group = pid * (BLOCK_N // SUM_ROWS) + j
        in_group = (rows >= group * SUM_ROWS) & (rows < group * SUM_ROWS + SUM_ROWS)
        total = tl.sum(tl.where(in_group[:, None], vals, 0.0), axis=0)
        first_row = group * SUM_ROWS + 0 * cols  # as a block: the interpreter's masks cannot mix in a scalar
        tl.store(part_ptr + group * 2 * T + cols, total, mask=col_ok & (first_row < N))


@triton.jit
def _store_norm_group_sums(part_ptr, dw, db, rows, N, M, pid, c0: tl.constexpr, W: tl.constexpr,
                           SUM_ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    """part[group, 0, chunk] = Σ dw and part[group, 1, chunk] = Σ db ((BLOCK_N, W) fp32, zero on
    invalid rows) over each SUM_ROWS-token group of the tile (boundaries fixed by N alone, as
    :func:`_store_group_sums`); part (groups, 2, M) fp32."""
    cols = c0 + tl.arange(0, W)
    col_ok = cols < M
    for j in tl.static_range(BLOCK_N // SUM_ROWS):
        group = pid * (BLOCK_N // SUM_ROWS) + j
        in_group = ((rows >= group * SUM_ROWS) & (rows < group * SUM_ROWS + SUM_ROWS))[:, None]
        ok = col_ok & (group * SUM_ROWS + 0 * cols < N)
        base = part_ptr + group * 2 * M + cols
        tl.store(base, tl.sum(tl.where(in_group, dw, 0.0), axis=0), mask=ok)
        tl.store(base + M, tl.sum(tl.where(in_group, db, 0.0), axis=0), mask=ok)


@triton.jit
def _store_norm_input_grad(dx, dclean, draw, wg_ptr, wn_ptr, x_ptr, ln_w_ptr, mean, rstd, dy_ptr, dx_ptr, ln_part_ptr,
                           pid, rows, row_ok, cols, col_ok, N, M, T, STARTS: tl.constexpr, WIDTHS: tl.constexpr,
                           NOISY: tl.constexpr, RESIDUAL: tl.constexpr, SUM_ROWS: tl.constexpr,
                           BLOCK_N: tl.constexpr):
    """dL/dxn = dx + the gate's part per chunk, through the LayerNorm: dx (+ dy with RESIDUAL; x's
    dtype) and the token groups' partial sums of dL/dxn ⊙ x̂ and dL/dxn (the norm's weight and bias
    gradients)."""
    dxn = ()
    for i in tl.static_range(len(WIDTHS)):
        if WIDTHS[i] > 0:
            dxn = dxn + (_gate_dx(dx[i], dclean, draw, wg_ptr, wn_ptr, M, T, cols, STARTS[i], WIDTHS[i], NOISY),)
    s_g, s_gx = norm_backward_sums(dxn, x_ptr, ln_w_ptr, rows, row_ok, M, mean, rstd, STARTS, WIDTHS)
    for i in tl.static_range(len(WIDTHS)):
        if WIDTHS[i] > 0:
            ms = STARTS[i] + tl.arange(0, WIDTHS[i])
            grad, xhat = norm_input_grad(dxn[i], x_ptr, ln_w_ptr, rows, row_ok, ms, ms < M, M, mean, rstd, s_g, s_gx)
            grad = _plus_residual_grad(grad, dy_ptr, rows, row_ok, M, STARTS[i], WIDTHS[i], RESIDUAL)
            _store_rows(dx_ptr, grad, rows, row_ok, M, STARTS[i], WIDTHS[i])
            _store_norm_group_sums(ln_part_ptr, dxn[i] * xhat, tl.where(row_ok[:, None], dxn[i], 0.0), rows, N, M,
                                   pid, STARTS[i], WIDTHS[i], SUM_ROWS, BLOCK_N)


# ----------------------------------------------------------------------------------------------
# forward


@triton.jit
def _fused_fwd_kernel(
    x_ptr, wg_ptr, wn_ptr, w1_ptr, b1_ptr, v_ptr, bv_ptr, w2_ptr, b2_ptr, noise_ptr, seed_ptr,
    y_ptr, idx_ptr, part_ptr, keep_ptr, ln_w_ptr, ln_b_ptr, ln_stats_ptr,
    N, M, D, T, noise_eps, drop_p, ln_eps,
    K: tl.constexpr, NOISY: tl.constexpr, NOISE_MODE: tl.constexpr, LOAD_P: tl.constexpr, DROPOUT: tl.constexpr,
    NORM: tl.constexpr, RESIDUAL: tl.constexpr,
    M0: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr, M3: tl.constexpr, DC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, SUM_ROWS: tl.constexpr, DTYPE: tl.constexpr, DOT_F32: tl.constexpr,
):
    WIDTHS: tl.constexpr = (M0, M1, M2, M3)
    STARTS: tl.constexpr = (0, M0, M0 + M1, M0 + M1 + M2)
    pid = tl.program_id(0)
    rows, row_ok, cols, col_ok, valid, seed = token_tile(pid, seed_ptr, N, T, NOISE_MODE == 2 or DROPOUT, BLOCK_N,
                                                          BLOCK_T)

    # the LayerNorm's row statistics (NORM): kept for the backward; x is normalized where it is read
    mean = tl.zeros((BLOCK_N,), dtype=tl.float32)
    rstd = mean
    if NORM:
        mean, rstd = norm_row_stats(x_ptr, rows, row_ok, M, ln_eps, STARTS, WIDTHS)
        tl.store(ln_stats_ptr + rows, mean, mask=row_ok)
        tl.store(ln_stats_ptr + N + rows, rstd, mask=row_ok)

    # gate
    clean, raw, std, eps, h = gate_tile_normed(x_ptr, wg_ptr, wn_ptr, noise_ptr, seed, rows, row_ok, cols, col_ok, M, T,
                                        noise_eps, NOISY, NOISE_MODE, BLOCK_N, BLOCK_T, ln_w_ptr, ln_b_ptr, mean,
                                        rstd, NORM)
    key, taken = selection_key(h, col_ok)
    taken, kth_col = select_top_k(key, taken, cols, idx_ptr, rows, row_ok, K, BLOCK_T)
    sel, g, kth, nxt, nxt_col = gate_probs(h, key, taken, col_ok, kth_col, cols, BLOCK_T)
    _store_group_sums(part_ptr, tl.where(valid, g, 0.0), rows, cols, col_ok, N, T, pid, SUM_ROWS, BLOCK_N)
    if LOAD_P:
        load = tl.where(valid, load_probability(clean, h, std, kth, nxt), 0.0)
    else:
        load = tl.where(valid & (sel != 0), 1.0, 0.0)
    _store_group_sums(part_ptr + T, load, rows, cols, col_ok, N, T, pid, SUM_ROWS, BLOCK_N)

    # experts
    x = _input_rows_by_chunk(x_ptr, rows, row_ok, M, ln_w_ptr, ln_b_ptr, mean, rstd, NORM, STARTS, WIDTHS, DTYPE)
    y = _zeros_by_chunk(BLOCK_N, WIDTHS)
    routed = tl.sum(tl.where(row_ok[:, None], sel, 0), axis=0)  # (BLOCK_T,) tokens of the tile per expert
    for d0 in range(0, D, DC):
        ds = d0 + tl.arange(0, DC)
        d_ok = ds < D
        u = _project(x, v_ptr, bv_ptr, ds, d_ok, M, D, STARTS, WIDTHS, BLOCK_N, DC, DTYPE, DOT_F32)
        c = tl.zeros((BLOCK_N, DC), dtype=tl.float32)
        for e in range(T):
            if tl.sum(tl.where(cols == e, routed, 0), axis=0) > 0:  # an expert no token of the tile picked is skipped
                a = _project(x, w1_ptr + e * M * D, b1_ptr + e * D, ds, d_ok, M, D, STARTS, WIDTHS, BLOCK_N, DC,
                             DTYPE, DOT_F32)
                c += _expert_column(g, cols, e)[:, None] * (a * tl.sigmoid(a))
        y = _add_product_by_chunk(y, (c * u).to(DTYPE), w2_ptr, ds, d_ok, M, D, STARTS, WIDTHS, False, DTYPE, DOT_F32)
    _store_output(y, b2_ptr, y_ptr, keep_ptr, x_ptr, seed, rows, row_ok, M, drop_p, STARTS, WIDTHS, DROPOUT, RESIDUAL)


@triton.jit
def _fused_aux_kernel(part_ptr, stats_ptr, aux_ptr, groups, T, w_importance, w_load,
                      SQUARED: tl.constexpr, UNBIASED: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_T: tl.constexpr):
    """importance, load (2, T) = the groups' partial sums in group order; aux = w_i CV(imp) + w_l CV(load)."""
    cols = tl.arange(0, BLOCK_T)
    col_ok = cols < T
    imp = tl.zeros((BLOCK_T,), dtype=tl.float32)
    load = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for p0 in range(0, groups, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        mask = (ps < groups)[:, None] & col_ok[None, :]
        base = part_ptr + ps[:, None] * 2 * T + cols[None, :]
        imp += tl.sum(tl.load(base, mask=mask, other=0.0), axis=0)
        load += tl.sum(tl.load(base + T, mask=mask, other=0.0), axis=0)
    tl.store(stats_ptr + cols, imp, mask=col_ok)
    tl.store(stats_ptr + T + cols, load, mask=col_ok)
    aux = w_importance * cv_value(imp, col_ok, T, SQUARED, UNBIASED) + w_load * cv_value(load, col_ok, T, SQUARED,
                                                                                           UNBIASED)
    tl.store(aux_ptr, aux)


# ----------------------------------------------------------------------------------------------
# backward


@triton.jit
def _fused_bwd_tokens_kernel(
    dy_ptr, daux_ptr, x_ptr, wg_ptr, wn_ptr, w1_ptr, b1_ptr, v_ptr, bv_ptr, w2_ptr, noise_ptr, seed_ptr,
    idx_ptr, stats_ptr, keep_ptr, ln_w_ptr, ln_b_ptr, ln_stats_ptr,
    dx_ptr, da_ptr, du_ptr, h_ptr, dgate_ptr, ln_part_ptr,
    N, M, D, T, noise_eps, drop_p, w_importance, w_load,
    K: tl.constexpr, NOISY: tl.constexpr, NOISE_MODE: tl.constexpr, LOAD_P: tl.constexpr, DROPOUT: tl.constexpr,
    SQUARED: tl.constexpr, UNBIASED: tl.constexpr, NORM: tl.constexpr, RESIDUAL: tl.constexpr,
    M0: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr, M3: tl.constexpr, DC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, SUM_ROWS: tl.constexpr, DTYPE: tl.constexpr, DOT_F32: tl.constexpr,
):
    WIDTHS: tl.constexpr = (M0, M1, M2, M3)
    STARTS: tl.constexpr = (0, M0, M0 + M1, M0 + M1 + M2)
    pid = tl.program_id(0)
    rows, row_ok, cols, col_ok, valid, seed = token_tile(pid, seed_ptr, N, T, NOISE_MODE == 2 or DROPOUT, BLOCK_N,
                                                          BLOCK_T)
    # the forward's LayerNorm statistics (NORM): the input is normalized again where it is read
    mean, rstd = _norm_stats(ln_stats_ptr, rows, row_ok, N, NORM)

    # the gates, recomputed with the forward's selection (recomputed once more after the experts
    # for the gate's own gradient: cheaper than keeping its tiles live through the d_h loop)
    _, _, _, _, _, sel, g, _, _, _, _ = gate_from_selection_normed(
        x_ptr, wg_ptr, wn_ptr, noise_ptr, seed, idx_ptr, rows, row_ok, cols, col_ok, M, T, noise_eps, K, NOISY,
        NOISE_MODE, BLOCK_N, BLOCK_T, ln_w_ptr, ln_b_ptr, mean, rstd, NORM)
    d_aux = tl.load(daux_ptr)
    dg = tl.where(valid, cv_grad(stats_ptr, w_importance * d_aux, cols, col_ok, T, SQUARED, UNBIASED)[None, :], 0.0)

    # experts
    x = _input_rows_by_chunk(x_ptr, rows, row_ok, M, ln_w_ptr, ln_b_ptr, mean, rstd, NORM, STARTS, WIDTHS, DTYPE)
    dy = _grad_out_by_chunk(dy_ptr, keep_ptr, rows, row_ok, M, drop_p, STARTS, WIDTHS, DROPOUT, DTYPE)
    dx = _zeros_by_chunk(BLOCK_N, WIDTHS)
    routed = tl.sum(tl.where(row_ok[:, None], sel, 0), axis=0)
    for d0 in range(0, D, DC):
        ds = d0 + tl.arange(0, DC)
        d_ok = ds < D
        tile_mask = row_ok[:, None] & d_ok[None, :]
        tile = rows[:, None].to(tl.int64) * D + ds[None, :]
        dh = _grad_hidden(dy, w2_ptr, ds, d_ok, M, STARTS, WIDTHS, BLOCK_N, DC, DTYPE, DOT_F32)
        u = _project(x, v_ptr, bv_ptr, ds, d_ok, M, D, STARTS, WIDTHS, BLOCK_N, DC, DTYPE, DOT_F32)
        dcu = dh * u  # dL/dc
        c = tl.zeros((BLOCK_N, DC), dtype=tl.float32)
        for e in range(T):
            if tl.sum(tl.where(cols == e, routed, 0), axis=0) > 0:
                a = _project(x, w1_ptr + e * M * D, b1_ptr + e * D, ds, d_ok, M, D, STARTS, WIDTHS, BLOCK_N, DC,
                             DTYPE, DOT_F32)
                sig = tl.sigmoid(a)
                act = a * sig
                ge = _expert_column(g, cols, e)
                c += ge[:, None] * act
                dg += tl.where(cols[None, :] == e, tl.sum(tl.where(d_ok[None, :], dcu * act, 0.0), axis=1)[:, None],
                               0.0)
                da = (ge[:, None] * dcu * (sig * (1.0 + a * (1.0 - sig)))).to(DTYPE)
                dx = _add_product_by_chunk(dx, da, w1_ptr + e * M * D, ds, d_ok, M, D, STARTS, WIDTHS, True, DTYPE,
                                           DOT_F32)
                # the pair slot j of tokens that picked e: da (N, K, d_h) for the weight gradients
                for j in tl.static_range(K):
                    ij = tl.load(idx_ptr + rows.to(tl.int64) * K + j, mask=row_ok, other=-1)
                    slot = (rows[:, None].to(tl.int64) * K + j) * D + ds[None, :]
                    tl.store(da_ptr + slot, da, mask=tile_mask & (ij == e)[:, None])
        du = dh * c
        tl.store(h_ptr + tile, (c * u).to(h_ptr.dtype.element_ty), mask=tile_mask)
        tl.store(du_ptr + tile, du.to(du_ptr.dtype.element_ty), mask=tile_mask)
        dx = _add_product_by_chunk(dx, du.to(DTYPE), v_ptr, ds, d_ok, M, D, STARTS, WIDTHS, True, DTYPE, DOT_F32)
    # the gate's part: through Softmax_k, the noise scale and P(x). The statistics are read again:
    # held through the d_h loop (in each layout their uses take) they spilled on sm_90
    mean, rstd = _norm_stats(ln_stats_ptr, rows, row_ok, N, NORM)
    clean, raw, std, eps, h, sel, g, kth, kth_col, nxt, nxt_col = gate_from_selection_normed(
        x_ptr, wg_ptr, wn_ptr, noise_ptr, seed, idx_ptr, rows, row_ok, cols, col_ok, M, T, noise_eps, K, NOISY,
        NOISE_MODE, BLOCK_N, BLOCK_T, ln_w_ptr, ln_b_ptr, mean, rstd, NORM)
    d_load = cv_grad(stats_ptr + T, w_load * d_aux, cols, col_ok, T, SQUARED, UNBIASED)
    dclean, draw = gate_grads(dg, h, clean, std, eps, raw, sel, g, kth, kth_col, nxt, nxt_col, d_load, valid,
                              cols, NOISY, LOAD_P)
    gslot = rows[:, None].to(tl.int64) * 2 * T + cols[None, :]
    tl.store(dgate_ptr + gslot, dclean, mask=valid)
    tl.store(dgate_ptr + gslot + T, draw, mask=valid)
    if NORM:
        _store_norm_input_grad(dx, dclean, draw, wg_ptr, wn_ptr, x_ptr, ln_w_ptr, mean, rstd, dy_ptr, dx_ptr,
                               ln_part_ptr, pid, rows, row_ok, cols, col_ok, N, M, T, STARTS, WIDTHS, NOISY, RESIDUAL,
                               SUM_ROWS, BLOCK_N)
    else:
        _store_input_grad(dx, dclean, draw, wg_ptr, wn_ptr, dy_ptr, dx_ptr, rows, row_ok, cols, col_ok, M, T, STARTS,
                          WIDTHS, NOISY, RESIDUAL)


@triton.jit
def _store_part_t(ptr, acc_t, ld, c0: tl.constexpr, W: tl.constexpr, M, ds, d_ok):
    """acc_t (DC, W), transposed, into rows [c0, c0+W) (< M), columns ds of a row-major (M, ld) partial."""
    r = c0 + tl.arange(0, W)
    tl.store(ptr + r[None, :] * ld + ds[:, None], acc_t, mask=d_ok[:, None] & (r < M)[None, :])


@triton.jit
def _projection_grad_partial(x_ptr, p_ptr, sel_ptr, e, rows_lo, rows_hi, M, D, ds, d_ok, out_ptr, bias_ptr,
                             ln_w_ptr, ln_b_ptr, ln_stats_ptr, N,
                             K: tl.constexpr, STARTS: tl.constexpr, WIDTHS: tl.constexpr, DC: tl.constexpr,
                             ROWS: tl.constexpr, DTYPE: tl.constexpr, DOT_F32: tl.constexpr,
                             PER_PICK: tl.constexpr, NORM: tl.constexpr):
    """The split's partial gradient of a projection x W[:, ds] + b[ds] from its output gradient p:
    dW = Σ over rows [lo, hi) of x_rowᵀ p_row (M, DC), stored to out (M, D); db = Σ p_row (DC,) to bias
    (x the layer's input: LayerNorm(x) with NORM, see :func:`_input_cols`).

    p is (N, d_h) (V's du), or with PER_PICK da (N, K, d_h) of expert e: p_row = Σ_j [idx_j == e]
    da[row, j] (the token's pick of expert e, if any).

    Summed transposed, dWᵀ = pᵀ x ((DC, width) per chunk): a product 16 rows high stays on mma.sync
    on sm_90 — as x_chunkᵀ p, 64 or 128 rows high, it compiled to a wgmma 16 wide beside the
    kernel's other tensor-core dots, the pattern Triton 3.6–3.7 miscompile (bench/sm90_audit.py)."""
    acc = _zeros_by_chunk(DC, WIDTHS)
    bias = tl.zeros((DC,), dtype=tl.float32)
    for r0 in range(rows_lo, rows_hi, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        row_ok = rows < rows_hi
        mask = row_ok[:, None] & d_ok[None, :]
        if PER_PICK:
            p = tl.zeros((ROWS, DC), dtype=tl.float32)
            for j in tl.static_range(K):
                ij = tl.load(sel_ptr + rows.to(tl.int64) * K + j, mask=row_ok, other=-1)
                pj = tl.load(p_ptr + (rows[:, None].to(tl.int64) * K + j) * D + ds[None, :],
                             mask=mask & (ij == e)[:, None], other=0.0)
                p += pj.to(tl.float32)
            p = p.to(DTYPE)
        else:
            p = tl.load(p_ptr + rows[:, None].to(tl.int64) * D + ds[None, :], mask=mask, other=0.0).to(DTYPE)
        bias += tl.sum(p.to(tl.float32), axis=0)
        updated = ()
        for i in tl.static_range(len(WIDTHS)):
            if WIDTHS[i] > 0:
                xi = _input_cols(x_ptr, rows, row_ok, M, STARTS[i], WIDTHS[i], DTYPE, ln_w_ptr, ln_b_ptr, ln_stats_ptr,
                                 N, NORM)
                updated = updated + (_mma(tl.trans(p), xi, acc[i], DOT_F32),)
        acc = updated
    for i in tl.static_range(len(WIDTHS)):
        if WIDTHS[i] > 0:
            _store_part_t(out_ptr, acc[i], D, STARTS[i], WIDTHS[i], M, ds, d_ok)
    tl.store(bias_ptr + ds, bias, mask=d_ok)


@triton.jit
def _w2_grad_partial(h_ptr, dy_ptr, keep_ptr, rows_lo, rows_hi, M, D, ds, d_ok, out_ptr, b2_ptr, with_bias, drop_p,
                     c0: tl.constexpr, W: tl.constexpr, DROPOUT: tl.constexpr, DC: tl.constexpr, ROWS: tl.constexpr,
                     DTYPE: tl.constexpr, DOT_F32: tl.constexpr):
    """The split's partial dW_2[ds, chunk] = Σ_rows h[row, ds]ᵀ dy'[row, chunk]; db_2[chunk] too when
    ``with_bias``."""
    acc = tl.zeros((DC, W), dtype=tl.float32)
    bias = tl.zeros((W,), dtype=tl.float32)
    for r0 in range(rows_lo, rows_hi, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        row_ok = rows < rows_hi
        hb = tl.load(h_ptr + rows[:, None].to(tl.int64) * D + ds[None, :], mask=row_ok[:, None] & d_ok[None, :],
                     other=0.0).to(DTYPE)
        gy = _load_grad_out(dy_ptr, keep_ptr, rows, row_ok, M, c0, W, drop_p, DROPOUT, DTYPE)
        acc = _mma(tl.trans(hb), gy, acc, DOT_F32)
        bias += tl.sum(gy.to(tl.float32), axis=0)
    cols = c0 + tl.arange(0, W)
    tl.store(out_ptr + ds[:, None] * M + cols[None, :], acc, mask=d_ok[:, None] & (cols < M)[None, :])
    tl.store(b2_ptr + cols, bias, mask=(cols < M) & ((cols * 0 + with_bias) != 0))


@triton.jit
def _gate_weight_grad_partial(x_ptr, dgate_ptr, rows_lo, rows_hi, M, T, out_ptr, ln_w_ptr, ln_b_ptr, ln_stats_ptr, N,
                              c0: tl.constexpr, W: tl.constexpr, ROWS: tl.constexpr, BLOCK_T: tl.constexpr,
                              NOISY: tl.constexpr, NORM: tl.constexpr):
    """The split's partial dW_g[chunk] and dW_noise[chunk] = Σ_rows x[row, chunk]ᵀ (dclean, draw)[row]
    (fp32 IEEE)."""
    cols = tl.arange(0, BLOCK_T)
    col_ok = cols < T
    acc_g = tl.zeros((W, BLOCK_T), dtype=tl.float32)
    acc_n = tl.zeros((W, BLOCK_T), dtype=tl.float32)
    for r0 in range(rows_lo, rows_hi, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        row_ok = rows < rows_hi
        xt = tl.trans(_input_cols(x_ptr, rows, row_ok, M, c0, W, tl.float32, ln_w_ptr, ln_b_ptr, ln_stats_ptr, N, NORM))
        slot = dgate_ptr + rows[:, None].to(tl.int64) * 2 * T + cols[None, :]
        mask = row_ok[:, None] & col_ok[None, :]
        acc_g = tl.dot(xt, tl.load(slot, mask=mask, other=0.0), acc_g, input_precision="ieee")
        if NOISY:
            acc_n = tl.dot(xt, tl.load(slot + T, mask=mask, other=0.0), acc_n, input_precision="ieee")
    r = c0 + tl.arange(0, W)
    omask = (r < M)[:, None] & col_ok[None, :]
    tl.store(out_ptr + r[:, None] * T + cols[None, :], acc_g, mask=omask)
    tl.store(out_ptr + M * T + r[:, None] * T + cols[None, :], acc_n, mask=omask)


@triton.jit
def _norm_grad_partial(ln_part_ptr, rows_lo, rows_hi, M, out_ptr, c0: tl.constexpr, W: tl.constexpr,
                       SUM_ROWS: tl.constexpr):
    """The split's partial LayerNorm weight and bias gradients of m chunk [c0, c0 + W): the token
    groups' sums (ln_part (groups, 2, M), see :func:`_store_norm_group_sums`) of rows [lo, hi) added
    in group order, stored to out[0:M] and out[M:2M]."""
    cols = c0 + tl.arange(0, W)
    col_ok = cols < M
    dw = tl.zeros((W,), dtype=tl.float32)
    db = tl.zeros((W,), dtype=tl.float32)
    for group in range(rows_lo // SUM_ROWS, tl.cdiv(rows_hi, SUM_ROWS)):
        base = ln_part_ptr + group * 2 * M + cols
        dw += tl.load(base, mask=col_ok, other=0.0)
        db += tl.load(base + M, mask=col_ok, other=0.0)
    tl.store(out_ptr + cols, dw, mask=col_ok)
    tl.store(out_ptr + M + cols, db, mask=col_ok)


@triton.jit
def _fused_bwd_weights_kernel(
    x_ptr, dy_ptr, keep_ptr, idx_ptr, da_ptr, du_ptr, h_ptr, dgate_ptr, ln_w_ptr, ln_b_ptr, ln_stats_ptr, ln_part_ptr,
    part_ptr,
    N, M, D, T, drop_p, rows_per_split, part_ld,
    K: tl.constexpr, NOISY: tl.constexpr, DROPOUT: tl.constexpr, NORM: tl.constexpr,
    M0: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr, M3: tl.constexpr, NCH: tl.constexpr, DC: tl.constexpr,
    ROWS: tl.constexpr, SUM_ROWS: tl.constexpr, BLOCK_T: tl.constexpr, DTYPE: tl.constexpr, DOT_F32: tl.constexpr,
):
    """Program (w, s) computes weight tile w's partial gradient over the tokens of split s, ROWS at a time.

    Tiles, in order: (expert e, d_h chunk) of W_e and b_e; d_h chunks of V, b_V; (d_h chunk,
    m chunk) of W_2 (b_2 with the first d_h chunk); the m chunks of W_g and W_noise; with NORM
    the m chunks of the LayerNorm's weight and bias (the token kernel's group sums added up). The
    partial row of split s is laid out as the flat gradient: [W_g, W_noise, W_1, b_1, V, b_V, W_2,
    b_2] (+ [ln_w, ln_b] with NORM); the projections' x is LayerNorm(x) with NORM."""
    WIDTHS: tl.constexpr = (M0, M1, M2, M3)
    STARTS: tl.constexpr = (0, M0, M0 + M1, M0 + M1 + M2)
    w = tl.program_id(0)
    split = tl.program_id(1)
    lo = split * rows_per_split
    hi = tl.minimum(lo + rows_per_split, N)
    out = part_ptr + split.to(tl.int64) * part_ld
    o_w1 = 2 * M * T
    o_b1 = o_w1 + T * M * D
    o_v = o_b1 + T * D
    o_bv = o_v + M * D
    o_w2 = o_bv + D
    o_b2 = o_w2 + D * M
    nd = tl.cdiv(D, DC)
    ds = (w % nd) * DC + tl.arange(0, DC)
    d_ok = ds < D
    if w < T * nd:  # W_e[:, chunk], b_e[chunk]
        e = w // nd
        _projection_grad_partial(x_ptr, da_ptr, idx_ptr, e, lo, hi, M, D, ds, d_ok, out + o_w1 + e * M * D,
                                 out + o_b1 + e * D, ln_w_ptr, ln_b_ptr, ln_stats_ptr, N, K, STARTS, WIDTHS, DC, ROWS,
                                 DTYPE, DOT_F32, True, NORM)
    elif w < (T + 1) * nd:  # V[:, chunk], b_V[chunk]
        _projection_grad_partial(x_ptr, du_ptr, idx_ptr, 0, lo, hi, M, D, ds, d_ok, out + o_v, out + o_bv,
                                 ln_w_ptr, ln_b_ptr, ln_stats_ptr, N, K, STARTS, WIDTHS, DC, ROWS, DTYPE, DOT_F32,
                                 False, NORM)
    elif w < (T + 1 + NCH) * nd:  # W_2[chunk, m chunk c]; b_2[m chunk c] with the first d_h chunk
        c = (w - (T + 1) * nd) // nd
        first = ((w % nd) == 0).to(tl.int32)
        for i in tl.static_range(len(WIDTHS)):
            if WIDTHS[i] > 0:
                if c == i:
                    _w2_grad_partial(h_ptr, dy_ptr, keep_ptr, lo, hi, M, D, ds, d_ok, out + o_w2, out + o_b2, first,
                                     drop_p, STARTS[i], WIDTHS[i], DROPOUT, DC, ROWS, DTYPE, DOT_F32)
    elif w < (T + 1 + NCH) * nd + NCH:  # W_g, W_noise: m chunk c
        c = w - (T + 1 + NCH) * nd
        for i in tl.static_range(len(WIDTHS)):
            if WIDTHS[i] > 0:
                if c == i:
                    _gate_weight_grad_partial(x_ptr, dgate_ptr, lo, hi, M, T, out, ln_w_ptr, ln_b_ptr, ln_stats_ptr,
                                              N, STARTS[i], WIDTHS[i], ROWS, BLOCK_T, NOISY, NORM)
    elif NORM:  # the LayerNorm's weight and bias: m chunk c
        c = w - (T + 1 + NCH) * nd - NCH
        for i in tl.static_range(len(WIDTHS)):
            if WIDTHS[i] > 0:
                if c == i:
                    _norm_grad_partial(ln_part_ptr, lo, hi, M, out + o_b2 + M, STARTS[i], WIDTHS[i], SUM_ROWS)
