"""Triton kernels of the mLiT patch embedding (the encoder's ``embed``): the 3×3 patches, the
all-zero dummy patch, the linear projection (no bias) and the positional table in one launch
forward and two backward, instead of the patchify copy, the pad, autocast's two casts, the matmul
and the add (and their gradients: the matmul, the casts, the batch sum).

    tokens[b, n] = patch(b, n) Wᵀ + pos[n]      n < 144: patch n of image b, values (py, px, c);
                                                n = 144: the dummy patch (zeros)

* ``_embed_fwd_kernel`` — one program per BLOCK_T tokens of the flattened (B · 145) rows: gathers
  each token's 27 pixels from the image (B, C, H, W), one fp32 rank-1 update of the tile per
  pixel value (x Wᵀ), + pos[n]; tokens in the promoted dtype of W and pos (fp32 under autocast).
* ``_embed_bwd_kernel`` — one program per position n: dpos[n] = Σ_b dtokens[b, n] and the partial
  dW_n = Σ_b dtokens[b, n]ᵀ patch(b, n), images BLOCK_B at a time (fixed order);
* then the ordered split sum (:mod:`mlit_kernels.common.split_sum`): dW = Σ_n dW_n in position
  order (the weight's dtype).

No atomics, no host reads: bitwise reproducible and capturable. The pixels get no gradient.
"""

from __future__ import annotations

import triton
import triton.language as tl

BLOCK_T = 16  # tokens a forward program embeds (32: the int64 addresses of a 32 × 256 tile spill on sm_90)
BLOCK_B = 16  # images a backward step sums
K_PAD = 32  # the patch's 27 values padded for the backward's tl.dot


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
