"""The training-step meters (bench/step_meters.py) and the budgets CI holds them to: no host sync
in a step (the first one included), augmentation <= 20 launches, every step and the XXS
evaluation forward within its pinned launch budget, a captured step = the batch gather + one
replay, and the modelled H100 row consistent with its launches."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import step_meters  # noqa: E402

from mlit_kernels.meter import Meter  # noqa: E402


@pytest.fixture(scope="module")
def rows():
    return {r.case: r for r in step_meters.step_rows()}


def test_step_table_has_every_case(rows):
    text = step_meters.step_table(list(rows.values()))
    for case, _, _ in step_meters.CASES:
        assert case in text
    for r in rows.values():
        assert r.launches == sum(r.by_part.values()), r
        assert all(v >= 0 for v in r.by_part.values()), r
        assert r.by_part["attention"] > 0 and r.by_part["moe"] > 0 and r.by_part["optimizer"] > 0, r


def test_no_host_sync_in_a_step(rows):
    """The first step of a fresh trainer and a later one, every model and task."""
    for r in rows.values():
        assert r.first_step_syncs == 0 and r.step_syncs == 0, r


def test_augmentation_budget(rows):
    for r in rows.values():
        assert r.by_part["augment"] <= step_meters.AUGMENT_BUDGET, r


def test_xxs_moe_budget(rows):
    row = rows["mLiT-XXS train"]
    assert row.by_part["moe"] <= 8 * 9, row  # the fused MoE layer: <= 8 launches a layer, fwd + bwd


def test_step_budgets(rows):
    for case, budget in step_meters.STEP_BUDGETS.items():
        assert rows[case].launches <= budget, rows[case]


def test_eval_forward_budget():
    assert step_meters.eval_launches() <= step_meters.EVAL_BUDGET


def test_modelled_h100_row():
    """At a tiny batch: bytes above the step's minimum, matmul FLOPs counted, each launch at
    least its launch cost, uncaptured slower than captured."""
    from mlit_kernels.meter import H100

    row = step_meters.model_row("mLiT-XXS train", "table6-cifar10", "XXS", batch=2)
    assert row.syncs == 0 and row.launches <= step_meters.STEP_BUDGETS["mLiT-XXS train"]
    assert row.bytes > row.min_bytes > 0 and row.flops > 0
    # the layer-at-a-time minimum: 3 passes over each of the 9 layers' fp32 inputs (2 images × 145 tokens × 108)
    assert row.min_layer_bytes - row.min_bytes == 3 * 9 * 2 * 145 * 108 * 4
    floor = 1 - 1e-9  # a sum of launch costs alone (every launch launch-bound at batch 2) rounds below the product
    assert row.seconds_captured >= row.launches * H100.launch_captured * floor
    assert row.seconds_uncaptured >= row.launches * H100.launch_uncaptured * floor > row.seconds_captured
    assert "img/s captured" in step_meters.model_table([row]) and "attention" in step_meters.part_table([row])
    eager = 3 * H100.launch_uncaptured  # images and labels gathered, the replay
    assert sum(row.part_seconds.values()) == pytest.approx(row.seconds_captured - eager)


def test_captured_step_is_the_gather_and_one_replay(rows):
    for case, r in rows.items():
        inputs = 1 if "pretrain" in case else 2  # images (+ labels) gathered into the graph's buffers
        assert r.captured_launches == inputs + 1, r


def test_reference_step_has_no_host_sync():
    """The whole step on the reference backend (plain torch MoE and augmentation), the CUDA
    configuration emulated: 0 syncs from the very first step, and none in the warm-up."""
    from mlit.train.recipes import get_recipe
    from mlit.train.step import Trainer

    for name in ("table6-cifar10", "table3-cifar100"):
        recipe = get_recipe(name, "XXS").replace(batch_size=2)
        trainer = Trainer(recipe, None if recipe.task == "pretrain" else 10, 10, "cpu", "reference", amp=True)
        images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
        labels = None if recipe.task == "pretrain" else torch.tensor([1, 2])
        for _ in range(2):
            with Meter() as meter:
                trainer.train_step(images, labels)
            assert meter.syncs == 0, meter.sync_ops
        with Meter() as meter:
            trainer.warm_up(images, labels)
        assert meter.syncs == 0, meter.sync_ops
