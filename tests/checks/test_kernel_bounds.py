"""Every masked-in load and store of the MoE and attention-block kernels stays inside its tensors,
and no kernel reads memory nobody wrote — checked under the CPU interpreter (tests/bounds.py), at
every configuration.

What a GPU would report as an illegal memory access (the dense kernels' first GPU launch did, on an
H200 with Triton 3.6, 2026-12-04) shows here as an AssertionError naming the kernel, when the
kernel's own index arithmetic is at fault; with these checks passing, such a fault lies below the
kernel source (the compiler, the hardware)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from bounds import checked_kernels  # noqa: E402
from mlit_kernels.attention.family import inputs  # noqa: E402  (the block's weights, as its check makes them)

from mlit_kernels import SharedSwiGLUMoE  # noqa: E402
from mlit_kernels.attention import CONFIGS as ATTENTION_CONFIGS  # noqa: E402
from mlit_kernels.attention import attention_block, force_config  # noqa: E402
from mlit_kernels.common.tiling import interpreting  # noqa: E402
from mlit_kernels.dense import launch as dense_launch  # noqa: E402
from mlit_kernels.dispatch import launch as dispatch_launch  # noqa: E402

pytestmark = pytest.mark.skipif(not interpreting(), reason="checks the Triton interpreter's launches (CPU only)")


@triton.jit
def _one_past_the_end(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1, mask=offs <= n)


@triton.jit
def _copy(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=offs < n), mask=offs < n)


def test_the_checks_catch_an_out_of_range_store_and_an_unwritten_read():
    x, real_empty = torch.zeros(8), torch.empty
    with checked_kernels(), pytest.raises(Exception, match="_one_past_the_end: store of 1 element"):
        _one_past_the_end[(1,)](x, 8, BLOCK=16)
    with checked_kernels():
        src = torch.empty(8)  # never written
        dst = torch.zeros(8)
        _copy[(1,)](src, dst, 8, BLOCK=8)
    assert dst.isnan().all()
    assert torch.empty is real_empty  # outside the block torch's own again


CASES = {  # variant, m, d_h, t, k, tokens, dropout, shared; tokens > 256: more than one weight-gradient split
    "dense": ("dense", 24, 27, 5, 2, 37, 0.1, ("v", "w2")),
    "dense-k1-splits": ("dense", 16, 16, 3, 1, 260, 0.0, ("v", "w2")),
    "dispatch": ("dispatch", 24, 27, 12, 2, 37, 0.1, ("v", "w2")),
    "dispatch-separate-k=t": ("dispatch", 16, 16, 3, 3, 45, 0.0, ()),
}


@pytest.mark.parametrize("case", list(CASES))
def test_layer_kernels_stay_in_bounds_at_every_configuration(case):
    variant, m, d_h, t, k, n, dropout, shared = CASES[case]
    configs = (dense_launch if variant == "dense" else dispatch_launch).CONFIGS
    torch.manual_seed(0)
    layer = SharedSwiGLUMoE(m, d_h, t, k=k, dropout=dropout, shared=shared, backend="triton", triton_variant=variant)
    layer.train()
    tuner = dense_launch.TUNER if variant == "dense" else dispatch_launch.TUNER
    for config in configs:
        layer.zero_grad(set_to_none=True)
        x = torch.randn(n, m, dtype=torch.float16, requires_grad=True)
        with checked_kernels(), tuner.force(config):
            with torch.autocast("cpu", dtype=torch.float16):
                y, aux = layer(x, seed=5)
            (y.float().square().mean() + aux).backward()
        grads = [x.grad] + [p.grad for p in layer.parameters()]
        assert torch.isfinite(y).all() and torch.isfinite(aux), config  # nothing read that nobody wrote
        assert all(g is not None and torch.isfinite(g).all() for g in grads), config


@pytest.mark.parametrize("B, n, D, H, G", [(2, 37, 54, 3, 1), (9, 33, 32, 4, 2)])  # 9 × 33 tokens: 10 splits
def test_attention_block_kernels_stay_in_bounds_at_every_configuration(B, n, D, H, G):
    """The block's forward and backward, each backward kernel writing its own columns of the
    weight-gradient partial sums (a strided view of one buffer)."""
    x0, weights0, dy = inputs(B, n, D, H, G)
    for config in ATTENTION_CONFIGS:
        x = x0.half().requires_grad_()
        weights = [w.clone().requires_grad_() for w in weights0]
        with checked_kernels(), force_config(config):
            y = attention_block(x, *weights, H, G)
            y.backward(dy.half())
        grads = [x.grad] + [w.grad for w in weights]
        assert torch.isfinite(y).all() and all(torch.isfinite(t).all() for t in grads), config
