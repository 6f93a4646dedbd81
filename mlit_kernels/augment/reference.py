"""The augmentation's training transform in plain PyTorch: the oracle of
:mod:`mlit_kernels.augment`'s kernels and what the "reference" backend runs.

Resize to size x size (bilinear) -> random resized crop (torchvision's sampling: 10 tries, then the
whole image) -> horizontal flip: one affine map, sampled once with bilinear interpolation (no double
interpolation), then rounded to the 0..255 grid. Then AutoAugment (Cubuk et al. 2019): one
sub-policy per image from the policy tables, each of its two ops applied with its probability and
magnitude (signed ops get a random sign), with torchvision's uint8 semantics on integer-valued float
images (nearest-neighbour geometry with black fill, truncating blends, per-channel
equalize/autocontrast). Last, normalise with mean 0.5 and std 0.5. Every op is computed for the
whole batch with per-sample parameters and selected with masks (~400 small kernels); no Python loop
over images and no host read of a device value; every random choice comes from the uniforms
(B, 28) the caller draws.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .crop_ratio import LOG_RATIO, exp_taylor

OPS = (
    "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate",
    "Brightness", "Color", "Contrast", "Sharpness",
    "Posterize", "Solarize", "AutoContrast", "Equalize", "Invert",
)
_GEOMETRIC = OPS[:5]
_BLEND = OPS[5:9]
_SIGNED = OPS[:9]
NO_OP = -1  # op index meaning "leave the image unchanged"

def magnitude_bins(size: int) -> torch.Tensor:
    """(len(OPS), 10) magnitude of each op at bins 0..9 for size x size images (torchvision's table)."""
    ten = lambda hi: torch.linspace(0.0, hi, 10)  # noqa: E731
    rows = {
        "ShearX": ten(0.3), "ShearY": ten(0.3),
        "TranslateX": ten(150.0 / 331.0 * size), "TranslateY": ten(150.0 / 331.0 * size),
        "Rotate": ten(30.0),
        "Brightness": ten(0.9), "Color": ten(0.9), "Contrast": ten(0.9), "Sharpness": ten(0.9),
        "Posterize": 8 - (torch.arange(10) / (9 / 4)).round(),
        "Solarize": torch.linspace(255.0, 0.0, 10),
    }
    return torch.stack([rows.get(op, torch.zeros(10)) for op in OPS])


def _family(op: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
    """(B,) bool: op index lies in ``names``, a contiguous run of OPS."""
    return (op >= OPS.index(names[0])) & (op <= OPS.index(names[-1]))


def affine_grid(theta: tuple[torch.Tensor, ...], height: int, width: int) -> torch.Tensor:
    """(B, height, width, 2) grid for grid_sample (align_corners=False) of per-image affine maps.

    theta: six (B,) tensors a, b, c, d, e, f with source = (a x + b y + c, d x + e y + f) in
    normalised coordinates (-1..1 across the image's outer edges).
    """
    device = theta[0].device
    xs = (torch.arange(width, device=device) * 2 + 1) / width - 1
    ys = ((torch.arange(height, device=device) * 2 + 1) / height - 1)[:, None]
    a, b, c, d, e, f = (t[:, None, None] for t in theta)
    return torch.stack([a * xs + b * ys + c, d * xs + e * ys + f], dim=-1)


def _geometric(x: torch.Tensor, op: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Shear (pivot: top-left corner), integer translate, rotate (about the centre); nearest, fill 0."""
    _, _, H, W = x.shape
    zero = torch.zeros_like(m)
    rotate = op == OPS.index("Rotate")
    rad = torch.where(rotate, m, zero) * (math.pi / 180)
    cos, sin = torch.cos(rad), torch.sin(rad)
    shear_x = torch.where(op == OPS.index("ShearX"), m, zero)
    shear_y = torch.where(op == OPS.index("ShearY"), m, zero)
    shift_x = torch.where(op == OPS.index("TranslateX"), m.trunc(), zero)
    shift_y = torch.where(op == OPS.index("TranslateY"), m.trunc(), zero)
    # pixel map (corner origin): src = [[cos, -sin], [sin, cos]] about the centre for Rotate,
    # [[1, shear_x], [shear_y, 1]] for ShearX/Y, dst - shift for TranslateX/Y; here in normalised units
    theta = (cos, torch.where(rotate, -sin, shear_x) * (H / W), shear_x * (H / W) - 2 * shift_x / W,
             torch.where(rotate, sin, shear_y) * (W / H), cos, shear_y * (W / H) - 2 * shift_y / H)
    out = F.grid_sample(x, affine_grid(theta, H, W), mode="nearest", padding_mode="zeros", align_corners=False)
    return torch.where(_family(op, _GEOMETRIC)[:, None, None, None], out, x)


def _blend(x: torch.Tensor, op: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Brightness/Color/Contrast/Sharpness: floor(clamp((1+m) x - m degenerate, 0, 255))."""
    r, g, b = x.unbind(1)
    grey = (0.2989 * r + 0.587 * g + 0.114 * b).floor()[:, None]
    # sharpness: 3x3 smoothing [[1,1,1],[1,5,1],[1,1,1]] / 13 (a sum of integers / 13 is never a rounding tie)
    rows = x[..., :-2] + x[..., 1:-1] + x[..., 2:]
    box = rows[..., :-2, :] + rows[..., 1:-1, :] + rows[..., 2:, :]
    blurred = x.clone()  # borders keep their pixels, as in torchvision/PIL
    blurred[..., 1:-1, 1:-1] = ((box + 4 * x[..., 1:-1, 1:-1]) / 13).round()
    sel = lambda name: (op == OPS.index(name))[:, None, None, None]  # noqa: E731
    degenerate = torch.where(sel("Brightness"), torch.zeros_like(x),
                             torch.where(sel("Color"), grey,
                                         torch.where(sel("Contrast"), grey.mean((1, 2, 3), keepdim=True), blurred)))
    m4 = torch.where(_family(op, _BLEND), m, 0.0)[:, None, None, None]  # m = 0 returns x exactly
    return ((1 + m4) * x + (-m4) * degenerate).clamp(0, 255).floor()


def _lookup(x: torch.Tensor, op: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Posterize/Solarize/AutoContrast/Equalize/Invert as one per-image, per-channel 256-entry table."""
    B, C, H, W = x.shape
    index = x.long().view(B, C, H * W)
    v = torch.arange(256, dtype=x.dtype, device=x.device).expand(B, C, 256)
    m3 = m[:, None, None]
    step = 2 ** (8 - m3.trunc().clamp(0, 8))
    posterize = (v / step).floor() * step
    solarize = torch.where(v >= m3, 255 - v, v)
    lo, hi = x.amin((2, 3))[..., None], x.amax((2, 3))[..., None]
    flat = hi == lo
    autocontrast = torch.where(flat, v, ((v - lo) * (255 / torch.where(flat, 1, hi - lo))).clamp(0, 255).floor())
    ones = torch.ones(1, 1, 1, dtype=x.dtype, device=x.device).expand_as(index)
    hist = torch.zeros(B, C, 256, dtype=x.dtype, device=x.device).scatter_add_(2, index, ones)
    last = (H * W - hist.gather(2, hi.long())).div(255).floor()  # pixels not at the top level, / 255
    cdf = ((hist.cumsum(2) + (last / 2).floor()) / last.clamp(min=1)).floor()
    equalize = torch.where(last == 0, v, F.pad(cdf, (1, 0))[..., :-1].clamp(0, 255))
    table = v
    for name, t in (("Posterize", posterize), ("Solarize", solarize), ("AutoContrast", autocontrast),
                    ("Equalize", equalize), ("Invert", 255 - v)):
        table = torch.where((op == OPS.index(name))[:, None, None], t, table)
    return table.gather(2, index).view(B, C, H, W)


def apply_ops(x: torch.Tensor, op: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """Apply op ``OPS[op[i]]`` with signed ``magnitude[i]`` to image i (``NO_OP``: unchanged).

    x: float (B, 3, H, W) holding integers 0..255; op: int64 (B,); magnitude: float (B,)
    (shear factor, pixels, degrees, enhance delta, bits or threshold, as in ``magnitude_bins``).
    Returns float (B, 3, H, W) holding integers 0..255.
    """
    return _lookup(_blend(_geometric(x, op, magnitude), op, magnitude), op, magnitude)


DRAWS = 28  # uniforms per image: 10 areas, 10 ratios, 2 offsets, flip, sub-policy, 2 gates, 2 signs


def crop_flip_grid(u: torch.Tensor, size: int, crop_scale: tuple[float, float], hflip: float) -> torch.Tensor:
    """(B, size, size, 2) sampling grid of resize -> random resized crop -> flip, from uniforms u (B, 28)."""
    S, (lo, hi) = size, crop_scale
    area = S * S * (lo + (hi - lo) * u[:, 0:10])
    ratio = exp_taylor(LOG_RATIO[0] + LOG_RATIO[1] * u[:, 10:20])
    w, h = (area * ratio).sqrt().round(), (area / ratio).sqrt().round()
    fits = (w >= 1) & (w <= S) & (h >= 1) & (h <= S)
    tries = torch.arange(10, device=u.device)
    first = torch.where(fits, tries, 10).amin(1, keepdim=True)  # the first try that fits, as torchvision
    found = first[:, 0] < 10
    first = first.clamp(max=9)
    w = torch.where(found, w.gather(1, first)[:, 0], S)  # none fits: the whole image
    h = torch.where(found, h.gather(1, first)[:, 0], S)
    top, left = (u[:, 20] * (S - h + 1)).floor(), (u[:, 21] * (S - w + 1)).floor()
    sign = torch.where(u[:, 22] < hflip, -1.0, 1.0)
    zero = torch.zeros_like(w)
    return affine_grid((sign * w / S, zero, (2 * left + w) / S - 1, zero, h / S, (2 * top + h) / S - 1), S, S)


def autoaugment(x: torch.Tensor, u: torch.Tensor, tables: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """One uniformly drawn sub-policy per image; its two ops in order, each gated by its probability.

    x: float (B, 3, H, W) holding integers 0..255; u: uniforms (B, 28); tables: ``policy_tables``
    (its cos / sin table is the kernels').
    """
    ops, probs, mags, signed, _ = tables
    sub = (u[:, 23] * len(ops)).long().clamp(max=len(ops) - 1)
    for k in range(2):
        op = torch.where(u[:, 24 + k] < probs[sub, k], ops[sub, k], NO_OP)
        negative = signed[sub, k] & (u[:, 26 + k] < 0.5)
        x = apply_ops(x, op, torch.where(negative, -mags[sub, k], mags[sub, k]))
    return x


def rotation_table(mags: torch.Tensor) -> torch.Tensor:
    """(n, 2, 2) cos and sin of each table magnitude read as degrees, computed as :func:`_geometric`
    computes them (the kernels use it for Rotate only)."""
    rad = mags * (math.pi / 180)
    return torch.stack([torch.cos(rad), torch.sin(rad)], dim=-1).contiguous()


def policy_tables(policy, size: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """op index, probability, magnitude (at ``size``) and signed flag of each (sub-policy, slot),
    4 x (25, 2), and the magnitudes' cos / sin (:func:`rotation_table`, (25, 2, 2), computed on
    ``device`` as :func:`_geometric` computes them there).

    Built on the CPU and copied once (no host read of a device value)."""
    ops = torch.tensor([[OPS.index(name) for name, _, _ in sub] for sub in policy])
    probs = torch.tensor([[p for _, p, _ in sub] for sub in policy], dtype=torch.float32)
    bins = torch.tensor([[b or 0 for _, _, b in sub] for sub in policy])
    signed = torch.tensor([[name in _SIGNED for name, _, _ in sub] for sub in policy])
    tables = tuple(t.to(device) for t in (ops, probs, magnitude_bins(size)[ops, bins], signed))
    return (*tables, rotation_table(tables[2]))


def train_transform(images: torch.Tensor, u: torch.Tensor, size: int, crop_scale: tuple[float, float],
                    hflip: float, tables: tuple[torch.Tensor, ...] | None) -> torch.Tensor:
    """uint8 (B, 3, H, W) + uniforms (B, 28) -> normalised float32 (B, 3, size, size); no RNG inside."""
    grid = crop_flip_grid(u, size, crop_scale, hflip)
    x = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False).round()
    if tables is not None:
        x = autoaugment(x, u, tables)
    return x / 127.5 - 1


__all__ = ["OPS", "NO_OP", "DRAWS", "magnitude_bins", "affine_grid", "apply_ops", "crop_flip_grid", "autoaugment",
           "rotation_table", "policy_tables", "train_transform"]
