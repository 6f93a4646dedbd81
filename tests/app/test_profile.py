"""`mlit profile`: every component of a training step is found and timed."""

import torch

from mlit.profile import COMPONENTS, annotate, profile_training
from mlit.train.loop import Trainer
from mlit.train.recipes import get_recipe


def test_profile_reports_every_component_of_a_training_step():
    recipe = get_recipe("table6-cifar10", "XXS").replace(batch_size=4)
    report = profile_training(recipe, "cpu", "reference", steps=1, warmup=1)
    for component in COMPONENTS:
        assert report.by_component[component] > 0, component
    assert report.images_per_s > 0 and report.step_ms > 0
    text = report.table()
    assert "images/s" in text and "moe" in text


def test_pretraining_step_is_profiled_too():
    recipe = get_recipe("table3-cifar100", "XXS").replace(batch_size=4)
    report = profile_training(recipe, "cpu", "reference", steps=1, warmup=0)
    assert report.by_component["moe"] > 0 and report.by_component["attention"] > 0


def test_annotation_hooks_leave_the_step_unchanged():
    recipe = get_recipe("table6-cifar10", "XXS").replace(batch_size=4, augment=False)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 3])
    losses = []
    for hooked in (False, True):
        torch.manual_seed(0)
        trainer = Trainer(recipe, 10, steps_per_epoch=1, device="cpu")
        if hooked:
            annotate(trainer.raw_model, trainer)
        trainer.train_step(images, labels)
        losses.append([p.detach().clone() for p in trainer.raw_model.parameters()])
    for a, b in zip(*losses):
        assert torch.equal(a, b)


def test_images_per_s_is_stable_from_the_first_warmup_setting():
    """The trainer warms up on the real shapes before any clock and the step time is a median,
    so --warmup 0 and --warmup 2 report the same rate (within the noise of a shared CPU)."""
    import pytest

    recipe = get_recipe("table6-cifar10", "XXS").replace(batch_size=8)
    rates = [profile_training(recipe, "cpu", "reference", steps=3, warmup=w).images_per_s for w in (0, 2)]
    assert 0.5 < rates[0] / rates[1] < 2.0, rates
    with pytest.raises(ValueError, match="steps must be >= 1"):
        profile_training(recipe, "cpu", "reference", steps=0)
