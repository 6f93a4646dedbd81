"""Triton kernels of the mmLiT token shuffles (:mod:`mlit_kernels.mae_tokens`): the encoder's
input (the visible patches' tokens gathered, the dummy last) and the decoder's input (the encoded
visible tokens put back at their patch positions, the mask token at the hidden ones, the dummy
last, + the decoder's position table) — one launch each forward, one and two backward, instead of
the gather and concatenation, the cast, clone, scatter, concatenation and add (and their
gradients: zeros, scatter-adds, slices, sums, casts).

    encoder:  v[b, j] = tokens[b, keep[b, j]]  (j < K),   v[b, K] = tokens[b, P]  (the dummy)
    decoder:  x[b, p] = latent[b, j] + pos[p]   j the last slot with keep[b, j] = p: a visible patch
              x[b, p] = token + pos[p]          no slot names p: a hidden patch
              x[b, P] = latent[b, K] + pos[P]   the dummy token

keep alone says which patches are visible, as in the torch path (a gather, and ``scatter_`` into
the mask tokens, whose last write wins): the mask plays no part, so a mask that disagrees with
keep cannot make two phases write one row. Every output row is computed by one program from the
slots that name it — the stores are disjoint by construction, whatever keep holds (a repeated
entry, an entry outside [0, P): it names no patch and reads as zeros; never an out-of-range
access). The token kernels need no property of their inputs that only a host read could check.

* ``_encoder_input_fwd_kernel`` — one program per image: a gather of its kept rows and the dummy.
* ``_encoder_input_bwd_kernel`` — one program per image: each patch row of dtokens sums dv over the
  slots naming it, in slot order (0 where none: the hidden patches), then the dummy's row.
* ``_decoder_input_fwd_kernel`` — one program per image: each patch row from its last slot or the
  mask token (fp32 sums stored in x's dtype, the promoted dtype of latent, token and pos).
* ``_decoder_input_bwd_kernel`` — programs 0..B-1: dlatent of image b (a gather of dx at the
  patch each slot names, 0 for a slot a later one overrides); then one program per POS_BLOCK
  positions: dpos of its positions (Σ_b dx[b, p], images in order) and its partial d token
  (Σ_b over the hidden patches) — summed over the position tiles by the ordered split sum
  (:mod:`mlit_kernels.common.split_sum`).

No atomics, no host reads: bitwise reproducible and capturable. keep gets no gradient.
"""

from __future__ import annotations

import triton
import triton.language as tl

BLOCK_P = 16  # rows a forward / per-image backward program step handles
BLOCK_J = 16  # keep slots compared with a tile of positions per step
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
def _next_slot(keep_ptr, b, stride_keep, ps, after, K, BLOCK_P: tl.constexpr, BLOCK_J: tl.constexpr):
    """Per position p of ps (BLOCK_P,): the first slot j > after[p] with keep[b, j] = p (K where
    none), and how many such slots there are."""
    found = tl.zeros((BLOCK_P,), tl.int32) + K
    count = tl.zeros((BLOCK_P,), tl.int32)
    for j0 in range(0, K, BLOCK_J):
        js = j0 + tl.arange(0, BLOCK_J)
        ks = tl.load(keep_ptr + b * stride_keep + js, mask=js < K, other=-1)
        hit = (ks[None, :] == ps[:, None]) & (js[None, :] > after[:, None])
        found = tl.minimum(found, tl.min(tl.where(hit, js[None, :], K), axis=1))
        count += tl.sum(hit.to(tl.int32), axis=1)
    return found, count


@triton.jit
def _last_slot(keep_ptr, b, stride_keep, ps, K, BLOCK_P: tl.constexpr, BLOCK_J: tl.constexpr):
    """Per position p of ps (BLOCK_P,): the last slot j with keep[b, j] = p (-1 where none)."""
    found = tl.full((BLOCK_P,), -1, tl.int32)
    for j0 in range(0, K, BLOCK_J):
        js = j0 + tl.arange(0, BLOCK_J)
        ks = tl.load(keep_ptr + b * stride_keep + js, mask=js < K, other=-1)
        found = tl.maximum(found, tl.max(tl.where(ks[None, :] == ps[:, None], js[None, :], -1), axis=1))
    return found


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
def _encoder_input_bwd_kernel(dv_ptr, keep_ptr, dtokens_ptr, K, P, D, stride_keep, BLOCK_P: tl.constexpr,
                              BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    """dv (B, K+1, D), keep (B, K) → dtokens (B, P+1, D): a patch row sums dv over the slots naming
    it (slot order; 0 where none), the dummy's row is dv[:, K]; one program per image."""
    b = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    # the dummy's row first: copied after the loop, its column offsets stayed live across the loop and
    # spilled inside it on sm_90 (Triton 3.6.0; bench/results/sm90-audit.md)
    dummy = tl.load(dv_ptr + (b * (K + 1) + K) * D + cols, mask=cmask, other=0.0)
    tl.store(dtokens_ptr + (b * (P + 1) + P) * D + cols, dummy, mask=cmask)
    for p0 in range(0, P, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        slot, count = _next_slot(keep_ptr, b, stride_keep, ps, tl.full((BLOCK_P,), -1, tl.int32), K, BLOCK_P,
                                 BLOCK_J)
        acc = tl.zeros((BLOCK_P, BLOCK_D), tl.float32)
        for _ in range(0, tl.max(count)):  # one round a slot naming the same patch (1 for a keep without repeats)
            acc += tl.load(dv_ptr + (b * (K + 1) + slot)[:, None] * D + cols[None, :],
                           mask=(slot < K)[:, None] & cmask[None, :], other=0.0).to(tl.float32)
            slot, _ = _next_slot(keep_ptr, b, stride_keep, ps, slot, K, BLOCK_P, BLOCK_J)
        tl.store(dtokens_ptr + (b * (P + 1) + ps)[:, None] * D + cols[None, :],
                 acc.to(dtokens_ptr.dtype.element_ty), mask=(ps < P)[:, None] & cmask[None, :])


@triton.jit
def _decoder_input_fwd_kernel(latent_ptr, keep_ptr, token_ptr, pos_ptr, x_ptr, K, P, D, stride_keep,
                              HAS_POS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_J: tl.constexpr,
                              BLOCK_D: tl.constexpr):
    """latent (B, K+1, D), keep (B, K) int64 (rows ``stride_keep`` apart), token (D,), pos (P+1, D)
    → x (B, P+1, D); one program per image."""
    b = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    token = tl.load(token_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    for p0 in range(0, P + 1, BLOCK_P):  # the patches and, as row P, the dummy
        ps = p0 + tl.arange(0, BLOCK_P)
        slot = tl.where(ps == P, K, _last_slot(keep_ptr, b, stride_keep, ps, K, BLOCK_P, BLOCK_J))
        named = slot >= 0
        m2 = (ps <= P)[:, None] & cmask[None, :]
        v = tl.load(latent_ptr + (b * (K + 1) + slot)[:, None] * D + cols[None, :], mask=named[:, None] & m2,
                    other=0.0).to(tl.float32)
        v = tl.where(named[:, None], v, token[None, :])
        if HAS_POS:
            v += tl.load(pos_ptr + ps[:, None] * D + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        tl.store(x_ptr + (b * (P + 1) + ps)[:, None] * D + cols[None, :], v.to(x_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _decoder_input_bwd_kernel(dx_ptr, keep_ptr, dlatent_ptr, dpos_ptr, part_ptr, B, K, P, D, stride_keep,
                              BLOCK_P: tl.constexpr, BLOCK_J: tl.constexpr, POS_BLOCK: tl.constexpr,
                              BLOCK_D: tl.constexpr):
    """dx (B, P+1, D) → dlatent (B, K+1, D) (programs < B, one image each: dx at the patch a slot
    names, 0 for a slot a later one overrides); dpos (P+1, D) fp32 and the partial d token part
    (tiles, D) fp32 (the other programs, POS_BLOCK positions each: Σ_b over the hidden patches)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    if pid < B:
        b = pid.to(tl.int64)
        for j0 in range(0, K + 1, BLOCK_P):
            js = j0 + tl.arange(0, BLOCK_P)
            src, ok = _rows_of(keep_ptr, b, stride_keep, js, K, P)
            for k0 in range(0, K, BLOCK_J):  # a later slot naming the same patch overrides this one
                ks = k0 + tl.arange(0, BLOCK_J)
                later = tl.load(keep_ptr + b * stride_keep + ks, mask=ks < K, other=-1)
                ok &= tl.sum(((later[None, :] == src[:, None]) & (ks[None, :] > js[:, None])).to(tl.int32), axis=1) == 0
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
            hidden = (_last_slot(keep_ptr, image, stride_keep, ps, K, POS_BLOCK, BLOCK_J) < 0) & (ps < P)
            dpos += g
            dtoken += tl.where(hidden[:, None], g, 0.0)
        tl.store(dpos_ptr + ps[:, None] * D + cols[None, :], dpos, mask=m2)
        tl.store(part_ptr + tile * D + cols, tl.sum(dtoken, axis=0), mask=cmask)
