"""Benchmarks of the MoE layer (SharedSwiGLUMoE) at the paper's shapes, every backend.

    pytest bench/ --benchmark-only

Shapes: mLiT-S layer 0 (m = 144, d_h = 144, t = 3) and mLiT-XXS last layer (m = 108, d_h = 27,
t = 5), k = 2, for N = 256 × 145 tokens (a classifier batch) and 1280 × 37 (the MAE encoder's
visible tokens). Backends: reference eager, torch.compile(reference), Triton dispatch and
Triton dense; forward, and forward + backward, in training mode under fp16 autocast.

Many experts (``test_many_experts``): t = 16, 32, 64 with k = 1, 2, 4, m 192-1024, d_h
768-4096, shared V/W2 and separate experts (shared=()), N = 8192 tokens: reference,
torch.compile(reference) and the Triton dispatch variant.

On CUDA the timings synchronise the device. Without CUDA the Triton cases skip (they need a GPU;
the interpreter is for correctness, not speed) and the reference cases run in fp32 on a reduced
N so that the whole file takes under a minute; torch.compile on CPU is skipped unless
MLIT_BENCH_COMPILE_CPU=1 (its compile time alone is tens of seconds).
"""

from __future__ import annotations

import os

import pytest
import torch

from gpu_report import make_layer  # the layer under test, built as the GPU report builds it

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
SHAPES = {"S-layer0": (144, 144, 3), "XXS-last": (108, 27, 5)}
TOKENS = {"cls-256x145": 256 * 145, "mae-1280x37": 1280 * 37}
CPU_TOKENS = 512
BACKENDS = ("reference", "compile", "triton-dispatch", "triton-dense")
MANY = {  # (m, d_h, t, k, shared)
    "t16k2-192-768": (192, 768, 16, 2, ("v", "w2")), "t64k2-384-1536": (384, 1536, 64, 2, ("v", "w2")),
    "t64k1-384-1536-sep": (384, 1536, 64, 1, ()), "t32k4-1024-4096-sep": (1024, 4096, 32, 4, ()),
}
MANY_TOKENS = 8192


def _skip_without_cuda(backend):
    if backend.startswith("triton") and not CUDA:
        pytest.skip("Triton backend timings need a CUDA GPU (the CPU interpreter is for correctness only)")
    if backend == "compile" and not CUDA and os.environ.get("MLIT_BENCH_COMPILE_CPU") != "1":
        pytest.skip("torch.compile on CPU skipped (compile time dominates); set MLIT_BENCH_COMPILE_CPU=1")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tokens", list(TOKENS))
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_moe_layer(benchmark, mode, shape, tokens, backend):
    _skip_without_cuda(backend)
    if not CUDA and tokens != list(TOKENS)[0]:
        pytest.skip(f"without CUDA only one reduced N ({CPU_TOKENS}) runs")
    m, d_h, t = SHAPES[shape]
    _run(benchmark, mode, make_layer(m, d_h, t, 2, backend), m, TOKENS[tokens] if CUDA else CPU_TOKENS)


@pytest.mark.parametrize("backend", ("reference", "compile", "triton-dispatch"))
@pytest.mark.parametrize("shape", list(MANY))
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_many_experts(benchmark, mode, shape, backend):
    _skip_without_cuda(backend)
    m, d_h, t, k, shared = MANY[shape]
    if not CUDA and m * d_h * t > 192 * 768 * 16:
        pytest.skip("without CUDA only the smallest many-expert shape runs")
    _run(benchmark, mode, make_layer(m, d_h, t, k, backend, shared), m, MANY_TOKENS if CUDA else CPU_TOKENS)


def _run(benchmark, mode, fn, m, n):
    """Time one forward (no grad) or forward + backward of ``fn`` on n tokens under fp16 autocast."""
    x = torch.randn(n, m, device=DEVICE, requires_grad=(mode == "fwd+bwd"))
    benchmark.extra_info.update(device=torch.cuda.get_device_name() if CUDA else "cpu", n_tokens=n)
    time_mode(benchmark, mode, lambda: fn(x), lambda out: out[0].float().square().mean() + out[1])


def time_mode(benchmark, mode, forward, loss):
    """Time ``forward()`` ("fwd": without autograd) or ``loss(forward()).backward()`` ("fwd+bwd"),
    the forward under fp16 autocast on CUDA, the device synchronised; 20 rounds after 3 on CUDA,
    3 after 1 on the CPU."""

    def step():
        with torch.autocast(DEVICE, dtype=torch.float16, enabled=CUDA):
            out = forward()
        if mode == "fwd+bwd":
            loss(out).backward()
        if CUDA:
            torch.cuda.synchronize()

    rounds = {"rounds": 20, "warmup_rounds": 3} if CUDA else {"rounds": 3, "warmup_rounds": 1}
    if mode == "fwd":
        with torch.no_grad():
            benchmark.pedantic(step, **rounds)
    else:
        benchmark.pedantic(step, **rounds)
