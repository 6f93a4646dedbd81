"""Triton kernels of the mmLiT token shuffles (:meth:`mlit.models.mae.MMLiT.forward`): the encoder's
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
  partial d token (Σ_b Σ_p mask · dx) — summed over the position tiles by
  :func:`mlit_kernels.attention.kernels._attn_sum_splits_kernel`.

No atomics, no host reads: bitwise reproducible and capturable. keep and mask get no gradient; a
keep entry outside [0, P) is skipped (its row reads as zeros, nothing is written for it), never
an out-of-range access — checking the range would need a host read.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from mlit_kernels.attention.kernels import _attn_sum_splits_kernel
from mlit_kernels.attention.launch import SUM_BLOCK

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


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


@torch.library.custom_op("mlit::mae_encoder_input", mutates_args=())
def encoder_input(tokens: Tensor, keep: Tensor, mask: Tensor) -> Tensor:
    """v (B, K+1, D) from tokens (B, P+1, D) and keep (B, K) int64 (rows any stride apart); mask (B, P),
    1 where hidden, is for the backward."""
    b, p1, d = tokens.shape
    k = keep.shape[1]
    v = tokens.new_empty((b, k + 1, d))
    if b:
        _encoder_input_fwd_kernel[(b,)](tokens, keep, v, k, p1 - 1, d, keep.stride(0), BLOCK_P=BLOCK_P,
                                        BLOCK_D=_block_d(d))
    return v


@encoder_input.register_fake
def _encoder_input_fake(tokens, keep, mask):
    return tokens.new_empty((tokens.shape[0], keep.shape[1] + 1, tokens.shape[2]))


@torch.library.custom_op("mlit::mae_encoder_input_backward", mutates_args=())
def encoder_input_backward(dv: Tensor, keep: Tensor, mask: Tensor) -> Tensor:
    """dtokens (B, P+1, D) in dv's dtype of :func:`encoder_input`; mask (B, P) 1 where hidden."""
    b, _, d = dv.shape
    p = mask.shape[1]
    dtokens = dv.new_empty((b, p + 1, d))
    if b:
        _encoder_input_bwd_kernel[(b,)](dv, keep, mask, dtokens, keep.shape[1], p, d, keep.stride(0), BLOCK_P=BLOCK_P,
                                        BLOCK_D=_block_d(d))
    return dtokens


@encoder_input_backward.register_fake
def _encoder_input_backward_fake(dv, keep, mask):
    return dv.new_empty((dv.shape[0], mask.shape[1] + 1, dv.shape[2]))


def _encoder_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2])


def _encoder_backward(ctx, dv):
    keep, mask = ctx.saved_tensors
    return encoder_input_backward(dv.contiguous(), keep, mask), None, None


encoder_input.register_autograd(_encoder_backward, setup_context=_encoder_setup_context)


@torch.library.custom_op("mlit::mae_decoder_input", mutates_args=())
def decoder_input(latent: Tensor, keep: Tensor, mask: Tensor, token: Tensor, pos: Tensor | None) -> Tensor:
    """x (B, P+1, D) from latent (B, K+1, D), keep (B, K) int64 (rows any stride apart), mask (B, P),
    token (D,), pos (P+1, D) or None."""
    b, k1, d = latent.shape
    p = mask.shape[1]
    dtype = torch.promote_types(latent.dtype, token.dtype) if pos is None else torch.promote_types(
        torch.promote_types(latent.dtype, token.dtype), pos.dtype)
    x = torch.empty(b, p + 1, d, device=latent.device, dtype=dtype)
    if b:
        _decoder_input_fwd_kernel[(b,)](latent, keep, mask, token, token if pos is None else pos, x, k1 - 1, p, d,
                                        keep.stride(0),
                                        HAS_POS=pos is not None, BLOCK_P=BLOCK_P, BLOCK_D=_block_d(d))
    return x


@decoder_input.register_fake
def _decoder_input_fake(latent, keep, mask, token, pos):
    b, _, d = latent.shape
    dtype = torch.promote_types(latent.dtype, token.dtype)
    if pos is not None:
        dtype = torch.promote_types(dtype, pos.dtype)
    return latent.new_empty((b, mask.shape[1] + 1, d), dtype=dtype)


@torch.library.custom_op("mlit::mae_decoder_input_backward", mutates_args=())
def decoder_input_backward(dx: Tensor, keep: Tensor, mask: Tensor, latent_dtype: torch.dtype
                           ) -> tuple[Tensor, Tensor, Tensor]:
    """(dlatent (B, K+1, D) latent_dtype, d token (D,) fp32, dpos (P+1, D) fp32) of :func:`decoder_input`."""
    b, p1, d = dx.shape
    k = keep.shape[1]
    dlatent = torch.empty(b, k + 1, d, device=dx.device, dtype=latent_dtype)
    dpos = torch.empty(p1, d, device=dx.device, dtype=torch.float32)
    dtoken = torch.empty(d, device=dx.device, dtype=torch.float32)
    tiles = triton.cdiv(p1, POS_BLOCK)
    part = torch.empty(tiles, d, device=dx.device, dtype=torch.float32)
    _decoder_input_bwd_kernel[(b + tiles,)](dx, keep, mask, dlatent, dpos, part, b, k, p1 - 1, d, keep.stride(0),
                                            BLOCK_P=BLOCK_P, POS_BLOCK=POS_BLOCK, BLOCK_D=_block_d(d))
    _attn_sum_splits_kernel[(triton.cdiv(d, SUM_BLOCK),)](part, dtoken, tiles, d, BLOCK=SUM_BLOCK)
    return dlatent, dtoken, dpos


@decoder_input_backward.register_fake
def _decoder_input_backward_fake(dx, keep, mask, latent_dtype):
    b, p1, d = dx.shape
    return (dx.new_empty((b, keep.shape[1] + 1, d), dtype=latent_dtype), dx.new_empty((d,), dtype=torch.float32),
            dx.new_empty((p1, d), dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    latent, keep, mask, token, pos = inputs
    ctx.save_for_backward(keep, mask)
    ctx.latent_dtype, ctx.token_dtype = latent.dtype, token.dtype
    ctx.pos_dtype = None if pos is None else pos.dtype


def _backward(ctx, dx):
    keep, mask = ctx.saved_tensors
    dlatent, dtoken, dpos = decoder_input_backward(dx.contiguous(), keep, mask, ctx.latent_dtype)
    return (dlatent, None, None, dtoken.to(ctx.token_dtype),
            None if ctx.pos_dtype is None else dpos.to(ctx.pos_dtype))


decoder_input.register_autograd(_backward, setup_context=_setup_context)


def _check_masking(b: int, keep: Tensor, mask: Tensor) -> None:
    k = keep.shape[-1] if keep.dim() == 2 else -1
    if keep.dim() != 2 or keep.shape[0] != b or keep.dtype != torch.int64:
        raise ValueError(f"keep must be int64 of shape (B={b}, K), got {keep.dtype} {tuple(keep.shape)}")
    if mask.dim() != 2 or mask.shape[0] != b or mask.shape[1] < k or not mask.is_floating_point():
        raise ValueError(f"mask must be a float (B={b}, P >= K) tensor, got {mask.dtype} {tuple(mask.shape)}")


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


def fused_encoder_input(tokens: Tensor, keep: Tensor, mask: Tensor) -> Tensor:
    """The encoder's input (module docstring) in one launch: tokens (B, P+1, D) the embedded patches
    then the dummy, keep (B, K) int64 the kept patches, mask (B, P) 1 exactly where keep names no
    patch (as :func:`mlit.models.mae.random_masking` gives them) → (B, K+1, D). Raises ValueError
    naming a bad argument."""
    b, p1, _ = _check_tokens("tokens", tokens, "P+1")
    _check_masking(b, keep, mask)
    if mask.shape[1] != p1 - 1:
        raise ValueError(f"mask must have shape ({b}, {p1 - 1}), got {tuple(mask.shape)}")
    return encoder_input(tokens.contiguous(), _rows(keep), mask.contiguous())


def fused_decoder_input(latent: Tensor, keep: Tensor, mask: Tensor, token: Tensor, pos: Tensor | None) -> Tensor:
    """The decoder's input (module docstring) in one launch: latent (B, K+1, D) the encoded visible
    tokens then the dummy, keep (B, K) int64 their patch indices, mask (B, P) 1 exactly where keep
    names no patch, token (D,) the mask token, pos (P+1, D) or None. Raises ValueError naming a bad
    argument."""
    b, k1, d = _check_tokens("latent", latent, "K+1")
    _check_masking(b, keep, mask)
    if keep.shape[1] != k1 - 1:
        raise ValueError(f"keep must have shape ({b}, {k1 - 1}), got {tuple(keep.shape)}")
    p = mask.shape[1]
    if token.numel() != d:
        raise ValueError(f"token must hold {d} values, got {tuple(token.shape)}")
    if pos is not None and pos.numel() != (p + 1) * d:
        raise ValueError(f"pos must hold ({p + 1}, {d}) values, got {tuple(pos.shape)}")
    return decoder_input(latent.contiguous(), _rows(keep), mask.contiguous(), token.reshape(d),
                         None if pos is None else pos.reshape(p + 1, d))


__all__ = ["fused_encoder_input", "fused_decoder_input", "encoder_input", "encoder_input_backward", "decoder_input",
           "decoder_input_backward", "BLOCK_P", "POS_BLOCK"]
