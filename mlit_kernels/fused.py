"""The whole MoE layer for few experts as five Triton kernels: two forward, three backward.

Per token n, with gates g (zero off the token's top k) and shared V, W_2 (SPEC §5):

    a_e = x W_e + b_e   (every expert a tile routes to; t ≤ 16)     u = x V + b_V
    c   = Σ_e g_e silu(a_e)          h = c ⊙ u          y = dropout(h W_2 + b_2)

Forward
  1. ``_fused_fwd_kernel``, one program per BLOCK_N-token tile: gate logits (fp32), noise (Philox
     from a device seed) and noise scale, top-k (:mod:`mlit_kernels.gating`'s rule), Softmax_k,
     P(x); the tile's partial sums of G (importance) and of P(x) or the routing counts (load);
     then, looping over d_h chunks: u, every routed expert's a_e, c, h, and y accumulated in
     registers over the chunks; b_2 and dropout in the epilogue. Writes y, the top-k indices
     (N, k) int32, the partial sums and (with dropout) the keep mask (N, m) uint8.
  2. ``_fused_aux_kernel``, one program: sums the partials in tile order and writes importance,
     load and the auxiliary loss (no chain of torch ops over two (t,) vectors).

Backward
  3. ``_fused_bwd_tokens_kernel``, per token tile: recomputes the gate (with the forward's stored
     selection) and u, a_e, c; dh = dy W_2ᵀ; writes dx = du Vᵀ + Σ_e da_e W_eᵀ + the gate's part,
     and the fp16/bf16 intermediates of the weight gradients: da (N, k, d_h) per (token, pick),
     du = dh ⊙ c, h = c ⊙ u (N, d_h), and dclean / draw (N, 2, t) fp32.
  4. ``_fused_bwd_weights_kernel``: one program per (weight tile, N split): W_e[:, chunk],
     V[:, chunk], W_2[chunk, :] (+ their biases) and W_g / W_noise, each summing its split's
     tokens in registers; writes per-split partials.
  5. ``_reduce_kernel``: sums the splits in a fixed order into the gradients (parameter dtype).

Nothing uses float atomics: forward and backward are bit-for-bit repeatable. Widths m are covered
by up to four power-of-two chunks (:func:`mlit_kernels.tiling.width_chunks`: 144 = 128 + 16, no
padding), d_h by a loop of DC-wide chunks (:func:`mlit_kernels.tiling.hidden_chunk`). x, the
weights and dy are read in the dtype they are stored in and converted in registers (fp32 masters
under autocast need no cast kernels). Expert products run on the activation dtype (fp16/bf16
tensor cores, fp32 accumulation; fp32 activations use IEEE fp32); the gate is fp32 throughout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .gating import (NOISE_GIVEN, NOISE_NONE, NOISE_PHILOX, cv_grad, cv_value, gate_from_selection, gate_grads,
                     gate_probs, gate_tile, load_probability, select_top_k, selection_key, token_tile)
from .tiling import hidden_chunk, interpreting, width_chunks

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
_DROPOUT_STREAM = tl.constexpr(0x5EED)  # Philox key offset of the dropout draws (the gate noise uses the seed itself)


@dataclass(frozen=True)
class Config:
    """Launch configuration of the per-token kernels: BLOCK_N tokens per program, warps."""

    block_n: int
    num_warps: int


# Candidates for CUDA autotuning (keyed by m, d_h, t, k, dtype); the first is the default.
CONFIGS = (Config(32, 8), Config(64, 8), Config(32, 4), Config(64, 4), Config(16, 4))
# The weight-gradient kernel splits the tokens into at most MAX_SPLITS ranges of at least
# MIN_SPLIT_ROWS: enough programs to fill a GPU, partial buffers of MAX_SPLITS × the weights.
MAX_SPLITS = 32
MIN_SPLIT_ROWS = 256


# ----------------------------------------------------------------------------------------------
# device helpers


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
def _rows_times(x0, x1, x2, x3, w_ptr, ld, ds, d_ok, M, M0: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr,
                M3: tl.constexpr, BLOCK_N: tl.constexpr, DC: tl.constexpr, DTYPE: tl.constexpr,
                DOT_F32: tl.constexpr):
    """Σ_i x_i @ W[chunk_i, ds] (fp32, (BLOCK_N, DC)): the row chunks x_i times the matching rows
    of W (M, ld) row-major, columns ds."""
    acc = tl.zeros((BLOCK_N, DC), dtype=tl.float32)
    r = tl.arange(0, M0)
    acc = _mma(x0, tl.load(w_ptr + r[:, None] * ld + ds[None, :], mask=(r < M)[:, None] & d_ok[None, :],
                           other=0.0).to(DTYPE), acc, DOT_F32)
    if M1 > 0:
        r = M0 + tl.arange(0, M1)
        acc = _mma(x1, tl.load(w_ptr + r[:, None] * ld + ds[None, :], mask=(r < M)[:, None] & d_ok[None, :],
                               other=0.0).to(DTYPE), acc, DOT_F32)
    if M2 > 0:
        r = M0 + M1 + tl.arange(0, M2)
        acc = _mma(x2, tl.load(w_ptr + r[:, None] * ld + ds[None, :], mask=(r < M)[:, None] & d_ok[None, :],
                               other=0.0).to(DTYPE), acc, DOT_F32)
    if M3 > 0:
        r = M0 + M1 + M2 + tl.arange(0, M3)
        acc = _mma(x3, tl.load(w_ptr + r[:, None] * ld + ds[None, :], mask=(r < M)[:, None] & d_ok[None, :],
                               other=0.0).to(DTYPE), acc, DOT_F32)
    return acc


@triton.jit
def _project(x0, x1, x2, x3, w_ptr, b_ptr, ds, d_ok, M, D, M0: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr,
             M3: tl.constexpr, BLOCK_N: tl.constexpr, DC: tl.constexpr, DTYPE: tl.constexpr, DOT_F32: tl.constexpr):
    """x W[:, ds] + b[ds] (fp32, (BLOCK_N, DC)) from the row chunks of x; W (M, D) row-major."""
    acc = _rows_times(x0, x1, x2, x3, w_ptr, D, ds, d_ok, M, M0, M1, M2, M3, BLOCK_N, DC, DTYPE, DOT_F32)
    return acc + tl.load(b_ptr + ds, mask=d_ok, other=0.0).to(tl.float32)[None, :]


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
def _gate_dx(dx, dclean, draw, wg_ptr, wn_ptr, M, T, cols, col_ok, c0: tl.constexpr, W: tl.constexpr,
             NOISY: tl.constexpr):
    """dx[:, chunk] += dclean W_g[chunk]ᵀ (+ draw W_noise[chunk]ᵀ), fp32 IEEE."""
    r = c0 + tl.arange(0, W)
    mask = col_ok[:, None] & (r < M)[None, :]
    wg_t = tl.load(wg_ptr + r[None, :] * T + cols[:, None], mask=mask, other=0.0).to(tl.float32)
    dx = tl.dot(dclean, wg_t, dx, input_precision="ieee")
    if NOISY:
        wn_t = tl.load(wn_ptr + r[None, :] * T + cols[:, None], mask=mask, other=0.0).to(tl.float32)
        dx = tl.dot(draw, wn_t, dx, input_precision="ieee")
    return dx


@triton.jit
def _store_rows(ptr, val, rows, row_ok, M, c0: tl.constexpr, W: tl.constexpr):
    cols = c0 + tl.arange(0, W)
    tl.store(ptr + rows[:, None].to(tl.int64) * M + cols[None, :], val.to(ptr.dtype.element_ty),
             mask=row_ok[:, None] & (cols < M)[None, :])


# Chunk-wise forms: a width M is held as up to four register tiles of widths M0 ≥ M1 ≥ M2 ≥ M3
# (see mlit_kernels.tiling.width_chunks); each helper applies one operation to every present chunk.


@triton.jit
def _times_rows_t_chunks(p, a0, a1, a2, a3, w_ptr, ld, ds, d_ok, M, M0: tl.constexpr, M1: tl.constexpr,
                         M2: tl.constexpr, M3: tl.constexpr, DTYPE: tl.constexpr, DOT_F32: tl.constexpr):
    """a_i + p @ W[chunk_i, ds]ᵀ for every chunk: p (BLOCK_N, DC), W (M, ld) row-major."""
    a0 = _times_rows_t(p, a0, w_ptr, ld, ds, d_ok, M, 0, M0, DTYPE, DOT_F32)
    if M1 > 0:
        a1 = _times_rows_t(p, a1, w_ptr, ld, ds, d_ok, M, M0, M1, DTYPE, DOT_F32)
    if M2 > 0:
        a2 = _times_rows_t(p, a2, w_ptr, ld, ds, d_ok, M, M0 + M1, M2, DTYPE, DOT_F32)
    if M3 > 0:
        a3 = _times_rows_t(p, a3, w_ptr, ld, ds, d_ok, M, M0 + M1 + M2, M3, DTYPE, DOT_F32)
    return a0, a1, a2, a3


@triton.jit
def _times_cols_chunks(p, a0, a1, a2, a3, w_ptr, ds, d_ok, M, M0: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr,
                       M3: tl.constexpr, DTYPE: tl.constexpr, DOT_F32: tl.constexpr):
    """a_i + p @ W[ds, chunk_i] for every chunk: p (BLOCK_N, DC), W (D, M) row-major."""
    a0 = _times_cols(p, a0, w_ptr, M, ds, d_ok, M, 0, M0, DTYPE, DOT_F32)
    if M1 > 0:
        a1 = _times_cols(p, a1, w_ptr, M, ds, d_ok, M, M0, M1, DTYPE, DOT_F32)
    if M2 > 0:
        a2 = _times_cols(p, a2, w_ptr, M, ds, d_ok, M, M0 + M1, M2, DTYPE, DOT_F32)
    if M3 > 0:
        a3 = _times_cols(p, a3, w_ptr, M, ds, d_ok, M, M0 + M1 + M2, M3, DTYPE, DOT_F32)
    return a0, a1, a2, a3


@triton.jit
def _chunks_times_cols_t(c0, c1, c2, c3, w_ptr, ds, d_ok, M, M0: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr,
                         M3: tl.constexpr, BLOCK_N: tl.constexpr, DC: tl.constexpr, DTYPE: tl.constexpr,
                         DOT_F32: tl.constexpr):
    """Σ_i c_i @ W[ds, chunk_i]ᵀ (fp32, (BLOCK_N, DC)): the chunks of a row block times W (D, M)ᵀ."""
    acc = tl.zeros((BLOCK_N, DC), dtype=tl.float32)
    acc = _times_cols_t(c0, acc, w_ptr, M, ds, d_ok, M, 0, M0, DTYPE, DOT_F32)
    if M1 > 0:
        acc = _times_cols_t(c1, acc, w_ptr, M, ds, d_ok, M, M0, M1, DTYPE, DOT_F32)
    if M2 > 0:
        acc = _times_cols_t(c2, acc, w_ptr, M, ds, d_ok, M, M0 + M1, M2, DTYPE, DOT_F32)
    if M3 > 0:
        acc = _times_cols_t(c3, acc, w_ptr, M, ds, d_ok, M, M0 + M1 + M2, M3, DTYPE, DOT_F32)
    return acc


@triton.jit
def _store_out_chunks(y0, y1, y2, y3, b2_ptr, y_ptr, keep_ptr, seed, rows, row_ok, M, drop_p, M0: tl.constexpr,
                      M1: tl.constexpr, M2: tl.constexpr, M3: tl.constexpr, DROPOUT: tl.constexpr):
    _store_out(y0, b2_ptr, y_ptr, keep_ptr, seed, rows, row_ok, M, 0, M0, drop_p, DROPOUT)
    if M1 > 0:
        _store_out(y1, b2_ptr, y_ptr, keep_ptr, seed, rows, row_ok, M, M0, M1, drop_p, DROPOUT)
    if M2 > 0:
        _store_out(y2, b2_ptr, y_ptr, keep_ptr, seed, rows, row_ok, M, M0 + M1, M2, drop_p, DROPOUT)
    if M3 > 0:
        _store_out(y3, b2_ptr, y_ptr, keep_ptr, seed, rows, row_ok, M, M0 + M1 + M2, M3, drop_p, DROPOUT)


@triton.jit
def _store_dx_chunks(dx0, dx1, dx2, dx3, dclean, draw, wg_ptr, wn_ptr, dx_ptr, rows, row_ok, cols, col_ok, M, T,
                     M0: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr, M3: tl.constexpr, NOISY: tl.constexpr):
    """dx + the gate's part (dclean W_gᵀ + draw W_noiseᵀ), stored in dx's dtype."""
    _store_rows(dx_ptr, _gate_dx(dx0, dclean, draw, wg_ptr, wn_ptr, M, T, cols, col_ok, 0, M0, NOISY), rows, row_ok,
                M, 0, M0)
    if M1 > 0:
        _store_rows(dx_ptr, _gate_dx(dx1, dclean, draw, wg_ptr, wn_ptr, M, T, cols, col_ok, M0, M1, NOISY), rows,
                    row_ok, M, M0, M1)
    if M2 > 0:
        _store_rows(dx_ptr, _gate_dx(dx2, dclean, draw, wg_ptr, wn_ptr, M, T, cols, col_ok, M0 + M1, M2, NOISY), rows,
                    row_ok, M, M0 + M1, M2)
    if M3 > 0:
        _store_rows(dx_ptr, _gate_dx(dx3, dclean, draw, wg_ptr, wn_ptr, M, T, cols, col_ok, M0 + M1 + M2, M3, NOISY),
                    rows, row_ok, M, M0 + M1 + M2, M3)



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
def _store_out(y, b2_ptr, y_ptr, keep_ptr, seed, rows, row_ok, M, c0: tl.constexpr, W: tl.constexpr, drop_p,
               DROPOUT: tl.constexpr):
    """y + b_2 for a column chunk, dropout (keep mask stored as uint8), stored in y's dtype."""
    cols = c0 + tl.arange(0, W)
    col_ok = cols < M
    mask = row_ok[:, None] & col_ok[None, :]
    y += tl.load(b2_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    offs = rows[:, None].to(tl.int64) * M + cols[None, :]
    if DROPOUT:
        keep = _keep_mask(seed, rows, M, c0, W, drop_p)
        y = tl.where(keep, y / (1.0 - drop_p), 0.0)
        tl.store(keep_ptr + offs, keep.to(tl.uint8), mask=mask)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


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


@triton.jit
def _row_chunks(ptr, rows, row_ok, M, M0: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr, M3: tl.constexpr,
                DTYPE: tl.constexpr):
    """The width chunks of rows ``rows`` of a row-major (N, M) matrix, in DTYPE (an absent chunk
    repeats the first: a placeholder never used)."""
    c0 = _load_cols(ptr, rows, row_ok, M, 0, M0, M, DTYPE)
    c1 = c0
    c2 = c0
    c3 = c0
    if M1 > 0:
        c1 = _load_cols(ptr, rows, row_ok, M, M0, M1, M, DTYPE)
    if M2 > 0:
        c2 = _load_cols(ptr, rows, row_ok, M, M0 + M1, M2, M, DTYPE)
    if M3 > 0:
        c3 = _load_cols(ptr, rows, row_ok, M, M0 + M1 + M2, M3, M, DTYPE)
    return c0, c1, c2, c3


@triton.jit
def _grad_out_chunks(dy_ptr, keep_ptr, rows, row_ok, M, drop_p, M0: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr,
                     M3: tl.constexpr, DROPOUT: tl.constexpr, DTYPE: tl.constexpr):
    """:func:`_load_grad_out` for every width chunk (placeholders as :func:`_row_chunks`)."""
    c0 = _load_grad_out(dy_ptr, keep_ptr, rows, row_ok, M, 0, M0, drop_p, DROPOUT, DTYPE)
    c1 = c0
    c2 = c0
    c3 = c0
    if M1 > 0:
        c1 = _load_grad_out(dy_ptr, keep_ptr, rows, row_ok, M, M0, M1, drop_p, DROPOUT, DTYPE)
    if M2 > 0:
        c2 = _load_grad_out(dy_ptr, keep_ptr, rows, row_ok, M, M0 + M1, M2, drop_p, DROPOUT, DTYPE)
    if M3 > 0:
        c3 = _load_grad_out(dy_ptr, keep_ptr, rows, row_ok, M, M0 + M1 + M2, M3, drop_p, DROPOUT, DTYPE)
    return c0, c1, c2, c3


@triton.jit
def _zero_chunks(R: tl.constexpr, M0: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr, M3: tl.constexpr,
                 TRANSPOSED: tl.constexpr = False):
    """fp32 accumulators (R, M_i) for the width chunks, or (M_i, R) when TRANSPOSED; 16-wide
    placeholders for absent chunks."""
    if TRANSPOSED:
        a0 = tl.zeros((M0, R), dtype=tl.float32)
        a1 = tl.zeros((16, R), dtype=tl.float32)
    else:
        a0 = tl.zeros((R, M0), dtype=tl.float32)
        a1 = tl.zeros((R, 16), dtype=tl.float32)
    a2 = a1
    a3 = a1
    if M1 > 0:
        a1 = tl.zeros((M1, R) if TRANSPOSED else (R, M1), dtype=tl.float32)
    if M2 > 0:
        a2 = tl.zeros((M2, R) if TRANSPOSED else (R, M2), dtype=tl.float32)
    if M3 > 0:
        a3 = tl.zeros((M3, R) if TRANSPOSED else (R, M3), dtype=tl.float32)
    return a0, a1, a2, a3


# ----------------------------------------------------------------------------------------------
# forward


@triton.jit
def _fused_fwd_kernel(
    x_ptr, wg_ptr, wn_ptr, w1_ptr, b1_ptr, v_ptr, bv_ptr, w2_ptr, b2_ptr, noise_ptr, seed_ptr,
    y_ptr, idx_ptr, part_ptr, keep_ptr,
    N, M, D, T, noise_eps, drop_p,
    K: tl.constexpr, NOISY: tl.constexpr, NOISE_MODE: tl.constexpr, LOAD_P: tl.constexpr, DROPOUT: tl.constexpr,
    M0: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr, M3: tl.constexpr, DC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, DTYPE: tl.constexpr, DOT_F32: tl.constexpr,
):
    pid, rows, row_ok, cols, col_ok, valid, seed = token_tile(seed_ptr, N, T, NOISE_MODE == 2 or DROPOUT, BLOCK_N,
                                                               BLOCK_T)

    # gate
    clean, raw, std, eps, h = gate_tile(x_ptr, wg_ptr, wn_ptr, noise_ptr, seed, rows, row_ok, cols, col_ok, M, T,
                                        noise_eps, NOISY, NOISE_MODE, BLOCK_N, BLOCK_T)
    key, taken = selection_key(h, col_ok)
    taken, kth_col = select_top_k(key, taken, cols, idx_ptr, rows, row_ok, K, BLOCK_T)
    sel, g, kth, nxt, nxt_col = gate_probs(h, key, taken, col_ok, kth_col, cols, BLOCK_T)
    tl.store(part_ptr + pid * 2 * T + cols, tl.sum(tl.where(valid, g, 0.0), axis=0), mask=col_ok)
    if LOAD_P:
        load = tl.where(valid, load_probability(clean, h, std, kth, nxt), 0.0)
    else:
        load = tl.where(valid & (sel != 0), 1.0, 0.0)
    tl.store(part_ptr + pid * 2 * T + T + cols, tl.sum(load, axis=0), mask=col_ok)

    # experts
    x0, x1, x2, x3 = _row_chunks(x_ptr, rows, row_ok, M, M0, M1, M2, M3, DTYPE)
    y0, y1, y2, y3 = _zero_chunks(BLOCK_N, M0, M1, M2, M3)
    routed = tl.sum(tl.where(row_ok[:, None], sel, 0), axis=0)  # (BLOCK_T,) tokens of the tile per expert
    for d0 in range(0, D, DC):
        ds = d0 + tl.arange(0, DC)
        d_ok = ds < D
        u = _project(x0, x1, x2, x3, v_ptr, bv_ptr, ds, d_ok, M, D, M0, M1, M2, M3, BLOCK_N, DC, DTYPE, DOT_F32)
        c = tl.zeros((BLOCK_N, DC), dtype=tl.float32)
        for e in range(T):
            if tl.sum(tl.where(cols == e, routed, 0), axis=0) > 0:  # an expert no token of the tile picked is skipped
                a = _project(x0, x1, x2, x3, w1_ptr + e * M * D, b1_ptr + e * D, ds, d_ok, M, D, M0, M1, M2, M3,
                             BLOCK_N, DC, DTYPE, DOT_F32)
                c += _expert_column(g, cols, e)[:, None] * (a * tl.sigmoid(a))
        y0, y1, y2, y3 = _times_cols_chunks((c * u).to(DTYPE), y0, y1, y2, y3, w2_ptr, ds, d_ok, M, M0, M1, M2, M3,
                                            DTYPE, DOT_F32)
    _store_out_chunks(y0, y1, y2, y3, b2_ptr, y_ptr, keep_ptr, seed, rows, row_ok, M, drop_p, M0, M1, M2, M3, DROPOUT)

@triton.jit
def _fused_aux_kernel(part_ptr, stats_ptr, aux_ptr, tiles, T, w_importance, w_load,
                      SQUARED: tl.constexpr, UNBIASED: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_T: tl.constexpr):
    """importance, load (2, T) = the tiles' partial sums in tile order; aux = w_i CV(imp) + w_l CV(load)."""
    cols = tl.arange(0, BLOCK_T)
    col_ok = cols < T
    imp = tl.zeros((BLOCK_T,), dtype=tl.float32)
    load = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for p0 in range(0, tiles, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        mask = (ps < tiles)[:, None] & col_ok[None, :]
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
    idx_ptr, stats_ptr, keep_ptr,
    dx_ptr, da_ptr, du_ptr, h_ptr, dgate_ptr,
    N, M, D, T, noise_eps, drop_p, w_importance, w_load,
    K: tl.constexpr, NOISY: tl.constexpr, NOISE_MODE: tl.constexpr, LOAD_P: tl.constexpr, DROPOUT: tl.constexpr,
    SQUARED: tl.constexpr, UNBIASED: tl.constexpr,
    M0: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr, M3: tl.constexpr, DC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, DTYPE: tl.constexpr, DOT_F32: tl.constexpr,
):
    pid, rows, row_ok, cols, col_ok, valid, seed = token_tile(seed_ptr, N, T, NOISE_MODE == 2 or DROPOUT, BLOCK_N,
                                                               BLOCK_T)

    # the gates, recomputed with the forward's selection (recomputed once more after the experts
    # for the gate's own gradient: cheaper than keeping its tiles live through the d_h loop)
    _, _, _, _, _, sel, g, _, _, _, _ = gate_from_selection(x_ptr, wg_ptr, wn_ptr, noise_ptr, seed, idx_ptr, rows,
                                                             row_ok, cols, col_ok, M, T, noise_eps, K, NOISY,
                                                             NOISE_MODE, BLOCK_N, BLOCK_T)
    d_aux = tl.load(daux_ptr)
    dg = tl.where(valid, (w_importance * d_aux) * cv_grad(stats_ptr, cols, col_ok, T, SQUARED, UNBIASED)[None, :], 0.0)

    # experts
    x0, x1, x2, x3 = _row_chunks(x_ptr, rows, row_ok, M, M0, M1, M2, M3, DTYPE)
    g0, g1, g2, g3 = _grad_out_chunks(dy_ptr, keep_ptr, rows, row_ok, M, drop_p, M0, M1, M2, M3, DROPOUT, DTYPE)
    dx0, dx1, dx2, dx3 = _zero_chunks(BLOCK_N, M0, M1, M2, M3)
    routed = tl.sum(tl.where(row_ok[:, None], sel, 0), axis=0)
    for d0 in range(0, D, DC):
        ds = d0 + tl.arange(0, DC)
        d_ok = ds < D
        tile_mask = row_ok[:, None] & d_ok[None, :]
        tile = rows[:, None].to(tl.int64) * D + ds[None, :]
        # dh = dy W_2ᵀ (the product of the chunks of dy with the transposed columns of W_2)
        dh = _chunks_times_cols_t(g0, g1, g2, g3, w2_ptr, ds, d_ok, M, M0, M1, M2, M3, BLOCK_N, DC, DTYPE, DOT_F32)
        u = _project(x0, x1, x2, x3, v_ptr, bv_ptr, ds, d_ok, M, D, M0, M1, M2, M3, BLOCK_N, DC, DTYPE, DOT_F32)
        dcu = dh * u  # dL/dc
        c = tl.zeros((BLOCK_N, DC), dtype=tl.float32)
        for e in range(T):
            if tl.sum(tl.where(cols == e, routed, 0), axis=0) > 0:
                a = _project(x0, x1, x2, x3, w1_ptr + e * M * D, b1_ptr + e * D, ds, d_ok, M, D, M0, M1, M2, M3,
                             BLOCK_N, DC, DTYPE, DOT_F32)
                sig = tl.sigmoid(a)
                act = a * sig
                ge = _expert_column(g, cols, e)
                c += ge[:, None] * act
                dg += tl.where(cols[None, :] == e, tl.sum(tl.where(d_ok[None, :], dcu * act, 0.0), axis=1)[:, None],
                               0.0)
                da = (ge[:, None] * dcu * (sig * (1.0 + a * (1.0 - sig)))).to(DTYPE)
                dx0, dx1, dx2, dx3 = _times_rows_t_chunks(da, dx0, dx1, dx2, dx3, w1_ptr + e * M * D, D, ds, d_ok, M,
                                                          M0, M1, M2, M3, DTYPE, DOT_F32)
                # the pair slot j of tokens that picked e: da (N, K, d_h) for the weight gradients
                for j in tl.static_range(K):
                    ij = tl.load(idx_ptr + rows.to(tl.int64) * K + j, mask=row_ok, other=-1)
                    slot = (rows[:, None].to(tl.int64) * K + j) * D + ds[None, :]
                    tl.store(da_ptr + slot, da, mask=tile_mask & (ij == e)[:, None])
        du = dh * c
        tl.store(h_ptr + tile, (c * u).to(h_ptr.dtype.element_ty), mask=tile_mask)
        tl.store(du_ptr + tile, du.to(du_ptr.dtype.element_ty), mask=tile_mask)
        dx0, dx1, dx2, dx3 = _times_rows_t_chunks(du.to(DTYPE), dx0, dx1, dx2, dx3, v_ptr, D, ds, d_ok, M, M0, M1, M2,
                                                  M3, DTYPE, DOT_F32)
    # the gate's part: through Softmax_k, the noise scale and P(x)
    clean, raw, std, eps, h, sel, g, kth, kth_col, nxt, nxt_col = gate_from_selection(
        x_ptr, wg_ptr, wn_ptr, noise_ptr, seed, idx_ptr, rows, row_ok, cols, col_ok, M, T, noise_eps, K, NOISY,
        NOISE_MODE, BLOCK_N, BLOCK_T)
    d_load = (w_load * d_aux) * cv_grad(stats_ptr + T, cols, col_ok, T, SQUARED, UNBIASED)
    dclean, draw = gate_grads(dg, h, clean, std, eps, raw, sel, g, kth, kth_col, nxt, nxt_col, d_load, valid,
                              cols, NOISY, LOAD_P)
    gslot = rows[:, None].to(tl.int64) * 2 * T + cols[None, :]
    tl.store(dgate_ptr + gslot, dclean, mask=valid)
    tl.store(dgate_ptr + gslot + T, draw, mask=valid)
    _store_dx_chunks(dx0, dx1, dx2, dx3, dclean, draw, wg_ptr, wn_ptr, dx_ptr, rows, row_ok, cols, col_ok, M, T, M0, M1,
                     M2, M3, NOISY)


@triton.jit
def _acc_xt(acc, x_ptr, rows, row_ok, M, c0: tl.constexpr, W: tl.constexpr, p, DTYPE: tl.constexpr,
            DOT_F32: tl.constexpr):
    """acc (W, ·) + x[rows, chunk]ᵀ @ p."""
    xc = _load_cols(x_ptr, rows, row_ok, M, c0, W, M, DTYPE)
    return _mma(tl.trans(xc), p, acc, DOT_F32)


@triton.jit
def _store_part(ptr, acc, ld, c0: tl.constexpr, W: tl.constexpr, M, ds, d_ok):
    """acc (W, DC) into rows [c0, c0+W) (< M), columns ds of a row-major (M, ld) partial."""
    r = c0 + tl.arange(0, W)
    tl.store(ptr + r[:, None] * ld + ds[None, :], acc, mask=(r < M)[:, None] & d_ok[None, :])


@triton.jit
def _x_t_times(x_ptr, p_ptr, p_ld, p_col0, sel_ptr, e, rows_lo, rows_hi, M, ds, d_ok, out_ptr, out_ld, bias_ptr,
               K: tl.constexpr, M0: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr, M3: tl.constexpr,
               DC: tl.constexpr, BLOCK_N: tl.constexpr, DTYPE: tl.constexpr, DOT_F32: tl.constexpr,
               PER_PICK: tl.constexpr):
    """Σ over rows [lo, hi) of x_rowᵀ p_row (M, DC) and Σ p_row (DC,), stored to out / bias.

    p is (N, ·) with row stride p_ld and columns p_col0 + ds; with PER_PICK, p is da (N, K, d_h)
    and p_row = Σ_j [idx_j == e] da[row, j] (the token's pick of expert e, if any)."""
    a0, a1, a2, a3 = _zero_chunks(DC, M0, M1, M2, M3, True)
    bias = tl.zeros((DC,), dtype=tl.float32)
    for r0 in range(rows_lo, rows_hi, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        row_ok = rows < rows_hi
        mask = row_ok[:, None] & d_ok[None, :]
        if PER_PICK:
            p = tl.zeros((BLOCK_N, DC), dtype=tl.float32)
            for j in tl.static_range(K):
                ij = tl.load(sel_ptr + rows.to(tl.int64) * K + j, mask=row_ok, other=-1)
                pj = tl.load(p_ptr + (rows[:, None].to(tl.int64) * K + j) * p_ld + ds[None, :],
                             mask=mask & (ij == e)[:, None], other=0.0)
                p += pj.to(tl.float32)
            p = p.to(DTYPE)
        else:
            p = tl.load(p_ptr + rows[:, None].to(tl.int64) * p_ld + p_col0 + ds[None, :], mask=mask,
                        other=0.0).to(DTYPE)
        bias += tl.sum(p.to(tl.float32), axis=0)
        a0 = _acc_xt(a0, x_ptr, rows, row_ok, M, 0, M0, p, DTYPE, DOT_F32)
        if M1 > 0:
            a1 = _acc_xt(a1, x_ptr, rows, row_ok, M, M0, M1, p, DTYPE, DOT_F32)
        if M2 > 0:
            a2 = _acc_xt(a2, x_ptr, rows, row_ok, M, M0 + M1, M2, p, DTYPE, DOT_F32)
        if M3 > 0:
            a3 = _acc_xt(a3, x_ptr, rows, row_ok, M, M0 + M1 + M2, M3, p, DTYPE, DOT_F32)
    _store_part(out_ptr, a0, out_ld, 0, M0, M, ds, d_ok)
    if M1 > 0:
        _store_part(out_ptr, a1, out_ld, M0, M1, M, ds, d_ok)
    if M2 > 0:
        _store_part(out_ptr, a2, out_ld, M0 + M1, M2, M, ds, d_ok)
    if M3 > 0:
        _store_part(out_ptr, a3, out_ld, M0 + M1 + M2, M3, M, ds, d_ok)
    tl.store(bias_ptr + ds, bias, mask=d_ok)


@triton.jit
def _h_t_times_dy(h_ptr, dy_ptr, keep_ptr, rows_lo, rows_hi, M, D, ds, d_ok, out_ptr, b2_ptr, with_bias, drop_p,
                  c0: tl.constexpr, W: tl.constexpr, DROPOUT: tl.constexpr, DC: tl.constexpr, BLOCK_N: tl.constexpr,
                  DTYPE: tl.constexpr, DOT_F32: tl.constexpr):
    """dW_2[ds, chunk] partial = Σ_rows h[row, ds]ᵀ dy'[row, chunk]; db_2[chunk] too when ``with_bias``."""
    acc = tl.zeros((DC, W), dtype=tl.float32)
    bias = tl.zeros((W,), dtype=tl.float32)
    for r0 in range(rows_lo, rows_hi, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
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
def _x_t_times_gate(x_ptr, dgate_ptr, rows_lo, rows_hi, M, T, out_ptr, c0: tl.constexpr, W: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, NOISY: tl.constexpr):
    """dW_g[chunk] and dW_noise[chunk] partials = Σ_rows x[row, chunk]ᵀ (dclean, draw)[row] (fp32 IEEE)."""
    cols = tl.arange(0, BLOCK_T)
    col_ok = cols < T
    acc_g = tl.zeros((W, BLOCK_T), dtype=tl.float32)
    acc_n = tl.zeros((W, BLOCK_T), dtype=tl.float32)
    for r0 in range(rows_lo, rows_hi, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        row_ok = rows < rows_hi
        xt = tl.trans(_load_cols(x_ptr, rows, row_ok, M, c0, W, M, tl.float32))
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
def _fused_bwd_weights_kernel(
    x_ptr, dy_ptr, keep_ptr, idx_ptr, da_ptr, du_ptr, h_ptr, dgate_ptr, part_ptr,
    N, M, D, T, drop_p, rows_per_split, part_ld,
    K: tl.constexpr, NOISY: tl.constexpr, DROPOUT: tl.constexpr,
    M0: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr, M3: tl.constexpr, NCH: tl.constexpr, DC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, DTYPE: tl.constexpr, DOT_F32: tl.constexpr,
):
    """Program (w, s) computes weight tile w's partial gradient over the tokens of split s.

    Tiles, in order: (expert e, d_h chunk) of W_e and b_e; d_h chunks of V, b_V; (d_h chunk,
    m chunk) of W_2 (b_2 with the first d_h chunk); the m chunks of W_g and W_noise. The partial
    row of split s is laid out as the flat gradient: [W_g, W_noise, W_1, b_1, V, b_V, W_2, b_2]."""
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
        _x_t_times(x_ptr, da_ptr, D, 0, idx_ptr, e, lo, hi, M, ds, d_ok, out + o_w1 + e * M * D, D,
                   out + o_b1 + e * D, K, M0, M1, M2, M3, DC, BLOCK_N, DTYPE, DOT_F32, True)
    elif w < (T + 1) * nd:  # V[:, chunk], b_V[chunk]
        _x_t_times(x_ptr, du_ptr, D, 0, idx_ptr, 0, lo, hi, M, ds, d_ok, out + o_v, D, out + o_bv,
                   K, M0, M1, M2, M3, DC, BLOCK_N, DTYPE, DOT_F32, False)
    elif w < (T + 1 + NCH) * nd:  # W_2[chunk, m chunk c]; b_2[m chunk c] with the first d_h chunk
        c = (w - (T + 1) * nd) // nd
        first = ((w % nd) == 0).to(tl.int32)
        if c == 0:
            _h_t_times_dy(h_ptr, dy_ptr, keep_ptr, lo, hi, M, D, ds, d_ok, out + o_w2, out + o_b2, first, drop_p,
                          0, M0, DROPOUT, DC, BLOCK_N, DTYPE, DOT_F32)
        if M1 > 0:
            if c == 1:
                _h_t_times_dy(h_ptr, dy_ptr, keep_ptr, lo, hi, M, D, ds, d_ok, out + o_w2, out + o_b2, first, drop_p,
                              M0, M1, DROPOUT, DC, BLOCK_N, DTYPE, DOT_F32)
        if M2 > 0:
            if c == 2:
                _h_t_times_dy(h_ptr, dy_ptr, keep_ptr, lo, hi, M, D, ds, d_ok, out + o_w2, out + o_b2, first, drop_p,
                              M0 + M1, M2, DROPOUT, DC, BLOCK_N, DTYPE, DOT_F32)
        if M3 > 0:
            if c == 3:
                _h_t_times_dy(h_ptr, dy_ptr, keep_ptr, lo, hi, M, D, ds, d_ok, out + o_w2, out + o_b2, first, drop_p,
                              M0 + M1 + M2, M3, DROPOUT, DC, BLOCK_N, DTYPE, DOT_F32)
    else:  # W_g, W_noise: m chunk c
        c = w - (T + 1 + NCH) * nd
        if c == 0:
            _x_t_times_gate(x_ptr, dgate_ptr, lo, hi, M, T, out, 0, M0, BLOCK_N, BLOCK_T, NOISY)
        if M1 > 0:
            if c == 1:
                _x_t_times_gate(x_ptr, dgate_ptr, lo, hi, M, T, out, M0, M1, BLOCK_N, BLOCK_T, NOISY)
        if M2 > 0:
            if c == 2:
                _x_t_times_gate(x_ptr, dgate_ptr, lo, hi, M, T, out, M0 + M1, M2, BLOCK_N, BLOCK_T, NOISY)
        if M3 > 0:
            if c == 3:
                _x_t_times_gate(x_ptr, dgate_ptr, lo, hi, M, T, out, M0 + M1 + M2, M3, BLOCK_N, BLOCK_T, NOISY)


@triton.jit
def _reduce_kernel(part_ptr, out_ptr, splits, total, BLOCK: tl.constexpr):
    """out[p] = Σ_s part[s, p], s in order (fp32), stored in out's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < total
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    ptrs = part_ptr + offs.to(tl.int64)
    for _ in range(splits):
        acc += tl.load(ptrs, mask=ok, other=0.0)
        ptrs += total
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------
# launchers


@dataclass(frozen=True)
class Geometry:
    """What the launchers derive from the shapes: width chunks, d_h chunk, tiles and splits."""

    n: int
    m: int
    d_h: int
    t: int
    chunks: tuple[int, int, int, int]
    dc: int
    block_n: int
    num_warps: int

    @property
    def tiles(self) -> int:
        return triton.cdiv(self.n, self.block_n)

    @property
    def splits(self) -> int:
        return max(1, min(MAX_SPLITS, triton.cdiv(self.n, MIN_SPLIT_ROWS)))

    @property
    def rows_per_split(self) -> int:
        return triton.cdiv(triton.cdiv(self.n, self.splits), self.block_n) * self.block_n

    @property
    def grad_numel(self) -> int:
        return sum(torch.Size(shape).numel() for shape in grad_shapes(self.m, self.d_h, self.t))

    def constexprs(self) -> dict:
        m0, m1, m2, m3 = self.chunks
        return dict(M0=m0, M1=m1, M2=m2, M3=m3, DC=self.dc, BLOCK_N=self.block_n, BLOCK_T=16)


def grad_shapes(m: int, d_h: int, t: int) -> tuple[tuple[int, ...], ...]:
    """The layout of the flat weight gradient (``_fused_bwd_weights_kernel`` writes it in this
    order): dW_g, dW_noise (m, t), dW_1 (t, m, d_h), db_1 (t, d_h), dV (m, d_h), db_V (d_h,),
    dW_2 (d_h, m), db_2 (m,)."""
    return (m, t), (m, t), (t, m, d_h), (t, d_h), (m, d_h), (d_h,), (d_h, m), (m,)


_forced_config: Config | None = None
_tuned: dict[tuple, Config] = {}


class force_config:
    """``with force_config(Config(64, 8)):`` runs the fused kernels with that configuration
    (the tests run every candidate this way)."""

    def __init__(self, config: Config):
        self.config = config

    def __enter__(self):
        global _forced_config
        self._previous, _forced_config = _forced_config, self.config
        return self.config

    def __exit__(self, *exc):
        global _forced_config
        _forced_config = self._previous


def _geometry(kind: str, x: torch.Tensor, m: int, d_h: int, t: int, k: int, dtype: torch.dtype, launch) -> Geometry:
    """The configuration for ``kind`` ("fwd" / "bwd") at this shape: forced, tuned once per
    (kind, m, d_h, t, k, dtype) on CUDA by timing every candidate, else the default."""
    n = x.shape[0]
    base = dict(n=n, m=m, d_h=d_h, t=t, chunks=width_chunks(m), dc=hidden_chunk(d_h, largest=16))
    if _forced_config is not None:
        config = _forced_config
    elif x.is_cuda and not interpreting():
        key = (kind, m, d_h, t, k, dtype, x.device.index)
        config = _tuned.get(key)
        if config is None:
            import triton.testing

            times = {c: triton.testing.do_bench(lambda c=c: launch(Geometry(**base, block_n=c.block_n,
                                                                                 num_warps=c.num_warps)),
                                                warmup=5, rep=20) for c in CONFIGS}
            config = _tuned[key] = min(times, key=times.get)
    else:
        config = CONFIGS[0]
    return Geometry(**base, block_n=config.block_n, num_warps=config.num_warps)


def _dot_f32(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting())


def _flags(training: bool, noisy: bool, noise, k: int, t: int, dropout: float) -> dict:
    noisy = bool(training and noisy)
    mode = (NOISE_GIVEN if noise is not None else NOISE_PHILOX) if noisy else NOISE_NONE
    return dict(NOISY=noisy, NOISE_MODE=mode, LOAD_P=noisy and k < t, DROPOUT=bool(training and dropout > 0))


def fused_forward(x, w_gate, w_noise, w1, b1, v, b_v, w2, b2, seed, noise, k: int, training: bool, noisy: bool,
                  dropout: float, noise_eps: float, w_importance: float, w_load: float, squared_cv: bool,
                  unbiased_cv: bool, dtype: torch.dtype):
    """The layer's forward in two launches.

    x (N, m) any float dtype; weights in any float dtype (converted in registers); seed (1,)
    int64 on x's device (Philox key of the gate noise and the dropout); noise (N, t) fp32 or None;
    ``dtype`` the compute dtype of the expert products. Returns y (N, m) in x's dtype, aux_loss ()
    fp32, topk_idx (N, k) int32, stats (2, t) fp32 (importance, load), keep (N, m) uint8 (the
    dropout keep mask; (0,) without dropout)."""
    n, m = x.shape
    t, _, d_h = w1.shape
    dev = x.device
    flags = _flags(training, noisy, noise, k, t, dropout)
    y = torch.empty_like(x)
    idx = torch.empty(n, k, device=dev, dtype=torch.int32)
    keep = torch.empty((n, m) if flags["DROPOUT"] else (0,), device=dev, dtype=torch.uint8)
    stats = torch.empty(2, t, device=dev, dtype=torch.float32)
    aux = torch.empty((), device=dev, dtype=torch.float32)
    noise_arg = noise if noise is not None else stats
    scalars = dict(K=k, DTYPE=_TL_DTYPES[dtype], DOT_F32=_dot_f32(dtype), **flags)

    def launch(geo: Geometry, part):
        _fused_fwd_kernel[(geo.tiles,)](
            x, w_gate, w_noise, w1, b1, v, b_v, w2, b2, noise_arg, seed, y, idx, part, keep,
            n, m, d_h, t, float(noise_eps), float(dropout), **scalars, **geo.constexprs(), num_warps=geo.num_warps)

    geo = _geometry("fwd", x, m, d_h, t, k, dtype, lambda g: launch(g, torch.empty(g.tiles, 2, t, device=dev)))
    part = torch.empty(max(geo.tiles, 1), 2, t, device=dev, dtype=torch.float32)
    if n:
        launch(geo, part)
    else:
        part.zero_()
    _fused_aux_kernel[(1,)](part, stats, aux, max(geo.tiles, 1), t, float(w_importance), float(w_load),
                            SQUARED=bool(squared_cv), UNBIASED=bool(unbiased_cv), BLOCK_P=64, BLOCK_T=16)
    return y, aux, idx, stats, keep


def fused_backward(dy, d_aux, x, w_gate, w_noise, w1, b1, v, b_v, w2, seed, noise, idx, stats, keep, k: int,
                   training: bool, noisy: bool, dropout: float, noise_eps: float, w_importance: float, w_load: float,
                   squared_cv: bool, unbiased_cv: bool, dtype: torch.dtype):
    """Gradients of :func:`fused_forward` in three launches: dx (x's dtype) and one flat buffer in
    the parameters' dtype holding dW_g, dW_noise, dW_1, db_1, dV, db_V, dW_2, db_2 (see
    :func:`split_grads`).

    dy (N, m) any float dtype; d_aux () fp32; the rest as saved by the forward."""
    n, m = x.shape
    t, _, d_h = w1.shape
    dev = x.device
    flags = _flags(training, noisy, noise, k, t, dropout)
    dx = torch.empty_like(x)
    da = torch.empty(n, k, d_h, device=dev, dtype=dtype)
    du = torch.empty(n, d_h, device=dev, dtype=dtype)
    h = torch.empty(n, d_h, device=dev, dtype=dtype)
    dgate = torch.empty(n, 2, t, device=dev, dtype=torch.float32)
    noise_arg = noise if noise is not None else stats
    keep_arg = keep if keep.numel() else stats
    scalars = dict(K=k, DTYPE=_TL_DTYPES[dtype], DOT_F32=_dot_f32(dtype))

    def launch_tokens(geo: Geometry):
        _fused_bwd_tokens_kernel[(geo.tiles,)](
            dy, d_aux, x, w_gate, w_noise, w1, b1, v, b_v, w2, noise_arg, seed, idx, stats, keep_arg,
            dx, da, du, h, dgate, n, m, d_h, t, float(noise_eps), float(dropout), float(w_importance),
            float(w_load), SQUARED=bool(squared_cv), UNBIASED=bool(unbiased_cv), **scalars, **flags,
            **geo.constexprs(), num_warps=geo.num_warps)

    geo = _geometry("bwd", x, m, d_h, t, k, dtype, launch_tokens)
    grads = torch.empty(geo.grad_numel, device=dev, dtype=w1.dtype)
    if n:
        launch_tokens(geo)
        nd = triton.cdiv(d_h, geo.dc)
        nch = sum(c > 0 for c in geo.chunks)
        part = torch.empty(geo.splits, geo.grad_numel, device=dev, dtype=torch.float32)
        _fused_bwd_weights_kernel[((t + 1 + nch) * nd + nch, geo.splits)](
            x, dy, keep_arg, idx, da, du, h, dgate, part, n, m, d_h, t, float(dropout), geo.rows_per_split,
            geo.grad_numel, NOISY=flags["NOISY"], DROPOUT=flags["DROPOUT"], NCH=nch, **scalars,
            **geo.constexprs(), num_warps=geo.num_warps)
        block = 1024
        _reduce_kernel[(triton.cdiv(geo.grad_numel, block),)](part, grads, geo.splits, geo.grad_numel, BLOCK=block)
    else:
        grads.zero_()
    return dx, grads


def split_grads(flat: torch.Tensor, m: int, d_h: int, t: int) -> list[torch.Tensor]:
    """Views of :func:`fused_backward`'s flat gradient buffer, in :func:`grad_shapes`' order."""
    shapes = grad_shapes(m, d_h, t)
    return [part.view(shape) for part, shape in zip(flat.split([torch.Size(s).numel() for s in shapes]), shapes)]


__all__ = ["fused_forward", "fused_backward", "split_grads", "force_config", "Config", "CONFIGS"]
