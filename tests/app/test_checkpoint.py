"""Checkpoints: atomic writes, exact resume (after a planned stop and after SIGTERM mid-epoch),
safetensors export, mismatch errors naming both configurations."""

from __future__ import annotations

import dataclasses
import os
import signal
from pathlib import Path

import pytest
from shared_data import CIFAR10_ARCHIVE as CIFAR10_MINI  # the real subset, else generated files
import torch

from mlit.atomic import atomic_write, stale_temporaries
from mlit.cli import main
from mlit.config import encoder_config
from mlit.train import checkpoint as ckpt



def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "c.pt"
    ckpt.save_checkpoint(path, {"model": {"w": torch.ones(2)}})
    ckpt.save_checkpoint(path, {"model": {"w": torch.zeros(2)}})
    assert torch.equal(ckpt.load_checkpoint(path)["model"]["w"], torch.zeros(2))
    assert os.listdir(path.parent) == ["c.pt"]

    def boom(f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        ckpt.atomic_write(path, boom)
    assert os.listdir(path.parent) == ["c.pt"]  # the old file intact, no temp left
    assert torch.equal(ckpt.load_checkpoint(path)["model"]["w"], torch.zeros(2))


def test_a_concurrent_writer_keeps_its_temp_file(tmp_path):
    """Two writers of one target at once (the ranks of a torchrun job filling one data cache): the
    second must not take the first's temporary file for a killed writer's leftover."""
    path = tmp_path / "cache.pt"

    def first(f):
        f.write(b"first")
        atomic_write(path, lambda g: g.write(b"second"))  # starts and ends inside the first write
        assert (path.read_bytes(), len(stale_temporaries(path))) == (b"second", 1)

    atomic_write(path, first)
    assert path.read_bytes() == b"first"  # the last rename wins
    assert os.listdir(tmp_path) == ["cache.pt"]


def test_bad_checkpoints(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ckpt.CheckpointError, match="cannot read"):
        ckpt.load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint.pt"):
        ckpt.load_checkpoint(tmp_path)


def test_mismatch_names_both_configurations():
    xxs, xs = dataclasses.asdict(encoder_config("XXS")), dataclasses.asdict(encoder_config("XS"))
    state = {"task": "train", "model_config": xxs, "num_classes": 10}
    ckpt.check_compatible(state, "finetune", dict(xxs, dropout=0.0), 10)  # dropout may differ
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.check_compatible(state, "train", xs, 10, "c.pt")
    msg = str(e.value)
    assert "checkpoint: task=train, model XXS" in msg and "this run:   task=train, model XS" in msg
    assert "embed_dim=108" in msg and "embed_dim=128" in msg
    with pytest.raises(ckpt.CheckpointError, match="num_classes=100"):
        ckpt.check_compatible(state, "train", xxs, 100)
    with pytest.raises(ckpt.CheckpointError, match="task=pretrain"):
        ckpt.check_compatible(state, "pretrain", xxs, None)


def _args(out, cache, *extra):
    # augmentation, dropout and gate noise stay on: the resumed run must continue the RNG streams
    return ["train", "--recipe", "table8-mlit-xxs-cifar10", "--data-dir", str(cifar10_mini_archive()),
            "--no-verify", "--cache-dir", str(cache), "--epochs", "2", "--batch-size", "16", "--limit-train", "64",
            "--limit-test", "16", "--warmup-epochs", "1", "--no-progress", "--device", "cpu", "--out", str(out), *extra]


def _weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / "model.safetensors"))


def _assert_same(a, b):
    assert a.keys() == b.keys()
    worst = max((x - b[k]).abs().max().item() for k, x in a.items())
    assert worst <= 1e-6, worst


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    assert main(_args(root / "straight", root / "cache")) == 0
    return root


def test_resume_after_planned_stop_is_exact(straight):
    root = straight
    out = root / "stopped"
    assert main(_args(out, root / "cache", "--stop-after-epochs", "1")) == 0
    state = ckpt.load_checkpoint(out)
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 0, 4)
    assert not (out / "model.safetensors").exists()
    assert main(["train", "--resume", str(out), "--no-progress", "--device", "cpu"]) == 0
    _assert_same(_weights(root / "straight"), _weights(out))
    straight_state = ckpt.load_checkpoint(root / "straight")
    resumed_state = ckpt.load_checkpoint(out)
    assert resumed_state["global_step"] == straight_state["global_step"] == 8
    # the optimizer moments continue too
    for sa, sb in zip(straight_state["optimizer"]["state"].values(), resumed_state["optimizer"]["state"].values()):
        assert torch.allclose(sa["exp_avg"], sb["exp_avg"], atol=1e-6, rtol=0)
    assert [r["epoch"] for r in __import__("mlit.train.metrics", fromlist=["x"]).read_metrics(out)] == [1, 2]


def test_sigterm_mid_epoch_checkpoints_and_resumes_exactly(straight, monkeypatch):
    from mlit.train.loop import Trainer

    root = straight
    out = root / "killed"
    original = Trainer.train_step

    def step_then_signal(self, images, labels=None):
        res = original(self, images, labels)
        if self.global_step == 6:  # second epoch, step 2 of 4
            os.kill(os.getpid(), signal.SIGTERM)
        return res

    monkeypatch.setattr(Trainer, "train_step", step_then_signal)
    rc = main(_args(out, root / "cache"))
    assert rc == 128 + signal.SIGTERM
    state = ckpt.load_checkpoint(out)
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 2, 6)
    monkeypatch.setattr(Trainer, "train_step", original)
    assert main(["train", "--resume", str(out / "checkpoint.pt"), "--no-progress", "--device", "cpu"]) == 0
    _assert_same(_weights(root / "straight"), _weights(out))


def test_safetensors_metadata_round_trip(straight):
    state = ckpt.load_checkpoint(straight / "straight" / "model.safetensors")
    assert state["task"] == "train" and state["num_classes"] == 10
    assert state["model_config"]["name"] == "XXS" and state["recipe"]["name"] == "table6-cifar10"
    assert "head.weight" in state["model"]


def cifar10_mini_archive() -> Path:
    """The shared CIFAR-10 subset (read with --no-verify), or skip."""
    if CIFAR10_MINI is None:
        pytest.skip("shared/data/cifar10-mini not found beside the checkout (set MLIT_TEST_DATA)")
    return CIFAR10_MINI


# --- safe loading, leftovers of killed writes -------------------------------------------------


class _Payload:
    """A pickle that would run code when unpickled by an unsafe loader."""

    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_checkpoints_load_safely_and_never_run_a_files_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"model": {"w": torch.ones(1)}, "evil": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ckpt.CheckpointError, match=r"(?s)cannot read checkpoint .*evil.pt.*weights_only=True"):
        ckpt.load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "PWNED").exists()
    with pytest.raises(SystemExit, match="mlit eval: error: cannot read checkpoint"):
        main(["eval", str(tmp_path / "evil.pt"), "--device", "cpu"])
    assert not (tmp_path / "PWNED").exists()


def test_rng_states_are_plain_and_round_trip(tmp_path):
    import random

    import numpy as np

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # a cached gaussian in numpy's state
    state = ckpt.rng_state()
    expected = (random.random(), np.random.randn(), torch.rand(2))
    ckpt.save_checkpoint(tmp_path / "c.pt", {"model": {}, "rng": [state]})
    torch.load(tmp_path / "c.pt", weights_only=True)  # no allow-list needed
    ckpt.set_rng_state(ckpt.load_checkpoint(tmp_path / "c.pt")["rng"][0])
    got = (random.random(), np.random.randn(), torch.rand(2))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


def test_format_1_checkpoints_with_numpy_rng_state_still_load(tmp_path):
    import random

    import numpy as np

    old = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    expected = (random.random(), np.random.randn())
    torch.save({"format_version": 1, "model": {"w": torch.ones(1)}, "rng": [old]}, tmp_path / "old.pt")
    ckpt.set_rng_state(ckpt.load_checkpoint(tmp_path / "old.pt")["rng"][0])
    assert (random.random(), np.random.randn()) == expected


def test_a_killed_writes_temp_file_is_removed_by_the_next_write(tmp_path):
    path = tmp_path / "checkpoint.pt"
    leftover = tmp_path / ".checkpoint.pt.abc123.tmp"  # what a kill -9 during atomic_write leaves
    leftover.write_bytes(b"half a checkpoint")
    other = tmp_path / ".model.safetensors.x.tmp"  # another target's temp is not touched
    other.write_bytes(b"x")
    ckpt.save_checkpoint(path, {"model": {"w": torch.ones(1)}})
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.safetensors.x.tmp", "checkpoint.pt"]
