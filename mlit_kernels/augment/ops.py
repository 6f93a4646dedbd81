"""The augmentation's training transform as a ``torch.library`` custom op over :mod:`.kernels`.

* ``mlit::augment_train(images, u, size, crop_low, crop_high, hflip, ops?, probs?, mags?, signed?, trig?)
  -> (B, 3, size, size) float32``: the crop kernel, then (with the policy tables) one op kernel per
  sub-policy slot. No autograd (the images are uint8); no host reads: capturable.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
from torch import Tensor

from ..common.custom_op import custom_op
from .crop_ratio import LOG_RATIO
from .kernels import _crop_kernel, _op_kernel
from .reference import DRAWS, rotation_table


def _launch_options(device: torch.device) -> dict:
    """No fused multiply-add on GPUs: the arithmetic must round as the torch path's."""
    return {"enable_fp_fusion": False} if device.type == "cuda" else {}


def _augment_train_fake(images, u, size, crop_low, crop_high, hflip, ops, probs, mags, signed, trig):
    return images.new_empty((images.shape[0], 3, size, size), dtype=torch.float32)


@custom_op("augment_train", fake=_augment_train_fake)
def augment_train(images: Tensor, u: Tensor, size: int, crop_low: float, crop_high: float, hflip: float,
                  ops: Optional[Tensor], probs: Optional[Tensor], mags: Optional[Tensor], signed: Optional[Tensor],
                  trig: Optional[Tensor]) -> Tensor:
    """uint8 (B, 3, H, W) contiguous + uniforms (B, 28) → normalised float32 (B, 3, size, size); the
    policy tables all given (AutoAugment) or all None."""
    B, _, H, W = images.shape
    block = triton.next_power_of_2(size * size)
    opts = _launch_options(images.device)
    out = torch.empty(B, 3, size, size, dtype=torch.float32, device=images.device)
    cropped = out if ops is None else torch.empty(B, 3, size, size, dtype=torch.uint8, device=images.device)
    _crop_kernel[(B,)](images, u, cropped, H, W, crop_low, crop_high - crop_low, *LOG_RATIO, hflip,
                       S=size, D=u.shape[1], NORMALISE=ops is None, BLOCK=block, **opts)
    if ops is None:
        return out
    first = torch.empty_like(cropped)
    for slot, (src, dst) in enumerate(((cropped, first), (first, out))):
        _op_kernel[(B,)](src, u, ops, probs, mags, signed, trig, dst, ops.shape[0], SLOT=slot, S=size,
                         D=u.shape[1], NORMALISE=slot == 1, BLOCK=block, **opts)
    return out


def fused_train_transform(images: Tensor, u: Tensor, size: int, crop_scale: tuple[float, float], hflip: float,
                          tables: tuple[Tensor, ...] | None) -> Tensor:
    """:func:`mlit_kernels.augment.reference.train_transform` by the kernels: uint8 (B, 3, H, W) +
    uniforms (B, 28) → normalised float32 (B, 3, size, size); tables: ``policy_tables`` or None."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be uint8 (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    if u.shape != (images.shape[0], DRAWS) or u.dtype != torch.float32:
        raise ValueError(f"u must be float32 ({images.shape[0]}, {DRAWS}), got {u.dtype} {tuple(u.shape)}")
    lo, hi = crop_scale
    return augment_train(images.contiguous(), u.contiguous(), int(size), float(lo), float(hi), float(hflip),
                         *(tables if tables is not None else (None,) * 5))


def fused_apply_ops(x: Tensor, op: Tensor, magnitude: Tensor) -> Tensor:
    """:func:`mlit_kernels.augment.reference.apply_ops` through ``_op_kernel`` (the tests' view of
    one op at a time): image i gets op ``op[i]`` (NO_OP = -1: none) with signed ``magnitude[i]``;
    x float (B, 3, S, S) of integers."""
    B, _, S, _ = x.shape
    device = x.device
    ops = torch.stack([op.clamp(min=0), torch.zeros_like(op)], 1).to(device)
    probs = torch.stack([(op >= 0).float(), torch.zeros(B, device=op.device)], 1).to(device)
    mags = torch.stack([magnitude.float(), torch.zeros(B, device=op.device)], 1).to(device)
    signed = torch.zeros(B, 2, dtype=torch.bool, device=device)
    u = torch.zeros(B, DRAWS, device=device)
    u[:, 23] = (torch.arange(B, device=device) + 0.5) / B  # image i draws sub-policy i
    out = torch.empty(B, 3, S, S, dtype=torch.uint8, device=device)
    _op_kernel[(B,)](x.to(torch.uint8).contiguous(), u, ops, probs, mags, signed, rotation_table(mags), out, B,
                     SLOT=0, S=S, D=DRAWS, NORMALISE=False, BLOCK=triton.next_power_of_2(S * S),
                     **_launch_options(device))
    return out.float()


__all__ = ["augment_train", "fused_train_transform", "fused_apply_ops"]
