"""The model registry (mlit.create_model / list_models) and timm's conventions on the models."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mlit
from mlit.config import encoder_config
from mlit.models import MLiTClassifier, MMLiT
from mlit.train.checkpoint import CheckpointError, save_checkpoint, save_safetensors
from mlit_kernels import SharedSwiGLUMoE

ROOT = Path(__file__).resolve().parents[2]


def _meta(model, task, recipe=None):
    import dataclasses

    cfg = model.encoder.cfg
    return {"task": task, "model_config": dataclasses.asdict(cfg),
            "num_classes": None if task == "pretrain" else model.num_classes,
            "recipe": recipe or {"dataset": "cifar10"}}


def test_list_models():
    assert mlit.list_models() == ["mlit_s", "mlit_xs", "mlit_xxs", "mmlit_s", "mmlit_xs", "mmlit_xxs"]
    assert mlit.list_models("mmlit_*") == ["mmlit_s", "mmlit_xs", "mmlit_xxs"]


@pytest.mark.parametrize("name, cls, size", [("mlit_s", MLiTClassifier, "S"), ("mlit_xxs", MLiTClassifier, "XXS"),
                                             ("MMLIT_XS", MMLiT, "XS")])
def test_create_model_builds_the_preset(name, cls, size):
    model = mlit.create_model(name, num_classes=7)
    assert isinstance(model, cls) and model.encoder.cfg == encoder_config(size)
    assert {m.backend for m in model.modules() if isinstance(m, SharedSwiGLUMoE)} == {"auto"}
    if cls is MLiTClassifier:
        assert model.num_classes == 7 and model.head.out_features == 7
    assert model.training


def test_create_model_errors():
    with pytest.raises(ValueError, match="unknown model 'vit_base'; choose one of mlit_s, mlit_xs"):
        mlit.create_model("vit_base")
    with pytest.raises(ValueError, match="backend"):
        mlit.create_model("mlit_xxs", backend="fast")


def test_timm_conventions_on_the_classifier():
    torch.manual_seed(0)
    model = mlit.create_model("mlit_xxs", num_classes=5, backend="reference").eval()
    x = torch.randn(3, 3, 36, 36)
    features = model.forward_features(x)
    assert features.shape == (3, 145, 108)
    logits, aux = model(x)
    torch.testing.assert_close(model.forward_head(features), logits)
    torch.testing.assert_close(model.forward_head(features, pre_logits=True), features[:, -1])
    assert model.get_classifier() is model.head and model.num_features == 108
    model.reset_classifier(3)
    assert model(x)[0].shape == (3, 3) and model.num_classes == 3
    model.reset_classifier(0)
    assert model(x)[0].shape == (3, 108)  # no head: the pooled features
    with pytest.raises(ValueError, match="num_classes"):
        model.reset_classifier(-1)


def test_set_backend_reaches_every_moe_layer_including_the_decoder():
    model = MMLiT(encoder_config("XXS"))
    layers = [m for m in model.modules() if isinstance(m, SharedSwiGLUMoE)]
    assert len(layers) == 9 + 4
    model.set_backend("auto")
    assert {m.backend for m in layers} == {"auto"}
    classifier = MLiTClassifier(encoder_config("XXS"), 10)
    classifier.set_backend("triton")
    assert {m.backend for m in classifier.modules() if isinstance(m, SharedSwiGLUMoE)} == {"triton"}
    with pytest.raises(ValueError, match="backend"):
        model.set_backend("fast")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An XXS classifier with non-default weights, saved as a run would (both files)."""
    torch.manual_seed(1)
    model = MLiTClassifier(encoder_config("XXS"), 10)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    run = tmp_path_factory.mktemp("run")
    meta = _meta(model, "train", {"dataset": "cifar10", "gate_noise": True})
    save_safetensors(model, run / "model.safetensors", meta)
    save_checkpoint(run / "checkpoint.pt", {**meta, "model": model.state_dict()})
    return model.eval(), run


@pytest.mark.parametrize("which", ["run dir", "model.safetensors", "checkpoint.pt"])
def test_create_model_loads_a_run(trained, which):
    model, run = trained
    path = run if which == "run dir" else run / which
    rebuilt = mlit.create_model("mlit_xxs", checkpoint=path, backend="reference").eval()
    assert rebuilt.num_classes == 10
    x = torch.randn(2, 3, 36, 36)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x)[0], model(x)[0], rtol=0, atol=0)


def test_create_model_in_another_script(trained):
    """The done-when check: a separate Python process rebuilds the run's model from its files."""
    model, run = trained
    x = torch.randn(2, 3, 36, 36)
    torch.save(x, run / "x.pt")
    script = ("import sys, torch, mlit\n"
              "m = mlit.create_model('mlit_xxs', checkpoint=sys.argv[1]).eval()\n"
              "with torch.no_grad():\n"
              "    torch.save(m(torch.load(sys.argv[2]))[0], sys.argv[3])\n")
    subprocess.run([sys.executable, "-c", script, str(run / "model.safetensors"), str(run / "x.pt"),
                    str(run / "y.pt")], check=True, cwd=ROOT, timeout=120)
    with torch.no_grad():
        # (another process may use other thread counts: float sums in another order)
        torch.testing.assert_close(torch.load(run / "y.pt"), model(x)[0], rtol=1e-5, atol=1e-5)


def test_checkpoint_of_another_size_or_kind_is_refused(trained):
    _, run = trained
    with pytest.raises(CheckpointError, match=r"(?s)does not hold a mlit_xs model.*checkpoint: .*model XXS.*mlit_xs: "):
        mlit.create_model("mlit_xs", checkpoint=run)
    with pytest.raises(CheckpointError, match="not a masked auto-encoder"):
        mlit.create_model("mmlit_xxs", checkpoint=run)


def test_other_num_classes_keeps_the_encoder_and_starts_a_fresh_head(trained):
    model, run = trained
    rebuilt = mlit.create_model("mlit_xxs", num_classes=4, checkpoint=run)
    assert rebuilt.num_classes == 4
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(rebuilt.encoder.state_dict()[k], v), k


def test_pretraining_checkpoint_fills_mmlit_or_an_encoder(tmp_path):
    torch.manual_seed(2)
    mae = MMLiT(encoder_config("XXS"))
    with torch.no_grad():
        mae.mask_token.add_(1.0)
    meta = _meta(mae, "pretrain", {"dataset": "cifar100", "mask_ratio": 0.5, "mae_alpha": 0.2, "mae_beta": 0.3})
    save_safetensors(mae, tmp_path / "model.safetensors", meta)
    rebuilt = mlit.create_model("mmlit_xxs", checkpoint=tmp_path)
    assert (rebuilt.mask_ratio, rebuilt.alpha, rebuilt.beta) == (0.5, 0.2, 0.3)
    for k, v in mae.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[k], v), k
    classifier = mlit.create_model("mlit_xxs", num_classes=100, checkpoint=tmp_path)
    for k, v in mae.encoder.state_dict().items():
        assert torch.equal(classifier.encoder.state_dict()[k], v), k


def test_load_model_names_the_model_from_its_checkpoint(trained):
    from mlit.registry import load_model

    model, run = trained
    loaded, meta = load_model(run, backend="reference")
    assert isinstance(loaded, MLiTClassifier) and not loaded.training
    assert meta["task"] == "train" and meta["recipe"]["dataset"] == "cifar10" and "model" not in meta
