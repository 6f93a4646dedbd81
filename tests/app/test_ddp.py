"""DistributedDataParallel on CPU (gloo): 2 processes started by torchrun give the weights of one
process with the same global batch, once randomness is off (no augmentation, dropout 0, noise-free
gating, auxiliary-loss weight 0 — the per-rank balancing loss legitimately differs); a rank frees
its DDP wrapper before the process group goes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from shared_data import CIFAR10_ARCHIVE as CIFAR10_MINI  # the real subset, else generated files
import torch

from mlit.cli import main



def _args(out, cache):
    return ["train", "--recipe", "table8-mlit-xxs-cifar10", "--data-dir", str(cifar10_mini_archive()), "--no-verify",
            "--cache-dir", str(cache), "--epochs", "2", "--batch-size", "16", "--limit-train", "48",
            "--limit-test", "32", "--lr", "1e-3", "--warmup-epochs", "0.5", "--no-augment", "--set", "dropout=0",
            "--set", "gate_noise=false", "--set", "aux_weight=0", "--no-progress", "--device", "cpu", "--out", str(out)]


def test_two_gloo_processes_match_one(tmp_path):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    assert main(_args(tmp_path / "one", tmp_path / "cache-one")) == 0
    # the two ranks fill an empty data cache at once (each writes it atomically; neither may
    # remove the other's temporary file)
    proc = _torchrun(["-m", "mlit", *_args(tmp_path / "two", tmp_path / "cache-two")])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    from safetensors.torch import load_file

    from mlit.train.checkpoint import load_checkpoint
    from mlit.train.metrics import read_metrics

    one, two = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "two" / "model.safetensors"))
    assert one.keys() == two.keys()
    # The key bias of attention has an exactly zero gradient (softmax ignores a shift shared by all
    # keys); its float-noise gradient differs with the summation order and Adam scales that noise up
    # to ±lr, so it is left out. Everything else must agree closely (Adam still amplifies rounding).
    def comparable(name, t):
        if name.endswith("attn.qkv.bias"):
            dim = one["head.weight"].shape[1]
            kv = (t.numel() - dim) // 2
            return torch.cat([t[:dim], t[dim + kv:]])
        return t

    worst = max((comparable(k, one[k]) - comparable(k, two[k])).abs().max().item() for k in one)
    assert worst < 1e-4, worst
    # ... while training moved the weights far more than that from the (shared, seeded) start
    from mlit.train.loop import build_model, model_config, seed_everything
    from mlit.train.recipes import Recipe

    recipe = Recipe.from_dict(load_checkpoint(tmp_path / "one")["recipe"])
    seed_everything(recipe.seed)
    init = build_model("train", model_config(recipe), 10, recipe).state_dict()
    moved = max((one[k] - init[k]).abs().max().item() for k in one)
    assert moved > 20 * max(worst, 1e-7), (moved, worst)
    st = load_checkpoint(tmp_path / "two")
    assert st["world_size"] == 2 and len(st["rng"]) == 2 and st["global_step"] == 6
    r1, r2 = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["epoch"] for r in r2] == [1, 2]  # only rank 0 wrote
    assert r1[-1]["train_loss"] == pytest.approx(r2[-1]["train_loss"], rel=1e-4)
    assert r1[-1]["test_top1"] == pytest.approx(r2[-1]["test_top1"])
    assert r1[-1]["test_loss"] == pytest.approx(r2[-1]["test_loss"], rel=1e-4)


_TEARDOWN = """
import sys
import weakref
from pathlib import Path

import torch

from mlit.train import distributed as D
from mlit.train.recipes import get_recipe
from mlit.train.step import Trainer

info = D.setup("cpu")
trainer = Trainer(get_recipe("table8-mlit-xxs-cifar10"), 10, 1, info.device, info=info)
trainer.train_step(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.tensor([0, 1]))
ddp = weakref.ref(trainer.model)
reducer = weakref.ref(trainer.model.reducer)
trainer.close()
assert ddp() is None and reducer() is None, "the DDP wrapper outlives Trainer.close()"
try:
    trainer.train_step(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.tensor([0, 1]))
except RuntimeError as e:
    assert "closed" in str(e), e
else:
    raise AssertionError("train_step after close() ran")
D.cleanup()
(Path(sys.argv[1]) / f"closed-{info.rank}").touch()
"""


def test_close_frees_the_reducer_before_the_group_goes(tmp_path):
    """run() closes the trainer before destroying the process group: a DDP reducer left as the
    group's last owner destroys it holding the GIL, which deadlocked a rank at exit about once in
    a hundred CPU runs (see mlit.train.distributed.cleanup)."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    script = tmp_path / "teardown.py"
    script.write_text(_TEARDOWN)
    proc = _torchrun([str(script), str(tmp_path)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # a file each (the ranks' prints share one pipe and may interleave)
    assert sorted(p.name for p in tmp_path.glob("closed-*")) == ["closed-0", "closed-1"]


def _torchrun(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc_per_node 2 *args`` on the CPU. Past
    ``timeout`` the test fails after SIGTERM to the launcher, which ends its ranks (each in a
    session of its own, out of reach of a plain kill) before it exits: none is left behind."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            out, err = proc.communicate()
            pytest.fail(f"torchrun did not finish in {timeout:.0f} s:\n{out[-3000:]}{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def cifar10_mini_archive() -> Path:
    """The shared CIFAR-10 subset (read with --no-verify), or skip."""
    if CIFAR10_MINI is None:
        pytest.skip("shared/data/cifar10-mini not found beside the checkout (set MLIT_TEST_DATA)")
    return CIFAR10_MINI
