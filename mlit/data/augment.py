"""Batched augmentation on the images' device, every image with its own random draw: the
:class:`GPUAugment` the data loaders run, and the AutoAugment policies (Cubuk et al. 2019, the
CIFAR10 and SVHN policies as in torchvision).

Training: resize + random resized crop + flip + AutoAugment + normalise; evaluation: bilinear
resize, round, normalise. The training transform is the augmentation kernel family
(:mod:`mlit_kernels.augment`): the Triton kernels (three launches: crop + flip + resize, then one
kernel per sub-policy slot) or the torch path (its reference), one semantics. The random draws
(B, 28) come from torch's RNG on the images' device, so both are seeded alike and safe inside a
CUDA graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mlit_kernels.augment import DRAWS, FAMILY, policy_tables, train_transform, train_transform_reference
from mlit_kernels.common.clearance import BACKENDS, uses_triton

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


class GPUAugment:
    """Batched per-sample augmentation: uint8 (B, 3, H, W) -> float32 (B, 3, size, size) in [-1, 1].

    train: resize + random resized crop (``crop_scale``, ratio 3/4..4/3) + flip (p = ``hflip``)
    + AutoAugment (``autoaugment``: "cifar10", "svhn" or None) + normalise (mean 0.5, std 0.5).
    train=False: bilinear resize + normalise only (deterministic). Inputs should be no larger than
    ``size`` (no antialiasing). Randomness: torch's RNG of the images' device, or ``generator``.
    backend: "triton" (the grouped kernels of :mod:`mlit_kernels.augment`, 3 launches + the draw),
    "reference" (its torch path) or "auto" (the kernels for CUDA images once cleared).
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
        self._transform = (torch.compile(train_transform_reference, dynamic=True) if compile
                           else train_transform_reference)
        self._tables: dict = {}  # device → policy tables

    def __repr__(self) -> str:
        return (f"GPUAugment(train={self.train}, size={self.size}, crop_scale={self.crop_scale}, "
                f"hflip={self.hflip}, autoaugment={self.autoaugment!r}, backend={self.backend!r})")

    def uses_triton(self, device: torch.device) -> bool:
        """Whether a training call on ``device`` runs the kernels (evaluation never does)."""
        return self.train and uses_triton(FAMILY, self.backend, device)

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
        u = torch.rand(len(images), DRAWS, device=images.device, generator=generator)
        tables = self._policy_tables(images.device)
        if self.uses_triton(images.device):
            return train_transform(images, u, self.size, self.crop_scale, self.hflip, tables, backend="triton")
        return self._transform(images, u, self.size, self.crop_scale, self.hflip, tables)

    def _policy_tables(self, device: torch.device) -> tuple[torch.Tensor, ...] | None:
        """``policy_tables`` on ``device`` (built once per device)."""
        if self.policy is None:
            return None
        if device not in self._tables:
            self._tables[device] = policy_tables(self.policy, self.size, device)
        return self._tables[device]
