"""Batched augmentation on the images' device, every image with its own random draw.

Training: resize to size x size (bilinear) -> random resized crop (torchvision's sampling: 10
tries, then the whole image) -> horizontal flip. These three are one affine map, sampled once
with bilinear interpolation (no double interpolation), then rounded to the 0..255 grid. Then
AutoAugment (Cubuk et al. 2019, the CIFAR10 or SVHN policy as in torchvision): one of the 25
sub-policies per image, each of its two ops applied with its probability and magnitude bin
(signed ops get a random sign). The ops follow torchvision's uint8 semantics on integer-valued
float images (nearest-neighbour geometry with black fill, truncating blends, per-channel
equalize/autocontrast). Last, normalise with mean 0.5 and std 0.5.
Evaluation: bilinear resize, round, normalise.

Two implementations of the training transform, one semantics: the torch path below (every op
computed for the whole batch with per-sample parameters and selected with masks; the reference,
~400 small kernels) and the Triton kernels of :mod:`mlit.data.augment_kernels` (three launches:
crop + flip + resize, then one kernel per sub-policy slot). Neither loops over images in Python
nor reads a device value on the host; the random draws (B, 28) come from torch's RNG on the
images' device, so both are seeded alike and safe inside a CUDA graph.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mlit_kernels.common.clearance import may_run

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

#: AutoAugment sub-policies ((op, probability, magnitude bin 0..9 or None), (op, p, bin)), as published.
POLICIES: dict[str, tuple[tuple[tuple[str, float, int | None], ...], ...]] = {
    "cifar10": (
        (("Invert", 0.1, None), ("Contrast", 0.2, 6)),
        (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
        (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)),
        (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
        (("AutoContrast", 0.5, None), ("Equalize", 0.9, None)),
        (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
        (("Color", 0.4, 3), ("Brightness", 0.6, 7)),
        (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
        (("Equalize", 0.6, None), ("Equalize", 0.5, None)),
        (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
        (("Color", 0.7, 7), ("TranslateX", 0.5, 8)),
        (("Equalize", 0.3, None), ("AutoContrast", 0.4, None)),
        (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)),
        (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
        (("Solarize", 0.5, 2), ("Invert", 0.0, None)),
        (("Equalize", 0.2, None), ("AutoContrast", 0.6, None)),
        (("Equalize", 0.2, None), ("Equalize", 0.6, None)),
        (("Color", 0.9, 9), ("Equalize", 0.6, None)),
        (("AutoContrast", 0.8, None), ("Solarize", 0.2, 8)),
        (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
        (("Solarize", 0.4, 5), ("AutoContrast", 0.9, None)),
        (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
        (("AutoContrast", 0.9, None), ("Solarize", 0.8, 3)),
        (("Equalize", 0.8, None), ("Invert", 0.1, None)),
        (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None)),
    ),
    "svhn": (
        (("ShearX", 0.9, 4), ("Invert", 0.2, None)),
        (("ShearY", 0.9, 8), ("Invert", 0.7, None)),
        (("Equalize", 0.6, None), ("Solarize", 0.6, 6)),
        (("Invert", 0.9, None), ("Equalize", 0.6, None)),
        (("Equalize", 0.6, None), ("Rotate", 0.9, 3)),
        (("ShearX", 0.9, 4), ("AutoContrast", 0.8, None)),
        (("ShearY", 0.9, 8), ("Invert", 0.4, None)),
        (("ShearY", 0.9, 5), ("Solarize", 0.2, 6)),
        (("Invert", 0.9, None), ("AutoContrast", 0.8, None)),
        (("Equalize", 0.6, None), ("Rotate", 0.9, 3)),
        (("ShearX", 0.9, 4), ("Solarize", 0.3, 3)),
        (("ShearY", 0.8, 8), ("Invert", 0.7, None)),
        (("Equalize", 0.9, None), ("TranslateY", 0.6, 6)),
        (("Invert", 0.9, None), ("Equalize", 0.6, None)),
        (("Contrast", 0.3, 3), ("Rotate", 0.8, 4)),
        (("Invert", 0.8, None), ("TranslateY", 0.0, 2)),
        (("ShearY", 0.7, 6), ("Solarize", 0.4, 8)),
        (("Invert", 0.6, None), ("Rotate", 0.8, 4)),
        (("ShearY", 0.3, 7), ("TranslateX", 0.9, 3)),
        (("ShearX", 0.1, 6), ("Invert", 0.6, None)),
        (("Solarize", 0.7, 2), ("TranslateY", 0.6, 7)),
        (("ShearY", 0.8, 4), ("Invert", 0.8, None)),
        (("ShearX", 0.7, 9), ("TranslateY", 0.8, 3)),
        (("ShearY", 0.8, 5), ("AutoContrast", 0.7, None)),
        (("ShearX", 0.7, 2), ("Invert", 0.1, None)),
    ),
}


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


_DRAWS = 28  # uniforms per image: 10 areas, 10 ratios, 2 offsets, flip, sub-policy, 2 gates, 2 signs


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

    x: float (B, 3, H, W) holding integers 0..255; u: uniforms (B, 28); tables: ``policy_tables``.
    """
    ops, probs, mags, signed = tables
    sub = (u[:, 23] * len(ops)).long().clamp(max=len(ops) - 1)
    for k in range(2):
        op = torch.where(u[:, 24 + k] < probs[sub, k], ops[sub, k], NO_OP)
        negative = signed[sub, k] & (u[:, 26 + k] < 0.5)
        x = apply_ops(x, op, torch.where(negative, -mags[sub, k], mags[sub, k]))
    return x


def policy_tables(policy, size: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """op index, probability, magnitude (at ``size``) and signed flag of each (sub-policy, slot): 4 x (25, 2).

    Built on the CPU and copied once (no host read of a device value)."""
    ops = torch.tensor([[OPS.index(name) for name, _, _ in sub] for sub in policy])
    probs = torch.tensor([[p for _, p, _ in sub] for sub in policy], dtype=torch.float32)
    bins = torch.tensor([[b or 0 for _, _, b in sub] for sub in policy])
    signed = torch.tensor([[name in _SIGNED for name, _, _ in sub] for sub in policy])
    mags = magnitude_bins(size)[ops, bins]
    return tuple(t.to(device) for t in (ops, probs, mags, signed))


def train_transform(images: torch.Tensor, u: torch.Tensor, size: int, crop_scale: tuple[float, float],
                    hflip: float, tables: tuple[torch.Tensor, ...] | None) -> torch.Tensor:
    """uint8 (B, 3, H, W) + uniforms (B, 28) -> normalised float32 (B, 3, size, size); no RNG inside."""
    grid = crop_flip_grid(u, size, crop_scale, hflip)
    x = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False).round()
    if tables is not None:
        x = autoaugment(x, u, tables)
    return x / 127.5 - 1


BACKENDS = ("auto", "reference", "triton")


class GPUAugment:
    """Batched per-sample augmentation: uint8 (B, 3, H, W) -> float32 (B, 3, size, size) in [-1, 1].

    train: resize + random resized crop (``crop_scale``, ratio 3/4..4/3) + flip (p = ``hflip``)
    + AutoAugment (``autoaugment``: "cifar10", "svhn" or None) + normalise (mean 0.5, std 0.5).
    train=False: bilinear resize + normalise only (deterministic). Inputs should be no larger than
    ``size`` (no antialiasing). Randomness: torch's RNG of the images' device, or ``generator``.
    backend: "triton" (the grouped kernels of :mod:`mlit.data.augment_kernels`, 3 launches + the
    draw), "reference" (the torch ops of this module) or "auto" (Triton for CUDA images).
    compile: run the torch path through torch.compile (the random draws stay outside, so seeding
    works the same).
    """

    def __init__(
        self,
        train: bool = True,
        size: int = 36,
        crop_scale: tuple[float, float] = (0.8, 1.0),
        hflip: float = 0.5,
        autoaugment: str | None = None,
        compile: bool = False,
        backend: str = "auto",
    ) -> None:
        if autoaugment is not None and autoaugment not in POLICIES:
            raise ValueError(f"unknown AutoAugment policy {autoaugment!r}; choose one of {', '.join(POLICIES)} or None")
        if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {crop_scale}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.train, self.size, self.crop_scale, self.hflip = train, size, tuple(crop_scale), hflip
        self.autoaugment = autoaugment
        self.policy = POLICIES[autoaugment] if autoaugment is not None else None
        self.backend = backend
        self._transform = torch.compile(train_transform, dynamic=True) if compile else train_transform
        self._tables: dict = {}  # device → policy tables; (device, "kernels") → with the rotation table

    def __repr__(self) -> str:
        return (f"GPUAugment(train={self.train}, size={self.size}, crop_scale={self.crop_scale}, "
                f"hflip={self.hflip}, autoaugment={self.autoaugment!r}, backend={self.backend!r})")

    def uses_triton(self, device: torch.device) -> bool:
        return self.train and (self.backend == "triton" or (
            self.backend == "auto" and torch.device(device).type == "cuda" and may_run("augment", device)))

    def prepare(self, device: str | torch.device) -> GPUAugment:
        """Put the policy tables on ``device`` now (a host-to-device copy), not in the first call."""
        self._policy_tables(torch.device(device))
        return self

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        if not self.train:
            x = images.float()
            if x.shape[-2:] != (self.size, self.size):
                x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False).round()
            return x / 127.5 - 1
        u = torch.rand(len(images), _DRAWS, device=images.device, generator=generator)
        tables = self._policy_tables(images.device)
        if self.uses_triton(images.device):
            from . import augment_kernels  # imported lazily: Triton kernels are built on import

            if tables is not None:
                tables = self._kernel_tables(images.device, augment_kernels.rotation_table)
            return augment_kernels.train_transform(images, u, self.size, self.crop_scale, self.hflip, tables)
        return self._transform(images, u, self.size, self.crop_scale, self.hflip, tables)

    def _policy_tables(self, device: torch.device) -> tuple[torch.Tensor, ...] | None:
        """``policy_tables`` on ``device`` (built once per device)."""
        if self.policy is None:
            return None
        if device not in self._tables:
            self._tables[device] = policy_tables(self.policy, self.size, device)
        return self._tables[device]

    def _kernel_tables(self, device: torch.device, rotation_table) -> tuple[torch.Tensor, ...]:
        """``policy_tables`` + the kernels' cos / sin table of the magnitudes (built once per device)."""
        key = (device, "kernels")
        if key not in self._tables:
            tables = self._policy_tables(device)
            self._tables[key] = (*tables, rotation_table(tables[2]))
        return self._tables[key]
