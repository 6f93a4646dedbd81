"""Triton kernels of the augmentation's training transform: three launches per call, no host sync.

The transform and its semantics are those of :mod:`mlit_kernels.augment.reference` (the torch
path, which stays the reference these kernels are tested against); here the work is grouped per
image:

* ``_crop_kernel`` — one program per image: the random resized crop (torchvision's 10 tries),
  the flip and the resize to size x size as one bilinear sample of the uint8 source, rounded to
  the 0..255 grid (uint8 out; or the normalised float when there is no AutoAugment).
* ``_op_kernel`` (launched once per sub-policy slot) — one program per image: the image's
  sub-policy and gate are read from the device draws and policy tables, and the one op it names
  is applied to the whole image: a nearest-neighbour affine warp (shear, translate, rotate), a
  per-pixel blend (brightness, colour, contrast, sharpness) or a per-channel lookup (posterize,
  solarize, autocontrast, equalize, invert). The second slot writes the normalised float.

Every random choice comes from the uniforms (B, 28) drawn by torch on the device, so the kernels
are deterministic, seeded by torch's RNG and safe inside a CUDA graph. Arithmetic follows the
torch path operation by operation (IEEE division and square root; the crop's aspect ratio
by the shared polynomial ``crop_ratio.exp_taylor``, not an exp, whose rounding differs by device), so the
two agree exactly where both compute in the same order: the bilinear and nearest-neighbour
samples use the fused multiply-adds torch's CPU grid_sample compiles to (tl.fma), everything else
rounds after each operation (no contraction: ``enable_fp_fusion=False`` on GPUs).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .crop_ratio import EXP_TAYLOR, LOG_RATIO

# Op indices (mlit_kernels.augment.reference.OPS; tests/augment/test_augment.py checks they agree), as constexprs: a
# compiled kernel may read only constexpr globals.
_SHEAR_X, _SHEAR_Y, _TRANSLATE_X, _TRANSLATE_Y, _ROTATE = (tl.constexpr(i) for i in range(0, 5))
_BRIGHTNESS, _COLOR, _CONTRAST, _SHARPNESS = (tl.constexpr(i) for i in range(5, 9))
_POSTERIZE, _SOLARIZE, _AUTOCONTRAST, _EQUALIZE, _INVERT = (tl.constexpr(i) for i in range(9, 14))
_EXP_C0, _EXP_C1, _EXP_C2, _EXP_C3, _EXP_C4, _EXP_C5, _EXP_C6, _EXP_C7, _EXP_C8 = (tl.constexpr(c) for c in EXP_TAYLOR)


@triton.jit
def _rint(x):
    """Round half to even, as torch.round."""
    f = tl.floor(x)
    d = x - f
    even = tl.where(f - 2.0 * tl.floor(f * 0.5) == 0.0, f, f + 1.0)
    return tl.where(d > 0.5, f + 1.0, tl.where(d < 0.5, f, even))


@triton.jit
def _exp_taylor(z):
    """exp(z) for |z| <= log(4/3), rounded as mlit.data.crop_ratio.exp_taylor rounds it (no tl.exp)."""
    p = z * _EXP_C8 + _EXP_C7
    p = p * z + _EXP_C6
    p = p * z + _EXP_C5
    p = p * z + _EXP_C4
    p = p * z + _EXP_C3
    p = p * z + _EXP_C2
    p = p * z + _EXP_C1
    return p * z + _EXP_C0


@triton.jit
def _unnormalize(coord, size):
    """grid_sample's pixel coordinate of a normalised one (align_corners=False), rounded as
    torch's CPU kernel rounds it: one fused multiply-add."""
    return tl.fma(coord + 1.0, size * 0.5, -0.5)


@triton.jit
def _store(out_ptr, offs, v, valid, NORMALISE: tl.constexpr):
    """Integer-valued float v → uint8, or the normalised float v / 127.5 − 1."""
    if NORMALISE:
        tl.store(out_ptr + offs, tl.div_rn(v, 127.5) - 1.0, mask=valid)
    else:
        tl.store(out_ptr + offs, v.to(tl.uint8), mask=valid)


@triton.jit
def _crop_kernel(src_ptr, u_ptr, out_ptr, H_in, W_in, scale_lo, scale_span, ratio_lo, ratio_span, hflip,
                 S: tl.constexpr, D: tl.constexpr, NORMALISE: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    u_row = u_ptr + b * D
    # -- the crop box: the first of 10 (area, ratio) tries that fits, else the whole image
    t = tl.arange(0, 16)
    tries = t < 10
    area = (S * S) * (scale_lo + scale_span * tl.load(u_row + t, mask=tries, other=0.0))
    ratio = _exp_taylor(ratio_lo + ratio_span * tl.load(u_row + 10 + t, mask=tries, other=0.0))
    w = _rint(tl.sqrt_rn(area * ratio))
    h = _rint(tl.sqrt_rn(tl.div_rn(area, ratio)))
    fits = tries & (w >= 1.0) & (w <= S) & (h >= 1.0) & (h <= S)
    first = tl.min(tl.where(fits, t, 10), axis=0)
    w = tl.where(first < 10, tl.sum(tl.where(t == first, w, 0.0), axis=0), S * 1.0)
    h = tl.where(first < 10, tl.sum(tl.where(t == first, h, 0.0), axis=0), S * 1.0)
    top = tl.floor(tl.load(u_row + 20) * (S - h + 1.0))
    left = tl.floor(tl.load(u_row + 21) * (S - w + 1.0))
    sign = tl.where(tl.load(u_row + 22) < hflip, -1.0, 1.0)
    # -- the affine map in normalised coordinates (as augment.crop_flip_grid), then grid_sample's
    #    bilinear sample with border padding (align_corners=False)
    a = tl.div_rn(sign * w, S * 1.0)
    c = tl.div_rn(2.0 * left + w, S * 1.0) - 1.0
    e = tl.div_rn(h, S * 1.0)
    f = tl.div_rn(2.0 * top + h, S * 1.0) - 1.0
    p = tl.arange(0, BLOCK)
    valid = p < S * S
    i, j = p // S, p % S
    xs = tl.div_rn((2 * j + 1).to(tl.float32), S * 1.0) - 1.0
    ys = tl.div_rn((2 * i + 1).to(tl.float32), S * 1.0) - 1.0
    x = _unnormalize(a * xs + c, W_in)
    y = _unnormalize(e * ys + f, H_in)
    x = tl.minimum(tl.maximum(x, 0.0), W_in - 1.0)
    y = tl.minimum(tl.maximum(y, 0.0), H_in - 1.0)
    x0, y0 = tl.floor(x), tl.floor(y)
    wx = x - x0
    wy = y - y0
    ex, sy = 1.0 - wx, 1.0 - wy
    xi, yi = x0.to(tl.int32), y0.to(tl.int32)
    has_e, has_s = valid & (xi + 1 < W_in), valid & (yi + 1 < H_in)
    for ch in tl.static_range(3):
        plane = src_ptr + (b * 3 + ch) * H_in * W_in
        v_nw = tl.load(plane + yi * W_in + xi, mask=valid, other=0).to(tl.float32)
        v_ne = tl.load(plane + yi * W_in + xi + 1, mask=has_e, other=0).to(tl.float32)
        v_sw = tl.load(plane + (yi + 1) * W_in + xi, mask=has_s, other=0).to(tl.float32)
        v_se = tl.load(plane + (yi + 1) * W_in + xi + 1, mask=has_e & has_s, other=0).to(tl.float32)
        v = tl.fma(v_se, wy * wx, tl.fma(v_sw, wy * ex, tl.fma(v_ne, sy * wx, v_nw * (sy * ex))))
        _store(out_ptr + (b * 3 + ch) * S * S, p, _rint(v), valid, NORMALISE)


@triton.jit
def _warp_channel(plane, ax, bx, cx, dy, ey, fy, xs, ys, valid, S: tl.constexpr):
    """Nearest-neighbour sample of one channel at the affine map, black outside."""
    x = _rint(_unnormalize(ax * xs + bx * ys + cx, S))
    y = _rint(_unnormalize(dy * xs + ey * ys + fy, S))
    inside = valid & (x >= 0.0) & (x < S) & (y >= 0.0) & (y < S)
    return tl.load(plane + y.to(tl.int32) * S + x.to(tl.int32), mask=inside, other=0).to(tl.float32)


@triton.jit
def _sharpen_channel(plane, v, i, j, valid, S: tl.constexpr):
    """The 3x3 [[1,1,1],[1,5,1],[1,1,1]] / 13 smoothing inside, the pixel itself on the border."""
    inner = valid & (i > 0) & (i < S - 1) & (j > 0) & (j < S - 1)
    box = tl.zeros_like(v)
    for di in tl.static_range(3):
        for dj in tl.static_range(3):
            box += tl.load(plane + (i + di - 1) * S + (j + dj - 1), mask=inner, other=0).to(tl.float32)
    return tl.where(inner, _rint(tl.div_rn(box + 4.0 * v, 13.0)), v)


@triton.jit
def _blend(v, degenerate, m):
    return tl.floor(tl.minimum(tl.maximum((1.0 + m) * v + (-m) * degenerate, 0.0), 255.0))


@triton.jit
def _equalize_channel(v, valid, BLOCK: tl.constexpr, NPIX: tl.constexpr):
    """torchvision's equalize of one channel (integer-valued float v): a 256-entry lookup."""
    vi = tl.where(valid, v, 0.0).to(tl.int32)
    hist = tl.histogram(vi, 256)
    bins = tl.arange(0, 256)
    hist = tl.where(bins == 0, hist - (BLOCK - NPIX), hist)  # padding lanes were counted as 0
    hi = tl.max(tl.where(valid, vi, 0), axis=0)
    last = (NPIX - tl.sum(tl.where(bins == hi, hist, 0), axis=0)) // 255
    cdf = (tl.cumsum(hist, 0) + last // 2) // tl.maximum(last, 1)
    lut = tl.minimum(tl.maximum(cdf, 0), 255).to(tl.float32)
    shifted = tl.gather(lut, tl.maximum(vi - 1, 0), 0)  # lut[v - 1]; 0 maps to 0
    return tl.where(last == 0, v, tl.where(vi == 0, 0.0, shifted))


@triton.jit
def _autocontrast_channel(v, valid):
    lo = tl.min(tl.where(valid, v, 255.0), axis=0)
    hi = tl.max(tl.where(valid, v, 0.0), axis=0)
    scale = tl.div_rn(1.0, tl.where(hi == lo, 1.0, hi - lo)) * 255.0  # torch's 255 / t is 255 * (1 / t)
    stretched = tl.floor(tl.minimum(tl.maximum((v - lo) * scale, 0.0), 255.0))
    return tl.where(hi == lo, v, stretched)


@triton.jit
def _op_kernel(x_ptr, u_ptr, ops_ptr, probs_ptr, mags_ptr, signed_ptr, trig_ptr, out_ptr, n_sub,
               SLOT: tl.constexpr, S: tl.constexpr, D: tl.constexpr, NORMALISE: tl.constexpr,
               BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    u_row = u_ptr + b * D
    # -- this image's op: sub-policy, probability gate, random sign (as augment.autoaugment)
    sub = tl.minimum(tl.floor(tl.load(u_row + 23) * n_sub).to(tl.int32), n_sub - 1)
    entry = sub * 2 + SLOT
    op = tl.where(tl.load(u_row + 24 + SLOT) < tl.load(probs_ptr + entry), tl.load(ops_ptr + entry).to(tl.int32), -1)
    negative = (tl.load(signed_ptr + entry) != 0) & (tl.load(u_row + 26 + SLOT) < 0.5)
    m = tl.where(negative, -tl.load(mags_ptr + entry), tl.load(mags_ptr + entry))
    p = tl.arange(0, BLOCK)
    valid = p < S * S
    i, j = p // S, p % S
    planes = x_ptr + b * 3 * S * S
    r = tl.load(planes + p, mask=valid, other=0).to(tl.float32)
    g = tl.load(planes + S * S + p, mask=valid, other=0).to(tl.float32)
    bl = tl.load(planes + 2 * S * S + p, mask=valid, other=0).to(tl.float32)
    if op < 0:
        pass
    elif op <= _ROTATE:  # one nearest-neighbour affine warp (augment._geometric)
        rotate = op == _ROTATE
        cos = tl.where(rotate, tl.load(trig_ptr + entry * 2), 1.0)
        sin = tl.where(rotate, tl.load(trig_ptr + entry * 2 + 1), 0.0)
        sin = tl.where(negative, -sin, sin)
        shear_x = tl.where(op == _SHEAR_X, m, 0.0)
        shear_y = tl.where(op == _SHEAR_Y, m, 0.0)
        shift_x = tl.where(op == _TRANSLATE_X, m.to(tl.int32).to(tl.float32), 0.0)
        shift_y = tl.where(op == _TRANSLATE_Y, m.to(tl.int32).to(tl.float32), 0.0)
        bx = tl.where(rotate, -sin, shear_x)
        cx = shear_x - tl.div_rn(2.0 * shift_x, S * 1.0)
        dy = tl.where(rotate, sin, shear_y)
        fy = shear_y - tl.div_rn(2.0 * shift_y, S * 1.0)
        xs = tl.div_rn((2 * j + 1).to(tl.float32), S * 1.0) - 1.0
        ys = tl.div_rn((2 * i + 1).to(tl.float32), S * 1.0) - 1.0
        r = _warp_channel(planes, cos, bx, cx, dy, cos, fy, xs, ys, valid, S)
        g = _warp_channel(planes + S * S, cos, bx, cx, dy, cos, fy, xs, ys, valid, S)
        bl = _warp_channel(planes + 2 * S * S, cos, bx, cx, dy, cos, fy, xs, ys, valid, S)
    elif op <= _CONTRAST:  # blends with black, the grey image, or the grey mean (augment._blend)
        grey = tl.floor(0.2989 * r + 0.587 * g + 0.114 * bl)
        if op == _BRIGHTNESS:
            grey = tl.zeros_like(grey)
        elif op == _CONTRAST:
            grey = tl.zeros_like(grey) + tl.div_rn(tl.sum(tl.where(valid, grey, 0.0), axis=0), S * S * 1.0)
        r, g, bl = _blend(r, grey, m), _blend(g, grey, m), _blend(bl, grey, m)
    elif op == _SHARPNESS:
        r = _blend(r, _sharpen_channel(planes, r, i, j, valid, S), m)
        g = _blend(g, _sharpen_channel(planes + S * S, g, i, j, valid, S), m)
        bl = _blend(bl, _sharpen_channel(planes + 2 * S * S, bl, i, j, valid, S), m)
    elif op == _POSTERIZE:
        step = (1 << (8 - tl.minimum(tl.maximum(m.to(tl.int32), 0), 8))).to(tl.float32)
        r = tl.floor(tl.div_rn(r, step)) * step
        g = tl.floor(tl.div_rn(g, step)) * step
        bl = tl.floor(tl.div_rn(bl, step)) * step
    elif op == _SOLARIZE:
        r, g, bl = tl.where(r >= m, 255.0 - r, r), tl.where(g >= m, 255.0 - g, g), tl.where(bl >= m, 255.0 - bl, bl)
    elif op == _AUTOCONTRAST:
        r, g, bl = _autocontrast_channel(r, valid), _autocontrast_channel(g, valid), _autocontrast_channel(bl, valid)
    elif op == _EQUALIZE:
        r = _equalize_channel(r, valid, BLOCK, S * S)
        g = _equalize_channel(g, valid, BLOCK, S * S)
        bl = _equalize_channel(bl, valid, BLOCK, S * S)
    else:  # invert
        r, g, bl = 255.0 - r, 255.0 - g, 255.0 - bl
    out = out_ptr + b * 3 * S * S
    _store(out, p, r, valid, NORMALISE)
    _store(out + S * S, p, g, valid, NORMALISE)
    _store(out + 2 * S * S, p, bl, valid, NORMALISE)
