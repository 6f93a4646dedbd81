"""The precision table: which compute dtypes the kernels take, how they run their products, and the
error every kernel is held to against its float64 reference (Triton-free; one home for each).

The measure is :func:`max_row_error`: for each row of an output or gradient,
max |out − ref| over the row divided by max |ref| over that row, and the worst row. Measured on the
interpreter at the paper's widths: fp32 2.1e-5 (dW_noise, a sum over tokens), fp16 2.1e-3, bf16
1.3e-2 (bf16 keeps 8 bits of mantissa); the bounds leave ~4x for a GPU's other summation orders.
"""

from __future__ import annotations

import torch

#: The dtypes the expert products, attention, norms and projections compute in (fp32 accumulation).
COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

#: Worst per-row relative error against the float64 reference, by compute dtype.
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


#: Gradients summed over thousands of tokens whose terms cancel — the gate weights' (dW_g,
#: dW_noise: a softmax's gradient sums to zero over the experts) — lose more in bf16: worst per-row
#: error 7.5e-2 on an H200 at 4133 tokens (6.3e-2 under the interpreter), so bf16 allows 1e-1 there.
TOL_CANCELLING_SUMS = {**TOL, torch.bfloat16: 1e-1}

#: Under Triton's interpreter bf16 conversions truncate (a GPU rounds to nearest: half the error),
#: biased errors that add up in long sums: measured up to 1.25x TOL (the attention block's dW_qkv).
INTERPRETER_BF16_SLACK = 1.5


def tolerance(dtype: torch.dtype, cancelling_sum: bool = False) -> float:
    """TOL of a compute dtype (fp32's for any other float dtype, float64 included), or
    :data:`TOL_CANCELLING_SUMS`' with ``cancelling_sum``; bf16's with :data:`INTERPRETER_BF16_SLACK`
    under Triton's interpreter."""
    from .tiling import interpreting

    table = TOL_CANCELLING_SUMS if cancelling_sum else TOL
    slack = INTERPRETER_BF16_SLACK if dtype == torch.bfloat16 and interpreting() else 1.0
    return table.get(dtype, table[torch.float32]) * slack


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a kernel's products run in for input x: autocast's when it is on for x's device,
    else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def max_row_error(out: torch.Tensor | None, ref: torch.Tensor) -> float:
    """The measure the kernels are held to: for each row (last dimension) of ``ref``, max |out − ref|
    over the row divided by max |ref| over the row — rows below 1e-3 of the tensor's largest value
    measured against that floor — and the worst row. ``out`` None counts as zeros."""
    ref = ref.detach().double().cpu()
    out = torch.zeros_like(ref) if out is None else out.detach().double().cpu()
    if out.shape != ref.shape:
        raise ValueError(f"out has shape {tuple(out.shape)} but ref has {tuple(ref.shape)}")
    if ref.numel() == 0:
        return 0.0
    ref, out = (t.reshape(1, 1) if t.dim() == 0 else t.reshape(-1, t.shape[-1]) for t in (ref, out))
    scale = ref.abs().amax(1).clamp_min(max(ref.abs().max().item() * 1e-3, 1e-30))
    return ((out - ref).abs().amax(1) / scale).max().item()


def dot_f32(dtype: torch.dtype, interpreted: bool) -> bool:
    """Whether products of compute dtype ``dtype`` run as IEEE fp32 dots: fp32's always, bf16's
    under Triton's interpreter (``interpreted``), whose numpy has no bf16; on a GPU bf16 and fp16
    run on tensor cores."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreted)


def dot_precision(dtype: torch.dtype) -> dict:
    """A kernel's product constexprs for a compute dtype: DTYPE (the tl dtype of the operands) and
    DOT_F32 (:func:`dot_f32` here)."""
    import triton.language as tl

    from .tiling import interpreting

    if dtype not in COMPUTE_DTYPES:
        raise TypeError(f"compute dtype must be one of {COMPUTE_DTYPES}, got {dtype}")
    tl_dtype = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dtype]
    return dict(DTYPE=tl_dtype, DOT_F32=dot_f32(dtype, interpreting()))


__all__ = ["COMPUTE_DTYPES", "TOL", "TOL_CANCELLING_SUMS", "INTERPRETER_BF16_SLACK", "tolerance", "compute_dtype", "max_row_error", "dot_f32", "dot_precision"]
