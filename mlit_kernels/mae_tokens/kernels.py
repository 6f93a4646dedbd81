"""Triton kernels of the mmLiT token shuffles (:mod:`mlit_kernels.mae_tokens`): the encoder's
input (the visible patches' tokens gathered, the dummy last) and the decoder's input (the encoded
visible tokens put back at their patch positions, the mask token at the hidden ones, the dummy
last, + the decoder's position table) — one launch each forward, one and two backward, instead of
the gather and concatenation, the cast, clone, scatter, concatenation and add (and their
gradients: zeros, scatter-adds, slices, sums, casts).

    encoder:  v[b, j] = tokens[b, keep[b, j]]  (j < K),   v[b, K] = tokens[b, P]  (the dummy)
    decoder:  x[b, keep[b, j]] = latent[b, j] + pos[keep[b, j]]     j < K: the visible patches
              x[b, p]          = token + pos[p]                     mask[b, p] = 1: the hidden patches
              x[b, P]          = latent[b, K] + pos[P]              the dummy token

* ``_encoder_input_fwd_kernel`` — one program per image: a gather of its kept rows and the dummy.
* ``_encoder_input_bwd_kernel`` — one program per image: dtokens of the kept rows and the dummy
  (a scatter of dv), zeros at the hidden ones (disjoint stores).
* ``_decoder_input_fwd_kernel`` — one program per image: the visible rows, then the hidden ones
  (disjoint stores; fp32 sums stored in x's dtype, the promoted dtype of latent, token and pos).
* ``_decoder_input_bwd_kernel`` — programs 0..B-1: dlatent of image b (a gather of dx); then one
  program per POS_BLOCK positions: dpos of its positions (Σ_b dx[b, p], images in order) and its
  partial d token (Σ_b Σ_p mask · dx) — summed over the position tiles by the ordered split sum
  (:mod:`mlit_kernels.common.split_sum`).

No atomics, no host reads: bitwise reproducible and capturable. keep and mask get no gradient; a
keep entry outside [0, P) is skipped (its row reads as zeros, nothing is written for it), never
an out-of-range access — checking the range would need a host read.
"""

from __future__ import annotations

import triton
import triton.language as tl

BLOCK_P = 16  # rows a forward / per-image backward program step handles
POS_BLOCK = 4  # positions a backward position program sums over the images (37 programs at 145)


@triton.jit
def _rows_of(keep_ptr, b, stride_keep, js, K, P):
    """The patch rows of slots js of image b: keep[b, j] for j < K, P (the dummy) for j = K; and
    which are real rows (j <= K, and a keep entry inside [0, P): an out-of-range entry is skipped,
    never an out-of-range access)."""
    idx = tl.load(keep_ptr + b * stride_keep + js, mask=js < K, other=0)
    row = tl.where(js < K, idx, P)
    return row, (js <= K) & (row >= 0) & ((row < P) | (js == K))


@triton.jit
def _encoder_input_fwd_kernel(tokens_ptr, keep_ptr, v_ptr, K, P, D, stride_keep, BLOCK_P: tl.constexpr,
                              BLOCK_D: tl.constexpr):
    """tokens (B, P+1, D), keep (B, K) int64 (rows ``stride_keep`` apart) → v (B, K+1, D); one
    program per image."""
    b = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    for j0 in range(0, K + 1, BLOCK_P):
        js = j0 + tl.arange(0, BLOCK_P)
        src, ok = _rows_of(keep_ptr, b, stride_keep, js, K, P)
        v = tl.load(tokens_ptr + (b * (P + 1) + src)[:, None] * D + cols[None, :], mask=ok[:, None] & cmask[None, :],
                    other=0.0)
        tl.store(v_ptr + (b * (K + 1) + js)[:, None] * D + cols[None, :], v, mask=(js <= K)[:, None] & cmask[None, :])


@triton.jit
def _encoder_input_bwd_kernel(dv_ptr, keep_ptr, mask_ptr, dtokens_ptr, K, P, D, stride_keep, BLOCK_P: tl.constexpr,
                              BLOCK_D: tl.constexpr):
    """dv (B, K+1, D), keep (B, K), mask (B, P) (1 hidden) → dtokens (B, P+1, D): dv at the kept
    rows and the dummy, 0 at the hidden rows; one program per image."""
    b = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    for j0 in range(0, K + 1, BLOCK_P):  # the kept patches and, as row K, the dummy
        js = j0 + tl.arange(0, BLOCK_P)
        dest, ok = _rows_of(keep_ptr, b, stride_keep, js, K, P)
        m2 = ok[:, None] & cmask[None, :]
        g = tl.load(dv_ptr + (b * (K + 1) + js)[:, None] * D + cols[None, :], mask=m2, other=0.0)
        tl.store(dtokens_ptr + (b * (P + 1) + dest)[:, None] * D + cols[None, :], g, mask=m2)
    for p0 in range(0, P, BLOCK_P):  # the hidden patches
        ps = p0 + tl.arange(0, BLOCK_P)
        hidden = tl.load(mask_ptr + b * P + ps, mask=ps < P, other=0.0) != 0
        zeros = tl.zeros((BLOCK_P, BLOCK_D), tl.float32).to(dtokens_ptr.dtype.element_ty)
        tl.store(dtokens_ptr + (b * (P + 1) + ps)[:, None] * D + cols[None, :], zeros,
                 mask=hidden[:, None] & cmask[None, :])


@triton.jit
def _decoder_input_fwd_kernel(latent_ptr, keep_ptr, mask_ptr, token_ptr, pos_ptr, x_ptr, K, P, D, stride_keep,
                              HAS_POS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    """latent (B, K+1, D), keep (B, K) int64 (rows ``stride_keep`` apart), mask (B, P) (1 hidden),
    token (D,), pos (P+1, D) → x (B, P+1, D); one program per image."""
    b = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    token = tl.load(token_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    for j0 in range(0, K + 1, BLOCK_P):  # the visible patches and, as row K, the dummy
        js = j0 + tl.arange(0, BLOCK_P)
        dest, ok = _rows_of(keep_ptr, b, stride_keep, js, K, P)
        m2 = ok[:, None] & cmask[None, :]
        v = tl.load(latent_ptr + (b * (K + 1) + js)[:, None] * D + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        if HAS_POS:
            v += tl.load(pos_ptr + dest[:, None] * D + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        tl.store(x_ptr + (b * (P + 1) + dest)[:, None] * D + cols[None, :], v.to(x_ptr.dtype.element_ty), mask=m2)
    for p0 in range(0, P, BLOCK_P):  # the hidden patches
        ps = p0 + tl.arange(0, BLOCK_P)
        hidden = tl.load(mask_ptr + b * P + ps, mask=ps < P, other=0.0) != 0
        m2 = hidden[:, None] & cmask[None, :]
        v = tl.zeros((BLOCK_P, BLOCK_D), tl.float32) + token[None, :]
        if HAS_POS:
            v += tl.load(pos_ptr + ps[:, None] * D + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        tl.store(x_ptr + (b * (P + 1) + ps)[:, None] * D + cols[None, :], v.to(x_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _decoder_input_bwd_kernel(dx_ptr, keep_ptr, mask_ptr, dlatent_ptr, dpos_ptr, part_ptr, B, K, P, D, stride_keep,
                              BLOCK_P: tl.constexpr, POS_BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """dx (B, P+1, D) → dlatent (B, K+1, D) (programs < B, one image each); dpos (P+1, D) fp32 and
    the partial d token part (tiles, D) fp32 (the other programs, POS_BLOCK positions each)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    if pid < B:
        b = pid.to(tl.int64)
        for j0 in range(0, K + 1, BLOCK_P):
            js = j0 + tl.arange(0, BLOCK_P)
            src, ok = _rows_of(keep_ptr, b, stride_keep, js, K, P)
            g = tl.load(dx_ptr + (b * (P + 1) + src)[:, None] * D + cols[None, :], mask=ok[:, None] & cmask[None, :],
                        other=0.0)
            tl.store(dlatent_ptr + (b * (K + 1) + js)[:, None] * D + cols[None, :],
                     g.to(dlatent_ptr.dtype.element_ty), mask=(js <= K)[:, None] & cmask[None, :])
    else:
        tile = pid - B
        ps = tile * POS_BLOCK + tl.arange(0, POS_BLOCK)
        pmask = ps < P + 1
        m2 = pmask[:, None] & cmask[None, :]
        dpos = tl.zeros((POS_BLOCK, BLOCK_D), tl.float32)
        dtoken = tl.zeros((POS_BLOCK, BLOCK_D), tl.float32)
        for image in range(0, B):
            g = tl.load(dx_ptr + (image * (P + 1) + ps.to(tl.int64))[:, None] * D + cols[None, :], mask=m2,
                        other=0.0).to(tl.float32)
            hidden = tl.load(mask_ptr + image * P + ps, mask=ps < P, other=0.0) != 0
            dpos += g
            dtoken += tl.where(hidden[:, None], g, 0.0)
        tl.store(dpos_ptr + ps[:, None] * D + cols[None, :], dpos, mask=m2)
        tl.store(part_ptr + tile * D + cols, tl.sum(dtoken, axis=0), mask=cmask)
