"""The command line: every bad value is one `mlit <cmd>: error:` line naming the flag, given
before any data are loaded; flags come from the Recipe fields; --config; defaults per data set."""

from __future__ import annotations

import json

import pytest
import torch

import mlit
from mlit.cli import build_parser, build_recipe, main
from mlit.train.recipes import FIELDS, get_recipe


@pytest.fixture
def no_data(monkeypatch):
    """Fail the test if anything tries to load a data set or start a run."""
    import mlit.data
    import mlit.train

    def refuse(*a, **k):
        pytest.fail("data were loaded / a run started before the bad value was reported")

    monkeypatch.setattr(mlit.data, "load_split", refuse)
    monkeypatch.setattr(mlit.train, "run", refuse)
    monkeypatch.setattr(mlit.train, "evaluate_checkpoint", refuse)


BAD = [
    (["train", "--lr", "nan"], "argument --lr: must be a finite number > 0; got nan"),
    (["train", "--base-lr", "nan"], "argument --base-lr: must be a finite number > 0; got nan"),
    (["train", "--lr", "-1"], "argument --lr: must be a finite number > 0; got -1.0"),
    (["train", "--weight-decay", "-5"], "argument --weight-decay: must be a finite number >= 0; got -5.0"),
    (["train", "--weight-decay", "inf"], "argument --weight-decay: must be a finite number >= 0"),
    (["train", "--epochs", "0"], "argument --epochs: must be an integer >= 1; got 0"),
    (["train", "--layer-decay", "1.5"], r"argument --layer-decay: must be a number in \(0, 1\]"),
    (["train", "--model", "M"], "argument --model: must be one of S, XS, XXS; got 'M'"),
    (["train", "--dataset", "imagenet"], "argument --dataset: must be one of cifar10, cifar100, svhn"),
    (["train", "--autoaugment", "imagenet"], "argument --autoaugment: must be one of cifar10, svhn, none"),
    (["train", "--crop-scale", "0.9,0.2"], "argument --crop-scale: must be two numbers LOW,HIGH"),
    (["train", "--dataset", "cifar10", "--eval-split", "val"],
     "argument --eval-split: cifar10 has no split 'val'; choose one of test"),
    (["train", "--set", "eval_split=val"], "argument --eval-split: fashion_mnist has no split 'val'"),
    (["train", "--set", "lr=nan"], "argument --lr: must be a finite number > 0; got nan"),
    (["train", "--device", "tpu"], "argument --device: unknown device 'tpu'; choose cpu"),
    (["train", "--backend", "bogus"], "argument --backend: unknown backend 'bogus'; choose one of auto, reference"),
    (["train", "--save-every", "0"], "argument --save-every: must be N .* or Nm"),
    (["train", "--save-every", "ten"], "argument --save-every: must be N .* or Nm"),
    (["train", "--max-steps", "0"], "argument --max-steps: must be an integer >= 1; got 0"),
    (["train", "--stop-after-epochs", "-1"], "argument --stop-after-epochs: must be an integer >= 1"),
    (["profile", "--steps", "0"], "argument --steps: must be an integer >= 1; got 0"),
    (["profile", "--warmup", "-1"], "argument --warmup: must be an integer >= 0"),
    (["eval", "run", "--limit", "0"], "argument --limit: must be an integer >= 1"),
    (["eval", "run", "--device", "tpu"], "argument --device: unknown device"),
    (["predict", "run", "x.png", "--top-k", "0"], "argument --top-k: must be an integer >= 1"),
    (["train", "--config", "/no/such/recipe.json"], "argument --config: config file /no/such/recipe.json does not exist"),
]
if not torch.cuda.is_available():
    BAD += [(["train", "--device", "cuda"], "argument --device: cuda: this machine has no usable CUDA device"),
            (["train", "--device", "cuda:1"], "argument --device: cuda:1: this machine has no usable CUDA device"),
            (["eval", "run", "--device", "cuda"], "argument --device: cuda: this machine has no usable CUDA device")]


@pytest.mark.parametrize("argv, message", BAD, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_bad_values_give_one_error_line_naming_the_flag(argv, message, no_data, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ": error:" in ln]
    assert len(lines) == 1, err
    import re

    assert lines[0].startswith(f"mlit {argv[0]}: error: ") and re.search(message, lines[0]), lines[0]
    assert "Traceback" not in err


def test_triton_on_a_cpu_without_the_interpreter_says_how_to_enable_it(monkeypatch, no_data, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for argv in (["train", "--backend", "triton", "--device", "cpu"],
                 ["eval", "run", "--backend", "triton", "--device", "cpu"],
                 ["profile", "--backend", "triton", "--device", "cpu"]):
        with pytest.raises(SystemExit, match="argument --backend: triton on cpu .*TRITON_INTERPRET=1"):
            main(argv)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # with the interpreter it passes the check (and reaches the run)
    with pytest.raises(pytest.fail.Exception, match="a run started"):
        main(["train", "--backend", "triton", "--device", "cpu", "--data-dir", "."])


def test_missing_data_dir_is_reported_before_loading(tmp_path, no_data):
    with pytest.raises(SystemExit, match=f"argument --data-dir: {tmp_path / 'nowhere'} does not exist"):
        main(["train", "--data-dir", str(tmp_path / "nowhere"), "--device", "cpu"])


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"mlit {mlit.__version__}"


def _parse(*argv):
    return build_parser().parse_args(list(argv))


def test_every_recipe_field_with_a_flag_and_its_help(capsys):
    """One source of truth: each flag is made from its Recipe field; --help shows its help and choices."""
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for name, f in FIELDS.items():
        flag = "--" + name.replace("_", "-")
        shown = f.metadata["cli"] and "train" in f.metadata["tasks"]
        assert (flag in out) == shown, flag
        if shown:
            assert " ".join(f.metadata["help"].split()[:3]) in " ".join(out.split()), name
    assert "{S,XS,XXS}" in out and "{cifar10,cifar100,svhn,flowers102,fashion_mnist}" in out
    assert "{auto,reference,triton}" in out and "{cifar10,svhn,none}" in out
    # every earlier flag name still parses
    args = _parse("train", "--model", "xs", "--dataset", "cifar10", "--epochs", "3", "--warmup-epochs", "0.5",
                  "--batch-size", "32", "--base-lr", "2e-3", "--lr", "1e-3", "--min-lr", "0", "--weight-decay", "0.1",
                  "--layer-decay", "0.9", "--seed", "4", "--data-dir", ".", "--cache-dir", "c", "--limit-train", "64",
                  "--limit-test", "8", "--eval-every", "2", "--eval-split", "test", "--no-verify", "--download",
                  "--no-augment", "--no-amp", "--out", "o", "--device", "cpu", "--backend", "reference",
                  "--stop-after-epochs", "1", "--no-progress")
    recipe, _, out_dir = build_recipe(args, "train")
    assert (recipe.model, recipe.dataset, recipe.epochs, recipe.warmup_epochs, recipe.batch_size, recipe.lr,
            recipe.weight_decay, recipe.layer_decay, recipe.seed, recipe.limit_train, recipe.eval_every) == (
        "XS", "cifar10", 3, 0.5, 32, 1e-3, 0.1, 0.9, 4, 64, 2)
    assert (recipe.verify, recipe.download, recipe.augment, recipe.amp) == (False, True, False, False)
    assert out_dir == "o"
    assert _parse("finetune", "--pretrained", "p").pretrained == "p"
    assert _parse("pretrain", "--mask-ratio", "0.5").mask_ratio == 0.5


def test_dataset_without_recipe_picks_the_papers_recipe_for_it():
    recipe, _, out = build_recipe(_parse("train", "--dataset", "cifar10"), "train")
    assert recipe.name == "table6-cifar10" and recipe.dataset == "cifar10" and out.endswith("table6-cifar10-xxs")
    recipe, _, out = build_recipe(_parse("finetune", "--dataset", "svhn"), "finetune")
    assert recipe.name == "table5-svhn" and recipe.autoaugment == "svhn"
    recipe, _, out = build_recipe(_parse("pretrain", "--dataset", "cifar10"), "pretrain")
    assert recipe.name == "table3-cifar100" and recipe.dataset == "cifar10"
    assert out.endswith("table3-cifar100-cifar10-xxs")  # the folder names the data set actually used
    recipe, _, out = build_recipe(_parse("train"), "train")
    assert recipe.name == "table6-fashion_mnist" and out.endswith("table6-fashion_mnist-xxs")


def test_banner_names_the_data_set_trained_on(monkeypatch, capsys):
    import mlit.train

    seen = {}
    monkeypatch.setattr(mlit.train, "run", lambda recipe, out, **kw: seen.update(recipe=recipe, out=out, **kw))
    assert main(["train", "--dataset", "cifar10", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "recipe table6-cifar10" in err and "data cifar10" in err and "fashion" not in err
    assert seen["recipe"].dataset == "cifar10"
    assert main(["train", "--recipe", "table6-cifar10", "--dataset", "svhn", "--device", "cpu"]) == 0
    assert "table6-cifar10 is the paper's setting for cifar10; running it on svhn" in capsys.readouterr().err


def test_save_every_and_max_steps_reach_run(monkeypatch):
    import mlit.train

    calls = []
    monkeypatch.setattr(mlit.train, "run", lambda recipe, out, **kw: calls.append(kw))
    assert main(["train", "--save-every", "500", "--max-steps", "20", "--device", "cpu"]) == 0
    assert main(["train", "--save-every", "10m", "--device", "cpu"]) == 0
    assert main(["train", "--save-every", "2.5min", "--device", "cpu"]) == 0
    assert main(["train", "--device", "cpu"]) == 0
    assert calls[0]["save_every_steps"] == 500 and calls[0]["max_steps"] == 20
    assert calls[1]["save_every_minutes"] == 10.0 and "save_every_steps" not in calls[1]
    assert calls[2]["save_every_minutes"] == 2.5
    assert not {"save_every_steps", "save_every_minutes", "max_steps"} & set(calls[3])


def test_inconsistent_recipes_warn(monkeypatch, capsys):
    import mlit.train

    monkeypatch.setattr(mlit.train, "run", lambda *a, **k: None)
    assert main(["train", "--epochs", "3", "--warmup-epochs", "5", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "mlit train: warning: warmup_epochs 5 >= epochs 3" in err
    assert main(["train", "--limit-train", "8", "--batch-size", "16", "--min-lr", "1", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "limit_train 8 is smaller than one batch (16)" in err and "min_lr 1 is above the peak lr" in err
    assert main(["train", "--epochs", "10", "--device", "cpu"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_config_accepts_a_runs_recipe_json(tmp_path):
    recipe = get_recipe("table6-cifar10", "XS").replace(epochs=7, hflip=0.25, autoaugment=None, limit_train=100)
    (tmp_path / "recipe.json").write_text(json.dumps({"recipe": recipe.to_dict(), "task": "train", "num_classes": 10}))
    got, _, _ = build_recipe(_parse("train", "--config", str(tmp_path / "recipe.json")), "train")
    assert got == recipe
    got, _, _ = build_recipe(_parse("train", "--config", str(tmp_path / "recipe.json"), "--epochs", "2",
                                    "--set", "hflip=0", "--model", "S"), "train")
    assert got == recipe.replace(epochs=2, hflip=0.0, model="S")
    # a bare recipe (as `mlit recipes --show` prints it) works too
    (tmp_path / "bare.json").write_text(json.dumps(recipe.to_dict()))
    assert build_recipe(_parse("train", "--config", str(tmp_path / "bare.json")), "train")[0] == recipe
    (tmp_path / "typo.json").write_text(json.dumps({"recipe": {**recipe.to_dict(), "epohcs": 3}}))
    with pytest.raises(SystemExit, match="unknown recipe field.*epohcs"):
        main(["train", "--config", str(tmp_path / "typo.json")])
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(SystemExit, match="not a readable JSON file"):
        main(["train", "--config", str(tmp_path / "junk.json")])
    with pytest.raises(SystemExit, match="cannot be combined with --recipe"):
        main(["train", "--config", str(tmp_path / "recipe.json"), "--recipe", "table6-svhn"])
    with pytest.raises(SystemExit, match="run it with `mlit train`"):
        main(["finetune", "--config", str(tmp_path / "recipe.json")])
