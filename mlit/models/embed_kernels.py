"""Triton kernels of the mLiT patch embedding (:meth:`mlit.models.encoder.MLiTEncoder.embed`): the
3×3 patches, the all-zero dummy patch, the linear projection (no bias) and the positional table
in one launch forward and two backward, instead of the patchify copy, the pad, autocast's two
casts, the matmul and the add (and their gradients: the matmul, the casts, the batch sum).

    tokens[b, n] = patch(b, n) Wᵀ + pos[n]      n < 144: patch n of image b, values (py, px, c);
                                                n = 144: the dummy patch (zeros)

* ``_embed_fwd_kernel`` — one program per BLOCK_T tokens of the flattened (B · 145) rows: gathers
  each token's 27 pixels from the image (B, C, H, W), one fp32 rank-1 update of the tile per
  pixel value (x Wᵀ), + pos[n]; tokens in the promoted dtype of W and pos (fp32 under autocast).
* ``_embed_bwd_kernel`` — one program per position n: dpos[n] = Σ_b dtokens[b, n] and the partial
  dW_n = Σ_b dtokens[b, n]ᵀ patch(b, n), images BLOCK_B at a time (fixed order);
* ``_embed_reduce_kernel`` — dW = Σ_n dW_n in position order (the weight's dtype).

No atomics, no host reads: bitwise reproducible and capturable. The pixels get no gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_T = 16  # tokens a forward program embeds (32: the int64 addresses of a 32 × 256 tile spill on sm_90)
BLOCK_B = 16  # images a backward step sums
K_PAD = 32  # the patch's 27 values padded for the backward's tl.dot
REDUCE_BLOCK = 1024


@triton.jit
def _patch_values(img_ptr, b, n, ok, C, H, W, P: tl.constexpr, K_PAD: tl.constexpr):
    """Patch values (len(b), K_PAD) fp32 of tokens (b, n): image b's patch n in (py, px, c) order,
    zero for the dummy patch (n = number of patches), padding and ``ok`` false."""
    j = tl.arange(0, K_PAD)
    c = j % C
    px = (j // C) % P
    py = j // (C * P)
    per_row = W // P
    num_patches = (H // P) * per_row
    y = (n // per_row)[:, None] * P + py[None, :]
    x = (n % per_row)[:, None] * P + px[None, :]
    mask = (ok & (n < num_patches))[:, None] & (j < C * P * P)[None, :]
    offs = ((b[:, None].to(tl.int64) * C + c[None, :]) * H + y) * W + x
    return tl.load(img_ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _embed_fwd_kernel(img_ptr, w_ptr, pos_ptr, out_ptr, B, H, W, M, C: tl.constexpr, P: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr):
    """tokens (B, n_tok, M) for BLOCK_T flattened token rows; W (M, C·P·P) row-major, pos (n_tok, M).
    The C·P·P values a patch has are taken one at a time (a rank-1 update each, fp32)."""
    per_row = W // P
    num_patches = (H // P) * per_row
    n_tok = num_patches + 1
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = rows < B * n_tok
    b = rows // n_tok
    n = rows % n_tok
    is_patch = ok & (n < num_patches)
    top = (n // per_row) * P
    left = (n % per_row) * P
    o = tl.arange(0, BLOCK_M)
    o_ok = o < M
    tokens = tl.zeros((BLOCK_T, BLOCK_M), dtype=tl.float32)
    for j in range(C * P * P):  # value j of a patch: (py, px, c); a loop, not unrolled (hoisted loads spill)
        offs = ((b.to(tl.int64) * C + j % C) * H + top + j // (C * P)) * W + left + (j // C) % P
        value = tl.load(img_ptr + offs, mask=is_patch, other=0.0).to(tl.float32)
        weight = tl.load(w_ptr + o * (C * P * P) + j, mask=o_ok, other=0.0).to(tl.float32)
        tokens += value[:, None] * weight[None, :]
    mask = ok[:, None] & o_ok[None, :]
    tokens += tl.load(pos_ptr + n[:, None] * M + o[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * M + o[None, :], tokens.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _embed_bwd_kernel(grad_ptr, img_ptr, dpos_ptr, part_ptr, B, C, H, W, M, P: tl.constexpr, BLOCK_B: tl.constexpr,
                      BLOCK_M: tl.constexpr, K_PAD: tl.constexpr):
    """Program n: dpos[n] (M,) and the partial dW_n (M, C·P·P) fp32 into part[n], summed over the
    B images BLOCK_B at a time."""
    n = tl.program_id(0)
    n_tok = (H // P) * (W // P) + 1
    o = tl.arange(0, BLOCK_M)
    o_ok = o < M
    k = C * P * P
    dpos = tl.zeros((BLOCK_M,), dtype=tl.float32)
    dw = tl.zeros((K_PAD, BLOCK_M), dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        b_ok = b < B
        g = tl.load(grad_ptr + (b[:, None].to(tl.int64) * n_tok + n) * M + o[None, :],
                    mask=b_ok[:, None] & o_ok[None, :], other=0.0).to(tl.float32)
        dpos += tl.sum(g, axis=0)
        patch = _patch_values(img_ptr, b, n + 0 * b, b_ok, C, H, W, P, K_PAD)
        dw = tl.dot(tl.trans(patch), g, dw, input_precision="ieee")
    tl.store(dpos_ptr + n * M + o, dpos, mask=o_ok)
    j = tl.arange(0, K_PAD)
    tl.store(part_ptr + n.to(tl.int64) * M * k + o[None, :] * k + j[:, None], dw,
             mask=(j < k)[:, None] & o_ok[None, :])


@triton.jit
def _embed_reduce_kernel(part_ptr, out_ptr, parts, total, BLOCK: tl.constexpr):
    """out[i] = Σ_p part[p, i], p in order (fp32), stored in out's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < total
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for p in range(parts):
        acc += tl.load(part_ptr + p * total + offs, mask=ok, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


def _tokens(images: Tensor, patch_size: int) -> int:
    return (images.shape[2] // patch_size) * (images.shape[3] // patch_size) + 1


@torch.library.custom_op("mlit::patch_embed", mutates_args=())
def patch_embed(images: Tensor, weight: Tensor, pos: Tensor, patch_size: int) -> Tensor:
    """tokens (B, patches + 1, m) = the patches (and the dummy) times weightᵀ + pos; images
    (B, C, H, W), weight (m, C·p·p), pos (patches + 1, m)."""
    b, c, h, w = images.shape
    m = weight.shape[0]
    n_tok = _tokens(images, patch_size)
    out = images.new_empty((b, n_tok, m), dtype=torch.promote_types(weight.dtype, pos.dtype))
    if out.numel():
        _embed_fwd_kernel[(triton.cdiv(b * n_tok, BLOCK_T),)](images, weight, pos, out, b, h, w, m, C=c, P=patch_size,
                                                              BLOCK_T=BLOCK_T, BLOCK_M=triton.next_power_of_2(m))
    return out


@patch_embed.register_fake
def _patch_embed_fake(images, weight, pos, patch_size):
    return images.new_empty((images.shape[0], _tokens(images, patch_size), weight.shape[0]),
                            dtype=torch.promote_types(weight.dtype, pos.dtype))


@torch.library.custom_op("mlit::patch_embed_backward", mutates_args=())
def patch_embed_backward(grad: Tensor, images: Tensor, weight: Tensor, pos: Tensor,
                         patch_size: int) -> tuple[Tensor, Tensor]:
    """(dweight in weight's dtype, dpos in pos's dtype) of :func:`patch_embed`."""
    b, c, h, w = images.shape
    m, k = weight.shape
    n_tok = _tokens(images, patch_size)
    dweight = torch.empty_like(weight)
    dpos_acc = torch.empty(n_tok, m, device=grad.device, dtype=torch.float32)
    part = torch.empty(n_tok, m * k, device=grad.device, dtype=torch.float32)
    _embed_bwd_kernel[(n_tok,)](grad, images, dpos_acc, part, b, c, h, w, m, P=patch_size, BLOCK_B=BLOCK_B,
                                BLOCK_M=triton.next_power_of_2(m), K_PAD=K_PAD)
    _embed_reduce_kernel[(triton.cdiv(m * k, REDUCE_BLOCK),)](part, dweight, n_tok, m * k, BLOCK=REDUCE_BLOCK)
    return dweight, dpos_acc.to(pos.dtype)


@patch_embed_backward.register_fake
def _patch_embed_backward_fake(grad, images, weight, pos, patch_size):
    return torch.empty_like(weight), torch.empty_like(pos)


def _setup_context(ctx, inputs, output):
    images, weight, pos, patch_size = inputs
    ctx.save_for_backward(images, weight, pos)
    ctx.patch_size = patch_size


def _backward(ctx, grad):
    images, weight, pos = ctx.saved_tensors
    dweight, dpos = patch_embed_backward(grad.contiguous(), images, weight, pos, ctx.patch_size)
    return None, dweight, dpos, None


patch_embed.register_autograd(_backward, setup_context=_setup_context)


def fused_patch_embed(images: Tensor, weight: Tensor, pos: Tensor, patch_size: int) -> Tensor:
    """:func:`patch_embed` on contiguous inputs; pos (1, patches + 1, m) or (patches + 1, m)."""
    if images.dim() != 4 or weight.shape[1] != images.shape[1] * patch_size * patch_size:
        raise ValueError(f"images (B, C, H, W) with weight (m, C·{patch_size}²) expected, got images "
                         f"{tuple(images.shape)}, weight {tuple(weight.shape)}")
    if weight.shape[0] > 256:
        raise ValueError(f"weight: at most 256 output features (one register tile a row), got {weight.shape[0]}")
    return patch_embed(images.contiguous(), weight.contiguous(), pos.reshape(pos.shape[-2:]).contiguous(),
                       patch_size)


__all__ = ["fused_patch_embed", "patch_embed", "patch_embed_backward"]
