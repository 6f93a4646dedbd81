"""Clearance keyed to the code: a family runs under "auto" on CUDA only once its current sources were
checked on that kind of GPU with that Triton; checks run in child processes whose crashes, signals,
hangs, compile errors, CUDA faults and disagreements become verdicts with their cause, recorded in
the machine cache with the configurations they tuned. Without a GPU: the children run the fake
families of tests/fake_families.py (and real ones through Triton's interpreter); "cuda" devices get
a compute capability from a stub."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch

import fake_families as fake
from mlit_kernels import registry
from mlit_kernels.checks import check_in_child, clear, verdict_row
from mlit_kernels.common import clearance, family as family_mod, tuning
from mlit_kernels.common import machine_cache as cache_mod
from mlit_kernels.common.family import Family, source_hash
from mlit_kernels.common.tuning import LaunchTuner
from mlit_kernels.variants import resolve_variant

TESTS = Path(__file__).resolve().parents[1]  # fake_families.py
CHILD_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS),
                                                          os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(autouse=True)
def machine(machine_cache, monkeypatch):
    """A fresh machine cache (conftest) whose "cuda" devices have compute capability 9.0."""
    real = cache_mod.capability
    monkeypatch.setattr(cache_mod, "capability",
                        lambda device: "9.0" if torch.device(device).type == "cuda" else real(device))
    return machine_cache


def _verdict(family: Family, cleared: bool = True, **changes) -> clearance.Verdict:
    fields = dict(family=family.name, source_hash=source_hash(family), triton=cache_mod.triton_version(),
                  capability="9.0", cleared=cleared, cause=None if cleared else "disagreement")
    return clearance.Verdict(**{**fields, **changes})


def test_auto_takes_a_family_on_cuda_only_once_its_code_is_cleared():
    dense = registry.family("dense")
    assert clearance.uses_triton(dense, "triton", "cpu") and not clearance.uses_triton(dense, "reference", "cuda")
    assert not clearance.uses_triton(dense, "auto", "cpu")  # auto runs torch off CUDA
    with pytest.warns(RuntimeWarning, match="mlit doctor --clear"):
        assert not clearance.uses_triton(dense, "auto", "cuda:0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning per family and device
        assert not clearance.uses_triton(dense, "auto", "cuda:0")
    clearance.record([_verdict(dense)])
    assert clearance.uses_triton(dense, "auto", "cuda:0") and clearance.cleared(dense, "cuda")
    assert not clearance.cleared(registry.family("dispatch"), "cuda")
    clearance.record([_verdict(dense, cleared=False)])  # a later check there overrides
    assert not clearance.cleared(dense, "cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        clearance.uses_triton(dense, "cuda", "cuda")


def test_a_verdict_counts_for_its_code_triton_and_gpu_only():
    dense = registry.family("dense")
    for other in (dict(source_hash="0123456789abcdef"), dict(triton="3.6.0-other"), dict(capability="8.0")):
        clearance.record([_verdict(dense, **other)])
        assert not clearance.cleared(dense, "cuda"), other  # a stale or foreign verdict clears nothing
    assert len(clearance.machine_verdicts()) == 3


def test_a_changed_kernel_source_is_uncleared(tmp_path, monkeypatch):
    source = tmp_path / "my_kernels.py"
    source.write_text("def kernel(): return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    family = Family(name="mine", module="my_kernels", summary="", ops=(), sources=("my_kernels",), kernels={},
                    launches={}, dtypes=(torch.float32,), limits="", check=fake._passes, small_shapes=({},))
    clearance.record([_verdict(family)])
    assert clearance.cleared(family, "cuda")
    source.write_text("def kernel(): return 2\n")
    family_mod.forget_hashes()
    assert not clearance.cleared(family, "cuda")


def test_every_family_hashes_every_module_its_kernels_come_from():
    """The hash covers what is launched: each family's own modules (all but its descriptor, reference
    and package file) and every module defining a Triton function its kernels call."""
    import importlib
    import pkgutil

    import mlit_kernels

    for fam in registry.families():
        package = fam.module.rsplit(".", 1)[0]
        own = {info.name for info in pkgutil.iter_modules(importlib.import_module(package).__path__, package + ".")}
        own -= {f"{package}.family", f"{package}.reference"}
        assert own <= set(fam.sources), (fam.name, own - set(fam.sources))
        for kernel in fam.kernels:
            assert any(kernel in family_mod.source_path(m).read_text(encoding="utf-8") for m in fam.sources), kernel
    for module in ("mlit_kernels.common.gating", "mlit_kernels.common.split_sum"):
        assert any(module in fam.sources for fam in registry.families())
    assert mlit_kernels  # the package imports without defining a kernel (the registry is Triton-free)


def test_resolve_variant_takes_dense_on_cuda_once_cleared(monkeypatch):
    assert resolve_variant("auto", 3, device="cuda") == "dispatch"
    assert resolve_variant("auto", 3, device="cpu") == "dense"
    assert resolve_variant("dense", 3, device="cuda") == "dense"  # by name: whatever clearance says
    clearance.record([_verdict(registry.family("dense"))])
    assert resolve_variant("auto", 3, device="cuda") == "dense"
    monkeypatch.setenv(clearance.ENV, "yes")
    with pytest.raises(ValueError, match="MLIT_UNCLEARED_KERNELS must be 0 or 1"):
        clearance.may_run(registry.family("dispatch"), "cuda")
    monkeypatch.setenv(clearance.ENV, "1")
    assert clearance.may_run(registry.family("dispatch"), "cuda")


@pytest.mark.parametrize("name, cause, detail", [
    ("PASSES", None, ""),
    ("DISAGREES", "disagreement", "dx 5.00e-01 > 1e-04"),
    ("NAN", "disagreement", "y nan"),
    ("EXITS", "fault", "exit status 3 without a result"),
    ("SEGFAULTS", "fault", "killed by SIGSEGV"),
    ("DOES_NOT_COMPILE", "compile error", "PassManager::run failed"),
    ("FAULTS", "fault", "illegal memory access"),
])
def test_a_child_that_misbehaves_is_a_verdict_with_its_cause(name, cause, detail):
    family = getattr(fake, name)
    verdict, tuned = check_in_child(family, family.small_shapes, (torch.float32,), "cpu", env=CHILD_ENV, timeout=120)
    assert (verdict.cleared, verdict.cause) == (cause is None, cause), verdict
    assert detail in verdict.detail and tuned == {}
    assert verdict.family == family.name and verdict.capability == "interpreter"
    assert verdict.source_hash == source_hash(family) and verdict.checked[0]["dtypes"] == ["fp32"]


def test_a_child_that_hangs_is_a_timeout():
    verdict, _ = check_in_child(fake.HANGS, fake.HANGS.small_shapes, (torch.float32,), "cpu", env=CHILD_ENV,
                                timeout=5)
    assert not verdict.cleared and verdict.cause == "timeout" and "5 s" in verdict.detail


def test_clear_checks_real_families_and_records_their_verdicts():
    """Two real families through the interpreter in child processes: cleared, recorded, skipped when
    already cleared; a record per family for --json."""
    names = ("loss", "mae_loss")
    seen = []
    verdicts = clear([registry.family(n) for n in names], {}, "cpu", dtypes=(torch.float32,), jobs=2,
                     report=seen.append)
    assert [v.family for v in verdicts] == list(names) and all(v.cleared for v in verdicts)
    assert sorted(v.family for v in seen) == sorted(names)
    assert {v.family for v in clearance.machine_verdicts()} == set(names)
    assert all(clearance.cleared(registry.family(n), "cpu") for n in names)
    assert clear([registry.family(n) for n in names], {}, "cpu", only_uncleared=True) == []
    row = verdict_row(verdicts[0])
    assert row["verdict"] == "cleared" and row["worst"]["error"] <= row["worst"]["limit"]
    assert json.loads(json.dumps(row)) == row


def test_a_tuned_configuration_is_kept_for_every_process_on_the_machine(monkeypatch):
    """What a clearance child tuned is what every later process runs: the tuner reads it from the
    machine cache (no timing in the caller's process: untuned keys get the default)."""
    monkeypatch.setattr(tuning, "interpreting", lambda: False)
    tuner = LaunchTuner("test.kept", ("a", "b", "c"))
    cuda = torch.device("cuda", 0)
    timed = []
    assert tuner.choose(("fwd", 108), cuda, timed.append) == "a" and timed == []  # untuned: the default, no timing
    clearance.record([], {"test.kept": {repr(("fwd", 108)): repr("c")}}, cuda)
    tuner.forget()
    assert tuner.choose(("fwd", 108), cuda, timed.append) == "c" and timed == []
    assert tuner.choose(("bwd", 108), cuda, timed.append) == "a"
    clearance.record([], {"test.kept": {repr(("bwd", 108)): repr("gone")}}, cuda)  # not a candidate any more
    tuner.forget()
    assert tuner.choose(("bwd", 108), cuda, timed.append) == "a"


def test_machine_cache_survives_a_bad_file(machine):
    path = cache_mod.path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{not json")
    assert cache_mod.read()["verdicts"] == []
    clearance.record([_verdict(registry.family("loss"))])
    assert json.loads(path.read_text())["format"] == cache_mod.FORMAT
    assert clearance.cleared(registry.family("loss"), "cuda")


def test_the_decision_is_a_constant_to_torch_compile():
    """A compiled model asks on CUDA too: the decision (which reads the machine cache) is taken at
    trace time, without a graph break."""
    dense = registry.family("dense")

    def step(x):
        variant = resolve_variant("auto", 3, device="cuda:0")
        return x + 1 if clearance.uses_triton(registry.family(variant), "auto", "cuda:0") else x - 1

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    with pytest.warns(RuntimeWarning, match="'dispatch' Triton kernels are not cleared"):
        assert torch.equal(compiled(torch.zeros(2)), -torch.ones(2))
    clearance.record([_verdict(dense)])
    torch._dynamo.reset()
    assert torch.equal(torch.compile(step, fullgraph=True, backend="eager")(torch.zeros(2)), torch.ones(2))
