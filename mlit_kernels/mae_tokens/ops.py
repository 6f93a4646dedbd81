"""The mmLiT token shuffles as ``torch.library`` custom ops over :mod:`.kernels`, and their checked
entries.

* ``mlit::mae_encoder_input(tokens, keep) -> v (B, K+1, D)``, ``mlit::mae_encoder_input_backward``
* ``mlit::mae_decoder_input(latent, keep, token, pos, num_patches) -> x (B, P+1, D)``,
  ``mlit::mae_decoder_input_backward``
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from ..common.custom_op import custom_op
from ..common.split_sum import split_sum
from .kernels import (BLOCK_J, BLOCK_P, POS_BLOCK, _decoder_input_bwd_kernel, _decoder_input_fwd_kernel,
                      _encoder_input_bwd_kernel, _encoder_input_fwd_kernel)

MAX_FEATURES = 1024  # features a row's register tile holds


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _encoder_input_fake(tokens, keep):
    return tokens.new_empty((tokens.shape[0], keep.shape[1] + 1, tokens.shape[2]))


def _encoder_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])
    ctx.num_patches = inputs[0].shape[1] - 1


def _encoder_backward(ctx, dv):
    (keep,) = ctx.saved_tensors
    return encoder_input_backward(dv.contiguous(), keep, ctx.num_patches), None


@custom_op("mae_encoder_input", fake=_encoder_input_fake, backward=_encoder_backward,
           setup_context=_encoder_setup_context)
def encoder_input(tokens: Tensor, keep: Tensor) -> Tensor:
    """v (B, K+1, D) from tokens (B, P+1, D) and keep (B, K) int64 (rows any stride apart)."""
    b, p1, d = tokens.shape
    k = keep.shape[1]
    v = tokens.new_empty((b, k + 1, d))
    if b:
        _encoder_input_fwd_kernel[(b,)](tokens, keep, v, k, p1 - 1, d, keep.stride(0), BLOCK_P=BLOCK_P,
                                        BLOCK_D=_block_d(d))
    return v


def _encoder_input_backward_fake(dv, keep, num_patches):
    return dv.new_empty((dv.shape[0], num_patches + 1, dv.shape[2]))


@custom_op("mae_encoder_input_backward", fake=_encoder_input_backward_fake)
def encoder_input_backward(dv: Tensor, keep: Tensor, num_patches: int) -> Tensor:
    """dtokens (B, P+1, D) in dv's dtype of :func:`encoder_input`, P = ``num_patches``."""
    b, _, d = dv.shape
    dtokens = dv.new_empty((b, num_patches + 1, d))
    if b:
        _encoder_input_bwd_kernel[(b,)](dv, keep, dtokens, keep.shape[1], num_patches, d, keep.stride(0),
                                        BLOCK_P=BLOCK_P, BLOCK_J=BLOCK_J, BLOCK_D=_block_d(d))
    return dtokens


def _decoder_input_fake(latent, keep, token, pos, num_patches):
    b, _, d = latent.shape
    dtype = torch.promote_types(latent.dtype, token.dtype)
    if pos is not None:
        dtype = torch.promote_types(dtype, pos.dtype)
    return latent.new_empty((b, num_patches + 1, d), dtype=dtype)


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


@custom_op("mae_decoder_input", fake=_decoder_input_fake, backward=_backward, setup_context=_setup_context)
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


def _decoder_input_backward_fake(dx, keep, latent_dtype):
    b, p1, d = dx.shape
    return (dx.new_empty((b, keep.shape[1] + 1, d), dtype=latent_dtype), dx.new_empty((d,), dtype=torch.float32),
            dx.new_empty((p1, d), dtype=torch.float32))


@custom_op("mae_decoder_input_backward", fake=_decoder_input_backward_fake)
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
    split_sum(part, dtoken)
    return dlatent, dtoken, dpos


def _check_keep(b: int, keep: Tensor) -> None:
    if keep.dim() != 2 or keep.shape[0] != b or keep.dtype != torch.int64:
        raise ValueError(f"keep must be int64 of shape (B={b}, K), got {keep.dtype} {tuple(keep.shape)}")


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
           "decoder_input_backward", "MAX_FEATURES"]
