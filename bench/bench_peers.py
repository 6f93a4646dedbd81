"""pytest-benchmark rows of ``bench/peers.py``: every row of its cases (the MoE layer against
ScatterMoE, Liger-Kernel's fused MoE, vLLM's fused_moe kernel, torch.compile and eager torch; the
rest of the step against Liger-Kernel and torch SDPA), timed by pytest-benchmark.

    pytest bench/bench_peers.py --benchmark-only

The same cases, inputs and rows as ``python bench/peers.py`` (which also checks every row against
the float64 reference and meters it): on CUDA in fp16 at the case's full size, the device
synchronised, 20 rounds after 3. Without CUDA the rows that run Triton kernels skip (the
interpreter is for correctness, not speed), torch.compile rows skip unless
MLIT_BENCH_COMPILE_CPU=1, and the eager torch rows run in fp32 on the check size. A peer that is
not fetched (``python bench/peers.py --fetch``) skips with the reason.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

import peers

CASES = peers.moe_cases(peers.MOE_SHAPES, 100) + peers.step_cases(smoke=False, n_check=100)
TRITON_SOURCES = ("mlit", "scattermoe", "liger-kernel", "vllm")  # rows whose step launches Triton kernels


def _id(case: peers.Case, row: peers.Row) -> str:
    return re.sub(r"[^A-Za-z0-9.=]+", "-", f"{case.part} {case.name} {case.mode} {row.name}").strip("-")


PARAMS = [pytest.param(case, row, id=_id(case, row)) for case in CASES for row in case.rows]


@pytest.mark.parametrize(("case", "row"), PARAMS)
def test_peer_row(benchmark, case: peers.Case, row: peers.Row):
    if row.skip:
        pytest.skip(row.skip)
    if not peers.CUDA and row.version.split()[0] in TRITON_SOURCES:
        pytest.skip("Triton kernels are timed on a CUDA GPU only (the CPU interpreter is for correctness)")
    if not peers.CUDA and row.compiled and os.environ.get("MLIT_BENCH_COMPILE_CPU") != "1":
        pytest.skip("torch.compile on CPU skipped (compile time dominates); set MLIT_BENCH_COMPILE_CPU=1")
    train = case.mode == "train"
    n, dtype = (case.n_meter, torch.float16) if peers.CUDA else (case.n_check, torch.float32)
    make = case.make_inputs if peers.CUDA else (case.check_inputs or case.make_inputs)
    inputs = peers._with_cotangents(make(n, dtype, explicit_noise=False))
    prepared = row.prepare(peers._fresh(inputs, case, train))
    benchmark.extra_info.update(device=torch.cuda.get_device_name() if peers.CUDA else "cpu", tokens=n,
                                version=row.version)

    def step():
        for leaf in prepared.leaves:
            leaf.grad = None
        if train:
            peers._backward(prepared.run(), inputs)
        else:
            with torch.no_grad():
                prepared.run()
        if peers.CUDA:
            torch.cuda.synchronize()

    with peers.scattermoe_routing(compiled=True):
        benchmark.pedantic(step, **({"rounds": 20, "warmup_rounds": 3} if peers.CUDA else
                                    {"rounds": 3, "warmup_rounds": 1}))
