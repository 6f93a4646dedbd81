"""The augmentation family's descriptor (Triton-free): :data:`FAMILY`."""

from __future__ import annotations

import torch

from ..common.family import Family

#: Pixel values allowed to differ from the torch path: a bilinear sample that lands on a .5 rounds
#: either way with another fused multiply-add order (Triton 3.8's interpreter rounds tl.fma twice;
#: a GPU's grid_sample has its own ties).
PIXEL_FRACTION = 2e-3


def _ramp_images(b: int, size: int) -> torch.Tensor:
    """uint8 (b, 3, size, size): channel 0 = 8·column, 1 = 8·row, 2 = 128: a crop box moved by one
    source pixel changes some output by about 7 levels (a rounding tie by 1)."""
    ramp = torch.arange(size) * 8
    image = torch.stack([ramp.expand(size, size), ramp[:, None].expand(size, size), torch.full((size, size), 128)])
    return image.to(torch.uint8).expand(b, 3, size, size).contiguous()


def check(shape, dtype: torch.dtype, device: torch.device) -> dict[str, tuple[float, float]]:
    """The training transform of B ramp images (crop, flip, resize only: no crop box may move) and
    of B noisy images through a policy that applies every op (fraction of differing values), by the
    kernels and the torch path from the same draws. ``dtype`` is the output's (fp32 only)."""
    from .ops import fused_train_transform
    from .reference import DRAWS, OPS, policy_tables, train_transform

    b, source, size = shape["B"], shape["H"], shape["S"]
    g = torch.Generator().manual_seed(b * 100 + source)
    policy = tuple(((op, 1.0, 5), (OPS[(i + 5) % len(OPS)], 0.5, 3)) for i, op in enumerate(OPS))
    noisy = (torch.rand(b, 3, source, source, generator=g) * 255).round().to(torch.uint8)
    errors = {}
    for name, images, tables in (("crop boxes moved", _ramp_images(b, source), None),
                                 ("values differing, every op", noisy, policy_tables(policy, size, device))):
        u = torch.rand(b, DRAWS, generator=g).to(device)
        images = images.to(device)
        got = fused_train_transform(images, u, size, (0.5, 1.0), 0.5, tables)
        want = train_transform(images, u, size, (0.5, 1.0), 0.5, tables)
        diff = ((got - want).abs() * 127.5).round()
        if tables is None:
            errors[name] = (float((diff[:, :2].flatten(1).amax(1) >= 2).sum()), 0.0)
        else:
            errors[name] = (float((diff > 0).float().mean()), PIXEL_FRACTION)
    return errors


FAMILY = Family(
    name="augment",
    module=__name__,
    summary="the training augmentation: resize + random resized crop + flip, AutoAugment, normalise",
    ops=("mlit::augment_train",),
    sources=("mlit_kernels.augment.kernels", "mlit_kernels.augment.ops", "mlit_kernels.augment.crop_ratio"),
    kernels={"_crop_kernel": None, "_op_kernel": None},
    launches={"eval": 3},
    dtypes=(torch.float32,),
    limits="uint8 images (B, 3, H, W) no larger than the output's size × size (no antialiasing)",
    check=check,
    small_shapes=({"B": 4, "H": 32, "S": 36},),
    gpu_shapes=({"B": 1000, "H": 32, "S": 36},),
)

__all__ = ["FAMILY", "check", "PIXEL_FRACTION"]
