"""The launch / sync / byte meter counts what a GPU would run, on the CPU."""

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
