"""A LayerNorm folded into a per-token kernel, as Triton device functions: the row statistics, the
normalized columns (what ``nn.LayerNorm`` returns) and the per-row backward.

A kernel that reads whole token rows x (N, m) normalizes them in registers instead of reading the
output of a separate LayerNorm launch: ``xn = (x − mean) · rstd · w + b`` with mean and
rstd = 1 / sqrt(var + eps) over the row's m columns (biased variance, as torch), fp32, rounded to
x's dtype as ``nn.LayerNorm``'s output is. The forward stores mean and rstd (N,) fp32 each; the
backward recomputes xn from them and, holding whole rows of dL/dxn, applies

    dx = rstd · (ĝ − mean_row(ĝ) − x̂ · mean_row(ĝ ⊙ x̂)),  ĝ = dL/dxn ⊙ w,  x̂ = (x − mean) · rstd

and emits dL/dxn ⊙ x̂ and dL/dxn for the weight and bias gradients (summed over tokens in a fixed
order by the caller). Widths come as the chunks of :func:`mlit_kernels.common.tiling.width_chunks`
(``STARTS`` / ``WIDTHS`` constexpr tuples, 0 = absent chunk).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def norm_row_stats(x_ptr, rows, row_ok, M, eps, STARTS: tl.constexpr, WIDTHS: tl.constexpr):
    """mean and rstd (fp32, rows.shape) of rows ``rows`` of x (N, M): two passes over the chunks
    (the mean, then the centred squares), as torch's LayerNorm (biased variance)."""
    total = tl.zeros(rows.shape, dtype=tl.float32)
    for i in tl.static_range(len(WIDTHS)):
        if WIDTHS[i] > 0:
            cols = STARTS[i] + tl.arange(0, WIDTHS[i])
            mask = row_ok[:, None] & (cols < M)[None, :]
            xc = tl.load(x_ptr + rows[:, None].to(tl.int64) * M + cols[None, :], mask=mask, other=0.0)
            total += tl.sum(xc.to(tl.float32), axis=1)
    mean = total / M
    squares = tl.zeros(rows.shape, dtype=tl.float32)
    for i in tl.static_range(len(WIDTHS)):
        if WIDTHS[i] > 0:
            cols = STARTS[i] + tl.arange(0, WIDTHS[i])
            mask = row_ok[:, None] & (cols < M)[None, :]
            xc = tl.load(x_ptr + rows[:, None].to(tl.int64) * M + cols[None, :], mask=mask, other=0.0)
            dev = tl.where(mask, xc.to(tl.float32) - mean[:, None], 0.0)
            squares += tl.sum(dev * dev, axis=1)
    return mean, 1.0 / tl.sqrt(squares / M + eps)


@triton.jit
def normalized_cols(x_ptr, rows, row_ok, cols, col_ok, M, w_ptr, b_ptr, mean, rstd, NORM: tl.constexpr):
    """Columns ``cols`` of rows ``rows`` of x (N, M) in fp32, zero off (row_ok, col_ok); with NORM
    the LayerNorm's output there ((x − mean) · rstd · w + b, rounded to x's dtype)."""
    mask = row_ok[:, None] & col_ok[None, :]
    xc = tl.load(x_ptr + rows[:, None].to(tl.int64) * M + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if NORM:
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        xc = ((xc - mean[:, None]) * rstd[:, None] * w[None, :] + b[None, :]).to(x_ptr.dtype.element_ty)
        xc = xc.to(tl.float32)
    return xc


@triton.jit
def norm_backward_sums(dxn, x_ptr, w_ptr, rows, row_ok, M, mean, rstd, STARTS: tl.constexpr, WIDTHS: tl.constexpr):
    """The two row sums of the LayerNorm backward from dL/dxn (a tuple of fp32 chunks):
    (Σ ĝ, Σ ĝ ⊙ x̂) over each row's M columns, ĝ = dL/dxn ⊙ w."""
    s_g = tl.zeros(rows.shape, dtype=tl.float32)
    s_gx = tl.zeros(rows.shape, dtype=tl.float32)
    for i in tl.static_range(len(WIDTHS)):
        if WIDTHS[i] > 0:
            cols = STARTS[i] + tl.arange(0, WIDTHS[i])
            col_ok = cols < M
            xhat = _xhat(x_ptr, rows, row_ok, cols, col_ok, M, mean, rstd)
            g = dxn[i] * tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            s_g += tl.sum(g, axis=1)
            s_gx += tl.sum(g * xhat, axis=1)
    return s_g, s_gx


@triton.jit
def _xhat(x_ptr, rows, row_ok, cols, col_ok, M, mean, rstd):
    """x̂ = (x − mean) · rstd (fp32), zero off (row_ok, col_ok)."""
    mask = row_ok[:, None] & col_ok[None, :]
    xc = tl.load(x_ptr + rows[:, None].to(tl.int64) * M + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    return tl.where(mask, (xc - mean[:, None]) * rstd[:, None], 0.0)


@triton.jit
def norm_input_grad(dxn, x_ptr, w_ptr, rows, row_ok, cols, col_ok, M, mean, rstd, s_g, s_gx):
    """dx and x̂ of a column chunk: dx = rstd · (ĝ − (Σ ĝ + x̂ Σ ĝ ⊙ x̂) / M), from the chunk of
    dL/dxn and the row sums of :func:`norm_backward_sums`."""
    xhat = _xhat(x_ptr, rows, row_ok, cols, col_ok, M, mean, rstd)
    g = dxn * tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return rstd[:, None] * (g - (s_g[:, None] + xhat * s_gx[:, None]) / M), xhat


__all__ = ["norm_row_stats", "normalized_cols", "norm_backward_sums", "norm_input_grad"]
