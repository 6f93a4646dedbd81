"""Compiling a run's kernels before its first step (mlit_kernels.precompile): the launches of a
training step and an evaluation batch recorded without running a kernel or changing the trainer,
every tuning candidate's too where a process tunes, compiled in parallel child processes — here
for sm_90 with Triton's bundled compiler (no GPU; on a GPU, ``warmup`` through the JIT's own path)."""

from __future__ import annotations

import tempfile

import pytest
import torch

from mlit_kernels import SharedSwiGLUMoE, precompile
from mlit_kernels.common.tiling import interpreting
from mlit_kernels.dense import CONFIGS

if not torch.cuda.is_available() and not interpreting():
    pytest.skip("no CUDA and Triton kernels were imported without TRITON_INTERPRET=1", allow_module_level=True)

def _layer_step(layer, x):
    def step():
        y, aux = layer(x)
        torch.autograd.backward((y, aux), (torch.ones_like(y), torch.ones(())))
    return step


def test_record_keeps_each_specialisation_once():
    layer = SharedSwiGLUMoE(27, 16, 5, k=2, backend="triton")
    x = torch.randn(37, 27, requires_grad=True)
    signatures = precompile.record(_layer_step(layer, x))
    names = [s.name for s in signatures]
    assert names == ["_fused_fwd_kernel", "_fused_aux_kernel", "_fused_bwd_tokens_kernel",
                     "_fused_bwd_weights_kernel", "_split_sum_kernel"]
    every = precompile.record_every_configuration(_layer_step(layer, x))
    tuned = {dict(s.constexprs)["BLOCK_N"] for s in every if s.name == "_fused_fwd_kernel"}
    assert tuned == {c.block_n for c in CONFIGS} and set(signatures) <= set(every)


def test_rehearsal_records_a_step_and_leaves_the_trainer_as_it_was():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    import step_meters

    trainer, images, labels = step_meters.make_trainer("table6-cifar10", "XXS", 2)
    before = {k: v.clone() for k, v in trainer.raw_model.state_dict().items()}
    sums = trainer.evaluator._sums.clone()
    signatures = precompile.record(lambda: trainer.rehearse_launches(images, labels))
    kernels = {s.name for s in signatures}
    assert {"_crop_kernel", "_embed_fwd_kernel", "_attn_fwd_kernel", "_fused_fwd_kernel", "_loss_fwd_kernel",
            "_eval_sums_kernel", "_ln_qkv_bwd_kernel"} <= kernels
    assert all(torch.equal(v, before[k]) for k, v in trainer.raw_model.state_dict().items())
    assert torch.equal(trainer.evaluator._sums, sums) and not trainer.optimizer.state
    assert all(p.grad is None for p in trainer.raw_model.parameters())


def test_warm_compiles_for_sm90_in_parallel_children(monkeypatch):
    """Three loss kernels compiled for sm_90 by two children (a fresh Triton cache); the report's
    projection onto more workers never beats the longest compile."""
    from mlit_kernels.loss.family import FAMILY

    signatures = precompile.record(lambda: FAMILY.run_check(dict(B=37, C=10), torch.float32, torch.device("cpu")))
    assert {s.name for s in signatures} == set(FAMILY.kernels)
    with tempfile.TemporaryDirectory() as cache:
        monkeypatch.setenv("TRITON_CACHE_DIR", cache)
        report = precompile.warm(signatures, jobs=2, arch=90)
    assert (report.signatures, report.jobs, report.failures) == (3, 2, []), report
    assert len(report.seconds) == 3 and report.wall_s > 0
    assert report.projection(16, 0.0) == max(report.seconds)
    assert report.projection(1, 1.0) == pytest.approx(1.0 + sum(report.seconds))
