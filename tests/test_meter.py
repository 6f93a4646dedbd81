"""The launch / sync / byte meter counts what a GPU would run, on the CPU."""

import pytest
import torch
import triton
import triton.language as tl

from mlit_kernels.meter import Meter


@triton.jit
def _double(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, 2 * tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)


def test_counts_aten_launches_views_and_syncs():
    with Meter() as meter:
        a = torch.ones(1000)            # 1 launch (fill), 4 kB written
        b = a + 1                       # 1 launch, 8 kB
        c = b.view(10, 100).t()         # views: free
        d = torch.empty(5)              # allocation: free
        total = c.sum()                 # 1 launch
        value = total.item()            # a host read: a sync, no launch
    assert value == 2000.0 and d.shape == (5,)
    assert meter.launches == 3 and meter.aten_launches == 3 and meter.triton_launches == 0
    assert meter.syncs == 1
    assert meter.bytes == 4000 + 8000 + 4004
    assert meter.by_name() == {"aten.ones": 1, "aten.add": 1, "aten.sum": 1}


def test_boolean_mask_and_nonzero_are_syncs():
    x = torch.arange(10.0)
    with Meter() as meter:
        x[x > 3]
        torch.nonzero(x)
    assert meter.syncs == 2


def test_sections_attribute_launches():
    with Meter() as meter:
        with meter.section("first"):
            torch.zeros(3)
        with meter.section("second"):
            torch.ones(3) * 2
    rows = meter.by_section()
    assert rows["first"]["launches"] == 1 and rows["second"]["launches"] == 2


def test_triton_launch_recorded_and_dry_run_skips_it():
    x = torch.arange(100, dtype=torch.float32)
    y = torch.zeros_like(x)
    with Meter() as meter:
        _double[(4,)](x, y, 100, BLOCK=32)
    assert meter.triton_launches == 1 and meter.launches == 1
    assert meter.bytes == 800 and torch.equal(y, 2 * x)
    y.zero_()
    with Meter(dry_run=True) as meter:
        _double[(4,)](x, y, 100, BLOCK=32)
    assert meter.triton_launches == 1 and not y.any()  # recorded, not run
    assert meter.records[0].meta["BLOCK"] == 32 and meter.records[0].meta["grid"] == (4,)


# ------------------------------------------------------------------------------------------------
# The MoE layer's budgets at the paper's shapes (bench/meters.py prints the same figures).

PAPER_LAYERS = [  # (m, d_h, t): the first and last MoE layer of S, XS and XXS
    (144, 144, 3), (144, 72, 5), (128, 96, 3), (128, 32, 5), (108, 81, 3), (108, 27, 5)]


@pytest.mark.parametrize("m,d_h,t", PAPER_LAYERS)
def test_fused_layer_budgets(m, d_h, t):
    """Training forward + backward ≤ 8 launches (2 forward kernels, 3 backward, the seed draw),
    eval forward ≤ 2, no host sync, modeled bytes ≤ 3 × the minimum, padding no more than
    rounding m and d_h up to multiples of 16 — at N = 256 × 145 tokens."""
    from mlit_kernels import SharedSwiGLUMoE
    from mlit_kernels.meter import measure_layer
    from mlit_kernels.common.tiling import round_up

    layer = SharedSwiGLUMoE(m, d_h, t, k=2, backend="triton")
    costs = measure_layer(layer, 256 * 145)
    assert costs.launches <= 8 and costs.launches_eval <= 2, costs.kernels
    assert costs.syncs == 0 and costs.syncs_eval == 0
    assert costs.bytes <= 3 * costs.min_bytes and costs.bytes_eval <= 3 * costs.min_bytes_eval
    assert costs.padding_m <= (round_up(m, 16) - m) / round_up(m, 16) + 1e-12
    assert costs.padding_d_h <= (round_up(d_h, 16) - d_h) / round_up(d_h, 16) + 1e-12


def test_reference_layer_has_no_host_sync():
    from mlit_kernels import SharedSwiGLUMoE
    from mlit_kernels.meter import measure_layer

    costs = measure_layer(SharedSwiGLUMoE(27, 27, 5, k=2), 64)
    assert costs.syncs == 0 and costs.syncs_eval == 0 and costs.launches > 8


def test_in_place_ops_returning_nothing_are_launches():
    """_foreach_* and fused optimizer ops write their arguments and return None: still kernels."""
    params = [torch.zeros(3), torch.zeros(4)]
    with Meter() as meter:
        torch._foreach_add_(params, 1.0)
    assert meter.launches == 1 and meter.bytes == 28
