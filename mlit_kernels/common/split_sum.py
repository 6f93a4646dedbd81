"""The ordered split sum: ``out[p] = Σ_s part[s, p]`` over the splits s in order, in fp32, stored in
out's dtype — the last launch of every backward whose weight gradients are summed by several long
programs (each writing one row of partial sums; no float atomics). The order of the additions
depends on the shape alone, so the sum is the same bit for bit every time.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SUM_BLOCK = 1024  # entries a program adds over the splits


@triton.jit
def _split_sum_kernel(part_ptr, out_ptr, splits, total, BLOCK: tl.constexpr):
    """out (total,) = Σ_s part[s, :] for part (splits, total) fp32 contiguous, s in order."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < total
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    ptrs = part_ptr + offs.to(tl.int64)
    for _ in range(splits):
        acc += tl.load(ptrs, mask=ok, other=0.0)
        ptrs += total
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


def split_sum(part: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Launch the sum of ``part`` (splits, total) fp32 contiguous into ``out`` (total elements,
    contiguous, any float dtype); returns out."""
    splits, total = part.shape
    if total:
        _split_sum_kernel[(triton.cdiv(total, SUM_BLOCK),)](part, out, splits, total, BLOCK=SUM_BLOCK)
    return out


__all__ = ["split_sum", "SUM_BLOCK"]
