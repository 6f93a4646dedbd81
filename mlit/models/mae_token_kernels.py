"""Triton kernels of the mmLiT token shuffles (:meth:`mlit.models.mae.MMLiT.forward`): the encoder's
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
  (Σ_b over the hidden patches) — summed over the position tiles by
  :func:`mlit_kernels.attention.kernels._attn_sum_splits_kernel`.

No atomics, no host reads: bitwise reproducible and capturable. keep gets no gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from mlit_kernels.attention.kernels import _attn_sum_splits_kernel
from mlit_kernels.attention.launch import SUM_BLOCK

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
    dummy = tl.load(dv_ptr + (b * (K + 1) + K) * D + cols, mask=cmask, other=0.0)
    tl.store(dtokens_ptr + (b * (P + 1) + P) * D + cols, dummy, mask=cmask)


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


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


@torch.library.custom_op("mlit::mae_encoder_input", mutates_args=())
def encoder_input(tokens: Tensor, keep: Tensor) -> Tensor:
    """v (B, K+1, D) from tokens (B, P+1, D) and keep (B, K) int64 (rows any stride apart)."""
    b, p1, d = tokens.shape
    k = keep.shape[1]
    v = tokens.new_empty((b, k + 1, d))
    if b:
        _encoder_input_fwd_kernel[(b,)](tokens, keep, v, k, p1 - 1, d, keep.stride(0), BLOCK_P=BLOCK_P,
                                        BLOCK_D=_block_d(d))
    return v


@encoder_input.register_fake
def _encoder_input_fake(tokens, keep):
    return tokens.new_empty((tokens.shape[0], keep.shape[1] + 1, tokens.shape[2]))


@torch.library.custom_op("mlit::mae_encoder_input_backward", mutates_args=())
def encoder_input_backward(dv: Tensor, keep: Tensor, num_patches: int) -> Tensor:
    """dtokens (B, P+1, D) in dv's dtype of :func:`encoder_input`, P = ``num_patches``."""
    b, _, d = dv.shape
    dtokens = dv.new_empty((b, num_patches + 1, d))
    if b:
        _encoder_input_bwd_kernel[(b,)](dv, keep, dtokens, keep.shape[1], num_patches, d, keep.stride(0),
                                        BLOCK_P=BLOCK_P, BLOCK_J=BLOCK_J, BLOCK_D=_block_d(d))
    return dtokens


@encoder_input_backward.register_fake
def _encoder_input_backward_fake(dv, keep, num_patches):
    return dv.new_empty((dv.shape[0], num_patches + 1, dv.shape[2]))


def _encoder_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])
    ctx.num_patches = inputs[0].shape[1] - 1


def _encoder_backward(ctx, dv):
    (keep,) = ctx.saved_tensors
    return encoder_input_backward(dv.contiguous(), keep, ctx.num_patches), None


encoder_input.register_autograd(_encoder_backward, setup_context=_encoder_setup_context)


@torch.library.custom_op("mlit::mae_decoder_input", mutates_args=())
def decoder_input(latent: Tensor, keep: Tensor, token: Tensor, pos: Tensor | None, num_patches: int) -> Tensor:
    """x (B, P+1, D) from latent (B, K+1, D), keep (B, K) int64 (rows any stride apart), token (D,),
    pos (P+1, D) or None; P = ``num_patches``."""
    b, k1, d = latent.shape
    dtype = torch.promote_types(latent.dtype, token.dtype) if pos is None else torch.promote_types(
        torch.promote_types(latent.dtype, token.dtype), pos.dtype)
    x = torch.empty(b, num_patches + 1, d, device=latent.device, dtype=dtype)
    if b:
        _decoder_input_fwd_kernel[(b,)](latent, keep, token, token if pos is None else pos, x, k1 - 1, num_patches, d,
                                        keep.stride(0), HAS_POS=pos is not None, BLOCK_P=BLOCK_P, BLOCK_J=BLOCK_J,
                                        BLOCK_D=_block_d(d))
    return x


@decoder_input.register_fake
def _decoder_input_fake(latent, keep, token, pos, num_patches):
    b, _, d = latent.shape
    dtype = torch.promote_types(latent.dtype, token.dtype)
    if pos is not None:
        dtype = torch.promote_types(dtype, pos.dtype)
    return latent.new_empty((b, num_patches + 1, d), dtype=dtype)


@torch.library.custom_op("mlit::mae_decoder_input_backward", mutates_args=())
def decoder_input_backward(dx: Tensor, keep: Tensor, latent_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(dlatent (B, K+1, D) latent_dtype, d token (D,) fp32, dpos (P+1, D) fp32) of :func:`decoder_input`."""
    b, p1, d = dx.shape
    k = keep.shape[1]
    dlatent = torch.empty(b, k + 1, d, device=dx.device, dtype=latent_dtype)
    dpos = torch.empty(p1, d, device=dx.device, dtype=torch.float32)
    dtoken = torch.empty(d, device=dx.device, dtype=torch.float32)
    tiles = triton.cdiv(p1, POS_BLOCK)
    part = torch.empty(tiles, d, device=dx.device, dtype=torch.float32)
    _decoder_input_bwd_kernel[(b + tiles,)](dx, keep, dlatent, dpos, part, b, k, p1 - 1, d, keep.stride(0),
                                            BLOCK_P=BLOCK_P, BLOCK_J=BLOCK_J, POS_BLOCK=POS_BLOCK, BLOCK_D=_block_d(d))
    _attn_sum_splits_kernel[(triton.cdiv(d, SUM_BLOCK),)](part, dtoken, tiles, d, BLOCK=SUM_BLOCK)
    return dlatent, dtoken, dpos


@decoder_input_backward.register_fake
def _decoder_input_backward_fake(dx, keep, latent_dtype):
    b, p1, d = dx.shape
    return (dx.new_empty((b, keep.shape[1] + 1, d), dtype=latent_dtype), dx.new_empty((d,), dtype=torch.float32),
            dx.new_empty((p1, d), dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    latent, keep, token, pos, _ = inputs
    ctx.save_for_backward(keep)
    ctx.latent_dtype, ctx.token_dtype = latent.dtype, token.dtype
    ctx.pos_dtype = None if pos is None else pos.dtype


def _backward(ctx, dx):
    (keep,) = ctx.saved_tensors
    dlatent, dtoken, dpos = decoder_input_backward(dx.contiguous(), keep, ctx.latent_dtype)
    return (dlatent, None, dtoken.to(ctx.token_dtype), None if ctx.pos_dtype is None else dpos.to(ctx.pos_dtype),
            None)


decoder_input.register_autograd(_backward, setup_context=_setup_context)


def _check_keep(b: int, keep: Tensor) -> None:
    if keep.dim() != 2 or keep.shape[0] != b or keep.dtype != torch.int64:
        raise ValueError(f"keep must be int64 of shape (B={b}, K), got {keep.dtype} {tuple(keep.shape)}")


def _check_tokens(name: str, t: Tensor, rows: str) -> tuple[int, int, int]:
    """t's shape (B, rows, D), once t is a 3-D float tensor of at most 1024 features."""
    if t.dim() != 3 or not t.is_floating_point():
        raise ValueError(f"{name} must be a (B, {rows}, D) float tensor, got {t.dtype} {tuple(t.shape)}")
    if t.shape[2] > 1024:
        raise ValueError(f"{name}: at most 1024 features (one register tile a row), got {t.shape[2]}")
    return tuple(t.shape)


def _rows(keep: Tensor) -> Tensor:
    """keep with unit column stride (its rows may stay any stride apart: no copy for a slice)."""
    return keep if keep.stride(1) == 1 else keep.contiguous()


def fused_encoder_input(tokens: Tensor, keep: Tensor) -> Tensor:
    """The encoder's input (module docstring) in one launch: tokens (B, P+1, D) the embedded patches
    then the dummy, keep (B, K) int64 the kept patches (as :func:`mlit.models.mae.random_masking`
    gives them) → (B, K+1, D). Raises ValueError naming a bad argument."""
    b, _, _ = _check_tokens("tokens", tokens, "P+1")
    _check_keep(b, keep)
    return encoder_input(tokens.contiguous(), _rows(keep))


def fused_decoder_input(latent: Tensor, keep: Tensor, token: Tensor, pos: Tensor | None, num_patches: int) -> Tensor:
    """The decoder's input (module docstring) in one launch: latent (B, K+1, D) the encoded visible
    tokens then the dummy, keep (B, K) int64 their patch indices, token (D,) the mask token, pos
    (P+1, D) or None, P = ``num_patches`` → (B, P+1, D). Raises ValueError naming a bad argument."""
    b, k1, d = _check_tokens("latent", latent, "K+1")
    _check_keep(b, keep)
    if keep.shape[1] != k1 - 1:
        raise ValueError(f"keep must have shape ({b}, {k1 - 1}), got {tuple(keep.shape)}")
    if num_patches < k1 - 1:
        raise ValueError(f"num_patches must be at least K = {k1 - 1}, got {num_patches}")
    if token.numel() != d:
        raise ValueError(f"token must hold {d} values, got {tuple(token.shape)}")
    if pos is not None and pos.numel() != (num_patches + 1) * d:
        raise ValueError(f"pos must hold ({num_patches + 1}, {d}) values, got {tuple(pos.shape)}")
    return decoder_input(latent.contiguous(), _rows(keep), token.reshape(d),
                         None if pos is None else pos.reshape(num_patches + 1, d), int(num_patches))


__all__ = ["fused_encoder_input", "fused_decoder_input", "encoder_input", "encoder_input_backward", "decoder_input",
           "decoder_input_backward", "BLOCK_P", "BLOCK_J", "POS_BLOCK"]
