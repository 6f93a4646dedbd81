"""Benchmarks of the pre-norm attention half-block ``x + GQA(LN(x))`` at the paper's shapes: the fused
Triton kernels (mlit_kernels.attention) against torch's path (LayerNorm, one qkv Linear, SDPA with
the head dims zero-padded to a multiple of 8 so its fused kernels take them, the projection, the
add) and torch.compile of that path.

    pytest bench/bench_attention.py --benchmark-only

Shapes (width / heads / groups, head dim): mLiT-S 144 / 8 / 4 (18), mLiT-XS 128 / 8 / 4 (16),
mLiT-XXS and the MAE decoder 108 / 6 / 3 (18); tokens: a classifier batch (256 × 145) and the MAE
encoder's visible tokens (1280 × 37). Forward (no grad) and forward + backward under fp16
autocast, fp32 weights and residual stream, as the models run them.

flash-attention's Triton tutorial kernel is not a case here: it takes head dims of 16, 32, 64 or
128 and no grouped keys (only mLiT-XS's 16 fits, with k and v repeated per head), and it is not a
package this project can install. On CUDA the timings synchronise the device. Without CUDA the
Triton cases skip (the interpreter is for correctness, not speed) and the torch path runs in fp32
on 8 sequences; torch.compile on CPU is skipped unless MLIT_BENCH_COMPILE_CPU=1.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn

from bench_moe import CUDA, DEVICE, time_mode  # the same timing as the MoE layer's

from mlit.models import GroupedQueryAttention

SHAPES = {"S-144-8-4": (144, 8, 4), "XS-128-8-4": (128, 8, 4), "XXS-108-6-3": (108, 6, 3)}
TOKENS = {"cls-256x145": (256, 145), "mae-1280x37": (1280, 37)}
CPU_SEQUENCES = 8
BACKENDS = ("torch", "compile", "triton")


class HalfBlock(nn.Module):
    """x + GQA(LN(x)) as a model layer runs it (``backend``: the attention module's)."""

    def __init__(self, dim: int, heads: int, groups: int, backend: str):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = GroupedQueryAttention(dim, heads, groups, backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, norm=self.norm)


def make_block(dim: int, heads: int, groups: int, backend: str) -> nn.Module:
    """The half-block for ``backend``: "torch" (SDPA), "compile" (torch.compile of it), "triton"."""
    block = HalfBlock(dim, heads, groups, "triton" if backend == "triton" else "reference").to(DEVICE)
    return torch.compile(block) if backend == "compile" else block


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tokens", list(TOKENS))
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_attention_half_block(benchmark, mode, shape, tokens, backend):
    if backend == "triton" and not CUDA:
        pytest.skip("Triton backend timings need a CUDA GPU (the CPU interpreter is for correctness only)")
    if backend == "compile" and not CUDA and os.environ.get("MLIT_BENCH_COMPILE_CPU") != "1":
        pytest.skip("torch.compile on CPU skipped (compile time dominates); set MLIT_BENCH_COMPILE_CPU=1")
    if not CUDA and tokens != list(TOKENS)[0]:
        pytest.skip(f"without CUDA only {CPU_SEQUENCES} sequences of the first token count run")
    dim, heads, groups = SHAPES[shape]
    b, n = TOKENS[tokens]
    block = make_block(dim, heads, groups, backend)
    x = torch.randn(b if CUDA else CPU_SEQUENCES, n, dim, device=DEVICE, requires_grad=mode == "fwd+bwd")
    benchmark.extra_info.update(device=torch.cuda.get_device_name() if CUDA else "cpu", tokens=x.shape[0] * n)
    time_mode(benchmark, mode, lambda: block(x), lambda y: y.float().square().mean())
