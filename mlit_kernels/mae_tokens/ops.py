"""The mmLiT token shuffles as ``torch.library`` custom ops over :mod:`.kernels`, and their checked
entries.

* ``mlit::mae_encoder_input(tokens, keep, mask) -> v (B, K+1, D)``, ``mlit::mae_encoder_input_backward``
* ``mlit::mae_decoder_input(latent, keep, mask, token, pos) -> x (B, P+1, D)``, ``mlit::mae_decoder_input_backward``
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from ..common.custom_op import custom_op
from ..common.split_sum import split_sum
from .kernels import (BLOCK_P, POS_BLOCK, _decoder_input_bwd_kernel, _decoder_input_fwd_kernel,
                      _encoder_input_bwd_kernel, _encoder_input_fwd_kernel)

MAX_FEATURES = 1024  # features a row's register tile holds


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _encoder_input_backward_fake(dv, keep, mask):
    return dv.new_empty((dv.shape[0], mask.shape[1] + 1, dv.shape[2]))


@custom_op("mae_encoder_input_backward", fake=_encoder_input_backward_fake)
def encoder_input_backward(dv: Tensor, keep: Tensor, mask: Tensor) -> Tensor:
    """dtokens (B, P+1, D) in dv's dtype of :func:`encoder_input`; mask (B, P) 1 where hidden."""
    b, _, d = dv.shape
    p = mask.shape[1]
    dtokens = dv.new_empty((b, p + 1, d))
    if b:
        _encoder_input_bwd_kernel[(b,)](dv, keep, mask, dtokens, keep.shape[1], p, d, keep.stride(0), BLOCK_P=BLOCK_P,
                                        BLOCK_D=_block_d(d))
    return dtokens


def _encoder_input_fake(tokens, keep, mask):
    return tokens.new_empty((tokens.shape[0], keep.shape[1] + 1, tokens.shape[2]))


def _encoder_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2])


def _encoder_backward(ctx, dv):
    keep, mask = ctx.saved_tensors
    return encoder_input_backward(dv.contiguous(), keep, mask), None, None


@custom_op("mae_encoder_input", fake=_encoder_input_fake, backward=_encoder_backward,
           setup_context=_encoder_setup_context)
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


def _decoder_input_backward_fake(dx, keep, mask, latent_dtype):
    b, p1, d = dx.shape
    return (dx.new_empty((b, keep.shape[1] + 1, d), dtype=latent_dtype), dx.new_empty((d,), dtype=torch.float32),
            dx.new_empty((p1, d), dtype=torch.float32))


@custom_op("mae_decoder_input_backward", fake=_decoder_input_backward_fake)
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
    split_sum(part, dtoken)
    return dlatent, dtoken, dpos


def _decoder_input_fake(latent, keep, mask, token, pos):
    b, _, d = latent.shape
    dtype = torch.promote_types(latent.dtype, token.dtype)
    if pos is not None:
        dtype = torch.promote_types(dtype, pos.dtype)
    return latent.new_empty((b, mask.shape[1] + 1, d), dtype=dtype)


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


@custom_op("mae_decoder_input", fake=_decoder_input_fake, backward=_backward, setup_context=_setup_context)
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
    if t.shape[2] > MAX_FEATURES:
        raise ValueError(f"{name}: at most {MAX_FEATURES} features (one register tile a row), got {t.shape[2]}")
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
           "decoder_input_backward", "MAX_FEATURES"]
