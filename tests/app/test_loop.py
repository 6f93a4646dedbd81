"""The epoch loop: --max-steps smoke runs, mid-epoch saves, the metrics record and the checkpoint
surviving together, partial-epoch sums carried across a resume, a cut metrics line, no host sync
per step, the warm-up changing nothing, evaluation without an optimizer. On the real cifar10-mini
subset where it is here, else on a CIFAR-10 archive the tests write in the official format."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from shared_data import CIFAR10_ARCHIVE

from mlit.train import checkpoint as ckpt
from mlit.train.loop import Trainer, TrainingInterrupted, evaluate_checkpoint, run
from mlit.train.metrics import read_metrics
from mlit.train.recipes import get_recipe

def _recipe(tmp_cache, **changes):
    # 48 images, batch 16: 3 steps an epoch; augmentation, dropout and gate noise on
    settings = dict(data_dir=str(CIFAR10_ARCHIVE), verify=False, cache_dir=str(tmp_cache), epochs=2, batch_size=16,
                    limit_train=48, limit_test=16, warmup_epochs=1)
    return get_recipe("table8-mlit-xxs-cifar10").replace(**{**settings, **changes})


def _run(recipe, out, logs=None, **kw):
    return run(recipe, out, device="cpu", progress=False, log=(logs.append if logs is not None else lambda _: None),
               **kw)


def _weights(run_dir):
    return ckpt.load_checkpoint(Path(run_dir) / ckpt.CHECKPOINT_NAME)["model"]


def _same_weights(a, b):
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    out = root / "straight"
    _run(_recipe(root / "cache"), out)
    return root, out


def test_max_steps_smoke_run_then_resume(straight):
    """--max-steps 2 inside epoch 1: evaluation, a partial record, checkpoint and weights; the
    resumed run ends where the straight one did, and epoch 1's train loss averages all 3 steps."""
    root, straight_out = straight
    out = root / "smoke"
    logs = []
    record = _run(_recipe(root / "cache"), out, logs, max_steps=2)
    assert record["partial"] and record["global_step"] == 2 and record["epoch"] == pytest.approx(2 / 3)
    assert "test_top1" in record and (out / ckpt.WEIGHTS_NAME).is_file()
    state = ckpt.load_checkpoint(out / ckpt.CHECKPOINT_NAME)
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (0, 2, 2)
    assert state["record"] == record and len(state["epoch_sums"]) == 4 and state["epoch_rank_steps"] == 2
    assert [r["epoch"] for r in read_metrics(out)] == [pytest.approx(2 / 3)]
    assert any("max_steps 2" in line for line in logs)

    _run(_recipe(root / "cache"), out, resume=out)
    _same_weights(_weights(straight_out), _weights(out))
    done, reference = read_metrics(out), read_metrics(straight_out)
    assert [r["epoch"] for r in done] == [1, 2]  # the partial record gave way to the full one
    for a, b in zip(done, reference):
        for key in ("train_loss", "train_ce", "train_top1", "test_loss", "test_top1", "global_step"):
            assert a[key] == pytest.approx(b[key], rel=1e-9), key


def test_signal_mid_epoch_carries_the_epoch_sums(straight, monkeypatch):
    root, straight_out = straight
    out = root / "signalled"
    original = Trainer.train_step

    def step_then_signal(self, images, labels=None):
        res = original(self, images, labels)
        if self.global_step == 4:  # epoch 2, step 1 of 3
            os.kill(os.getpid(), signal.SIGINT)
        return res

    monkeypatch.setattr(Trainer, "train_step", step_then_signal)
    with pytest.raises(TrainingInterrupted) as e:
        _run(_recipe(root / "cache"), out)
    assert e.value.signum == signal.SIGINT
    monkeypatch.setattr(Trainer, "train_step", original)
    state = ckpt.load_checkpoint(out / ckpt.CHECKPOINT_NAME)
    assert (state["epoch"], state["step_in_epoch"], state["record"]["epoch"]) == (1, 1, 1)
    _run(_recipe(root / "cache"), out, resume=out)
    second, reference = read_metrics(out)[-1], read_metrics(straight_out)[-1]
    assert second["train_loss"] == pytest.approx(reference["train_loss"], rel=1e-9)
    assert second["train_top1"] == pytest.approx(reference["train_top1"], rel=1e-9)


def test_save_every_steps_checkpoints_inside_epochs(tmp_path, monkeypatch):
    saved = []
    original = ckpt.save_checkpoint

    def spy(path, state):
        saved.append((state["epoch"], state["step_in_epoch"], state["global_step"]))
        return original(path, state)

    monkeypatch.setattr(ckpt, "save_checkpoint", spy)
    _run(_recipe(tmp_path / "cache"), tmp_path / "run", save_every_steps=2)
    # every 2nd global step inside an epoch, and every epoch's end
    assert saved == [(0, 2, 2), (1, 0, 3), (1, 1, 4), (2, 0, 6)]
    with pytest.raises(ValueError, match="save_every_steps"):
        _run(_recipe(tmp_path / "cache"), tmp_path / "bad", save_every_steps=0)


def test_record_and_checkpoint_survive_together(straight, tmp_path):
    """A kill between the checkpoint and the metrics line (the line missing), and a kill inside
    the line (cut short): the resumed run restores the first and drops the second, saying so."""
    root, _ = straight
    out = tmp_path / "run"
    _run(_recipe(root / "cache"), out, stop_after_epochs=1)
    metrics = out / "metrics.jsonl"
    first = metrics.read_text()
    metrics.write_text("")  # killed after the checkpoint, before its record was appended
    state = ckpt.load_checkpoint(out / ckpt.CHECKPOINT_NAME)
    assert state["record"]["epoch"] == 1
    logs = []
    _run(_recipe(root / "cache"), out, logs, resume=out, stop_after_epochs=1)
    assert any("restored it from the checkpoint" in line for line in logs), logs
    assert [r["epoch"] for r in read_metrics(out)] == [1, 2]
    assert metrics.read_text().startswith(first)

    with open(metrics, "a") as f:
        f.write('{"epoch": 3, "task": "tr')  # a line cut by a kill
    with pytest.warns(UserWarning, match="dropped its last line"):
        assert [r["epoch"] for r in read_metrics(out)] == [1, 2]
    logs = []
    _run(_recipe(root / "cache"), out, logs, resume=out)  # nothing left to train: the file is repaired
    assert any("dropped its last line" in line for line in logs), logs
    assert [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()] == [1, 2]


def test_no_host_sync_per_training_step(tmp_path):
    """Syncs of a whole run do not grow with its steps (progress on, logging once an epoch)."""
    from mlit_kernels.meter import Meter

    counts = []
    for n in (32, 64):
        recipe = _recipe(tmp_path / "cache", limit_train=n, limit_test=8, epochs=1, log_every=100)
        with Meter() as meter:
            run(recipe, tmp_path / f"run{n}", device="cpu", progress=True, log=lambda _: None)
        counts.append(meter.syncs)
    assert counts[0] == counts[1], counts


def test_warm_up_changes_nothing():
    recipe = get_recipe("table6-cifar10", "XXS").replace(batch_size=4, grad_clip=1.0)
    trainer = Trainer(recipe, 10, steps_per_epoch=5, device="cpu", amp=True)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 3])
    trainer.train_step(images, labels)
    before = {k: v.clone() for k, v in trainer.raw_model.state_dict().items()}
    moments = [s["exp_avg"].clone() for s in trainer.optimizer.state.values()]
    steps = [s["step"].clone() for s in trainer.optimizer.state.values()]
    sums, scale, rng = trainer.sums.clone(), trainer.scaler.get_scale(), torch.get_rng_state()
    trainer.warm_up(images, labels)
    for k, v in trainer.raw_model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for s, m, n in zip(trainer.optimizer.state.values(), moments, steps):
        assert torch.equal(s["exp_avg"], m) and torch.equal(s["step"], n)
    assert torch.equal(trainer.sums, sums) and trainer.scaler.get_scale() == scale
    assert torch.equal(torch.get_rng_state(), rng) and trainer.global_step == 1
    assert all(p.grad is None for p in trainer.raw_model.parameters())


def test_cuda_graphs_fall_back_on_cpu_with_a_reason(caplog):
    recipe = get_recipe("table6-cifar10", "XXS").replace(batch_size=4, cuda_graphs=True)
    with caplog.at_level("WARNING"):
        trainer = Trainer(recipe, 10, steps_per_epoch=5, device="cpu")
    assert not trainer.capture and "CUDA graphs need a CUDA device" in caplog.text
    out = trainer.train_step(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), torch.tensor([0, 1, 2, 3]))
    assert torch.isfinite(out["loss"])


def test_evaluate_checkpoint_needs_no_optimizer_and_shows_progress(straight, monkeypatch, capsys):
    from mlit.train import step

    root, out = straight

    def no_optimizer(*args, **kwargs):
        raise AssertionError("evaluation built an optimizer")

    monkeypatch.setattr(step, "build_optimizer", no_optimizer)
    res = evaluate_checkpoint(out, data_dir=str(CIFAR10_ARCHIVE), cache_dir=str(root / "cache"), verify=False,
                              limit=40, device="cpu", batch_size=16)
    assert res["images"] == 40 and 0 <= res["test_top1"] <= 100
    assert "eval" in capsys.readouterr().err  # the progress bar (3 batches)
    last = read_metrics(out)[-1]
    full = evaluate_checkpoint(out, data_dir=str(CIFAR10_ARCHIVE), cache_dir=str(root / "cache"), verify=False,
                               limit=16, device="cpu", progress=False)
    assert full["test_top1"] == pytest.approx(last["test_top1"])  # the run's own evaluation
