"""Every kernel family of the registry, the same way: its check passes at its small shapes under
Triton's interpreter (forward and backward against its reference), its descriptor names exactly the
Triton kernels that check launches (the meter's FLOP models and the sm_90 audit read that list),
its ops exist in ``torch.ops.mlit`` once its ops module is imported, and a kernel has one FLOP
model however many families launch it."""

from __future__ import annotations

import importlib

import pytest
import torch

from mlit_kernels import registry
from mlit_kernels.common.tiling import interpreting
from mlit_kernels.meter import Meter

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu" and not interpreting():
    pytest.skip("no CUDA and Triton kernels were imported without TRITON_INTERPRET=1", allow_module_level=True)


@pytest.mark.parametrize("name", registry.NAMES)
def test_family_check_passes_and_names_its_kernels(name):
    family = registry.family(name)
    with Meter() as meter:
        errors = family.run_check(family.small_shapes[0], torch.float32, DEVICE)
    assert errors and all(error <= limit for error, limit in errors.values()), errors
    launched = {r.name.removeprefix("triton.") for r in meter.records if r.kind == "triton"}
    assert launched == set(family.kernels), (launched ^ set(family.kernels))


@pytest.mark.parametrize("name", registry.NAMES)
def test_family_ops_are_registered(name):
    family = registry.family(name)
    importlib.import_module(family.module.rsplit(".", 1)[0] + ".ops")
    for op in family.ops:
        namespace, op_name = op.split("::")
        assert namespace == "mlit" and hasattr(torch.ops.mlit, op_name), op


def test_one_flop_model_a_kernel():
    models = registry.kernel_flops()
    assert "_fused_fwd_kernel" in models and models["_split_sum_kernel"] is None
    assert {n for f in registry.families() for n in f.kernels} == set(models)
