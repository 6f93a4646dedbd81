"""The MAE token-shuffle family's descriptor (Triton-free): :data:`FAMILY`."""

from __future__ import annotations

import torch

from ..common.family import Family
from ..common.precision import max_row_error, tolerance


def check(shape, dtype: torch.dtype, device: torch.device) -> dict[str, tuple[float, float]]:
    """Both shuffles for B images of P patches, K visible, width D, tokens in ``dtype``: values and
    every gradient (tokens; latent, mask token, position table) against the float64 reference.
    (A keep that repeats an entry is outside the torch path's semantics — ``scatter_``'s gradient
    reaches an overridden slot — and is tested against its own rule in tests/mae_tokens/test_mae_tokens.py.)"""
    from .ops import fused_decoder_input, fused_encoder_input
    from .reference import decoder_input_reference, encoder_input_reference

    b, p, k, d = shape["B"], shape["P"], shape["K"], shape["D"]
    g = torch.Generator().manual_seed(b * 1000 + p + d)
    keep = torch.rand(b, p, generator=g).argsort(dim=1)[:, :k]
    tokens = torch.randn(b, p + 1, d, generator=g).to(dtype)
    leaves = [torch.randn(b, k + 1, d, generator=g).to(dtype), torch.randn(1, 1, d, generator=g),
              torch.randn(1, p + 1, d, generator=g)]
    dv = torch.randn(b, k + 1, d, generator=g)
    dx = torch.randn(b, p + 1, d, generator=g)

    def grads(out, inputs, grad_out):
        return [out] + list(torch.autograd.grad(out, inputs, grad_out.to(out.device, out.dtype)))

    errors = {}
    got_tokens = tokens.to(device).requires_grad_()
    want_tokens = tokens.double().requires_grad_()
    got = grads(fused_encoder_input(got_tokens, keep.to(device)), [got_tokens], dv)
    want = grads(encoder_input_reference(want_tokens, keep), [want_tokens], dv)
    for name, a, w in zip(("encoder v", "encoder dtokens"), got, want):
        errors[name] = (max_row_error(a, w), tolerance(dtype))
    got_leaves = [t.to(device).requires_grad_() for t in leaves]
    want_leaves = [t.double().requires_grad_() for t in leaves]
    got = grads(fused_decoder_input(got_leaves[0], keep.to(device), got_leaves[1], got_leaves[2], p), got_leaves, dx)
    want = grads(decoder_input_reference(want_leaves[0], keep, want_leaves[1], want_leaves[2], p), want_leaves, dx)
    for name, a, w in zip(("decoder x", "decoder dlatent", "decoder dtoken", "decoder dpos"), got, want):
        errors[name] = (max_row_error(a, w), tolerance(dtype))
    return errors


FAMILY = Family(
    name="mae_tokens",
    module=__name__,
    summary="the MAE encoder's input (visible tokens gathered) and decoder's input (scattered, mask token, + pos)",
    ops=("mlit::mae_encoder_input", "mlit::mae_encoder_input_backward", "mlit::mae_decoder_input",
         "mlit::mae_decoder_input_backward"),
    sources=("mlit_kernels.mae_tokens.kernels", "mlit_kernels.mae_tokens.ops", "mlit_kernels.common.split_sum"),
    kernels={"_encoder_input_fwd_kernel": None, "_encoder_input_bwd_kernel": None, "_decoder_input_fwd_kernel": None,
             "_decoder_input_bwd_kernel": None, "_split_sum_kernel": None},
    launches={"forward": 2, "backward": 3, "eval": 2},
    dtypes=(torch.float16, torch.bfloat16, torch.float32),
    limits="tokens (B, P+1, D), D ≤ 1024; keep (B, K) int64, any entries (repeats sum, outside [0, P) name none)",
    check=check,
    small_shapes=({"B": 3, "P": 20, "K": 5, "D": 27},),
    gpu_shapes=({"B": 256, "P": 144, "K": 36, "D": 108},),
)

__all__ = ["FAMILY", "check"]
