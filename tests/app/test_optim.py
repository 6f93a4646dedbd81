"""Optimizer groups (layer-wise lr decay, no-decay set), the warm-up + cosine schedule, recipes."""

import math

import pytest
import torch

from mlit.config import encoder_config
from mlit.models import MLiTClassifier, MMLiT
from mlit.train.optim import (
    WarmupCosine,
    build_optimizer,
    layer_id,
    no_weight_decay,
    param_groups,
)
from mlit.train.recipes import (
    ALIASES,
    BUILDERS,
    RecipeError,
    apply_overrides,
    get_recipe,
    recipe_names,
)


def _groups_by_name(model, wd=0.05, decay=0.75):
    out = {}
    for g in param_groups(model, wd, decay):
        for n in g["names"]:
            out[n] = g
    return out


def test_layer_decay_scales_xxs():
    cfg = encoder_config("XXS")
    L = cfg.depth  # 9
    model = MLiTClassifier(cfg, 10)
    d = 0.75
    by = _groups_by_name(model, decay=d)
    assert set(by) == {n for n, _ in model.named_parameters()}
    assert by["head.weight"]["lr_scale"] == 1.0 and by["head.bias"]["lr_scale"] == 1.0
    assert by["encoder.norm.weight"]["lr_scale"] == 1.0
    assert by["encoder.patch_embed.weight"]["lr_scale"] == pytest.approx(d ** (L + 1))
    assert by["encoder.pos_embed"]["lr_scale"] == pytest.approx(d ** (L + 1))
    for j in range(1, L + 1):  # layer j (1-based) gets d^(L+1-j)
        for n, g in by.items():
            if n.startswith(f"encoder.blocks.layers.{j - 1}."):
                assert g["lr_scale"] == pytest.approx(d ** (L + 1 - j)), n
    assert by["encoder.blocks.layers.0.moe.w1"]["lr_scale"] == pytest.approx(d**L)
    assert by[f"encoder.blocks.layers.{L - 1}.norm1.weight"]["lr_scale"] == pytest.approx(d)


def test_no_weight_decay_set():
    model = MLiTClassifier(encoder_config("XXS"), 10)
    by = _groups_by_name(model)
    for name, p in model.named_parameters():
        last = name.rsplit(".", 1)[-1]
        expect_no_wd = (last in ("bias", "b1", "b_v", "b2", "pos_embed") or ".norm" in name or name.startswith("encoder.norm"))
        assert (by[name]["weight_decay"] == 0.0) == expect_no_wd, name
    # b1 is 2-D (t, d_h) but is a bias: no decay; the gate matrices are weights: decay
    b1 = "encoder.blocks.layers.0.moe.b1"
    assert dict(model.named_parameters())[b1].dim() == 2 and by[b1]["weight_decay"] == 0.0
    assert by["encoder.blocks.layers.0.moe.w_gate"]["weight_decay"] == 0.05
    assert by["encoder.blocks.layers.0.moe.w1"]["weight_decay"] == 0.05
    assert by["encoder.patch_embed.weight"]["weight_decay"] == 0.05
    assert by["head.weight"]["weight_decay"] == 0.05


def test_mae_no_decay_and_scale():
    model = MMLiT(encoder_config("XXS"))
    skip = no_weight_decay(model)
    assert {"mask_token", "decoder_pos_embed", "encoder.pos_embed", "decoder_norm.weight", "decoder_norm.bias"} <= skip
    assert "decoder_pred.weight" not in skip and "decoder_embed.weight" not in skip
    assert layer_id("decoder.layers.0.moe.w1", 9) == 10
    groups = param_groups(model, 0.05, 1.0)
    assert all(g["lr_scale"] == 1.0 for g in groups)
    n = sum(len(g["params"]) for g in groups)
    assert n == len(list(model.parameters()))


def test_optimizer_lrs_follow_scales():
    model = MLiTClassifier(encoder_config("XXS"), 10)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    sched = WarmupCosine(opt, 1e-3, total_steps=100, warmup_steps=10)
    sched.step(4)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(1e-3 * 5 / 10 * g["lr_scale"])


def test_warmup_cosine_shape():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    s = WarmupCosine(opt, 2.0, total_steps=110, warmup_steps=10, min_lr=0.1)
    lrs = [s.lr_at(i) for i in range(110)]
    assert lrs[0] == pytest.approx(0.2) and lrs[9] == pytest.approx(2.0)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))  # rising
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # falling
    assert lrs[60] == pytest.approx(0.1 + 1.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert s.lr_at(110) == pytest.approx(0.1)
    s.step(3)
    t = WarmupCosine(opt, 1.0, 1, 0)
    t.load_state_dict(s.state_dict())
    assert t.lr_at(3) == s.lr_at(3) and t.last_step == 3


def test_recipes_match_the_paper():
    r = get_recipe("table3-cifar100", "S")
    assert (r.task, r.epochs, r.warmup_epochs, r.batch_size, r.base_lr, r.crop_scale) == (
        "pretrain", 4000, 200, 840, 3e-4, (0.6, 1.0))
    assert get_recipe("table3-pretrain-xxs").epochs == 8000
    r = get_recipe("table4-cifar100")
    assert (r.epochs, r.warmup_epochs, r.batch_size, r.base_lr, r.layer_decay, r.autoaugment) == (
        300, 20, 448, 5e-3, 0.9, "cifar10")
    r = get_recipe("table8-mmlit-xs-cifar10")
    assert (r.task, r.model, r.batch_size, r.base_lr, r.layer_decay, r.warmup_epochs) == (
        "finetune", "XS", 256, 2.5e-3, 0.8, 5)
    assert get_recipe("table5-svhn").autoaugment == "svhn"
    r = get_recipe("table8-mlit-xxs-flowers102")
    assert (r.task, r.batch_size, r.base_lr, r.layer_decay, r.warmup_epochs) == ("train", 16, 1e-2, 1.0, 10)
    r = get_recipe("table6-cifar100")
    assert (r.batch_size, r.base_lr) == (128, 2e-3)
    assert r.peak_lr == pytest.approx(2e-3 * 128 / 256)  # Eq. 17
    fm = get_recipe("table6-fashion_mnist")
    c10 = get_recipe("table6-cifar10")
    assert (fm.batch_size, fm.base_lr, fm.warmup_epochs, fm.autoaugment) == (
        c10.batch_size, c10.base_lr, c10.warmup_epochs, c10.autoaugment)
    assert len(recipe_names()) == len(BUILDERS) + len(ALIASES)


def test_recipe_errors_and_overrides():
    with pytest.raises(RecipeError, match="unknown recipe"):
        get_recipe("table9-imagenet")
    with pytest.raises(RecipeError, match="conflicts"):
        get_recipe("table8-mlit-xxs-cifar10", "S")
    with pytest.raises(RecipeError, match="model size"):
        get_recipe("table6-cifar10", "XL")
    r = apply_overrides(get_recipe("table6-cifar10"), {"epochs": 3, "lr": None},
                        ["autoaugment=none", "crop_scale=0.5,1", "gate_noise=false", "limit_train=10"])
    assert (r.epochs, r.autoaugment, r.crop_scale, r.gate_noise, r.limit_train) == (3, None, (0.5, 1.0), False, 10)
    with pytest.raises(RecipeError, match="unknown recipe field"):
        apply_overrides(r, {}, ["epochz=3"])
    with pytest.raises(RecipeError, match="epochs: must be an integer; got .three."):
        apply_overrides(r, {}, ["epochs=three"])
    with pytest.raises(RecipeError):
        apply_overrides(r, {}, ["epochs=0"])


def test_cli_lists_and_shows_recipes(capsys):
    import json

    from mlit.cli import main

    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in ("table3-cifar100", "table4-cifar100", "table5-svhn", "table6-flowers102", "table6-fashion_mnist",
                 "table8-mlit-xxs-cifar10", "table8-mmlit-s-cifar100", "table7-mmlit-xs", "table3-pretrain-xxs"):
        assert name in out
    assert main(["recipes", "--show", "table8-mlit-xxs-cifar10"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["name"], shown["model"], shown["task"], shown["epochs"]) == ("table6-cifar10", "XXS", "train", 100)
    with pytest.raises(SystemExit):
        main(["train", "--epochs", "many"])  # argparse rejects it


def _by_role(model) -> set[str]:
    """The no-decay set as names and module types tell it: biases, LayerNorms, position tables, mask token."""
    norms = {f"{m}.{p}" for m, mod in model.named_modules() if isinstance(mod, torch.nn.LayerNorm)
             for p, _ in mod.named_parameters(recurse=False)}
    roles = ("bias", "b1", "b_v", "b2", "pos_embed", "decoder_pos_embed", "mask_token")
    return norms | {n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] in roles}


@pytest.mark.parametrize("make", [lambda: MLiTClassifier(encoder_config("XXS"), 10), lambda: MMLiT(encoder_config("XXS")),
                                  lambda: MMLiT(encoder_config("XXS"), decoder_pos_embed=False)])
def test_models_declare_their_no_decay_set(make):
    """The optimizer asks the model (timm's no_weight_decay()); the set is every bias, norm and embedding."""
    model = make()
    assert model.no_weight_decay() == _by_role(model)
    assert no_weight_decay(model) == model.no_weight_decay()
    assert set(model.no_weight_decay()) <= {n for n, _ in model.named_parameters()}
    # wrappers (DDP's .module, torch.compile's ._orig_mod) are looked through
    wrapper = torch.nn.Module()
    wrapper.module = model
    assert no_weight_decay(wrapper) == model.no_weight_decay()


def test_no_weight_decay_of_a_plain_model_is_the_1d_parameters():
    plain = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    assert no_weight_decay(plain) == {"0.bias", "1.weight", "1.bias"}


def test_layer_decay_one_gives_two_groups():
    """With layer_decay = 1 every layer has lr scale 1: one AdamW group with decay, one without."""
    model = MLiTClassifier(encoder_config("XXS"), 10)
    groups = param_groups(model, 0.05, 1.0)
    assert [(g["weight_decay"], g["lr_scale"]) for g in groups] == [(0.0, 1.0), (0.05, 1.0)]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
