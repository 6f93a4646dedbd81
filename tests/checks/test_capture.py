"""CUDA-graph capture of the training and evaluation steps (recipe.cuda_graphs): a captured step
computes what the eager step computes, draws fresh randomness at every replay, and a whole run
trains through it. Needs CUDA; on the CPU the fallback is tested in test_loop.py."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                   reason="CUDA graphs need a CUDA GPU")]


def _trainer(recipe, backend):
    from mlit.train.loop import Trainer, seed_everything

    seed_everything(0)
    return Trainer(recipe, 10, steps_per_epoch=10, device="cuda", backend=backend)


def _batches(n=3, b=64):
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 256, (b, 3, 32, 32), dtype=torch.uint8, generator=g).cuda(),
             torch.randint(0, 10, (b,), generator=g).cuda()) for _ in range(n)]


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_captured_step_is_the_eager_step(backend):
    """Same seed, same batches: losses and weights agree (the lr comes from a float32 device
    table when captured, so to rounding), and the captured trainer really replays a graph."""
    from mlit.train.recipes import get_recipe

    recipe = get_recipe("table6-cifar10", "XXS").replace(batch_size=64, lr=2e-3, warmup_epochs=0.2)
    batches = _batches()
    results = []
    for captured in (False, True):
        trainer = _trainer(recipe.replace(cuda_graphs=captured), backend)
        assert trainer.capture is captured
        trainer.warm_up(*batches[0])
        torch.manual_seed(5)
        losses = [trainer.train_step(*b)["loss"].item() for b in batches]
        assert (trainer._graph is not None) is captured
        results.append((losses, [p.detach().clone() for p in trainer.raw_model.parameters()]))
    (eager_losses, eager_w), (graph_losses, graph_w) = results
    assert graph_losses == pytest.approx(eager_losses, rel=1e-4)
    for a, b in zip(eager_w, graph_w):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_replays_draw_fresh_randomness_and_train():
    from mlit.train.recipes import get_recipe

    recipe = get_recipe("table6-cifar10", "XXS").replace(batch_size=64, lr=2e-3, warmup_epochs=0, cuda_graphs=True)
    trainer = _trainer(recipe, "auto")
    images, labels = _batches(1)[0]
    trainer.warm_up(images, labels)
    before = trainer.optimizer.state  # noqa: F841 - state exists before the capture
    grads = []
    for _ in range(2):
        trainer.train_step(images, labels)
        grads.append(trainer.raw_model.head.weight.grad.clone())
    assert not torch.equal(grads[0], grads[1])  # new augmentation, dropout, gate noise per replay
    losses = [trainer.train_step(images, labels)["loss"].item() for _ in range(30)]
    assert all(torch.isfinite(torch.tensor(losses))) and sum(losses[-5:]) < sum(losses[:5]), losses
    assert trainer.global_step == 32


def test_captured_evaluation_is_the_eager_one():
    from mlit.train.recipes import get_recipe

    for task in ("train", "pretrain"):
        recipe = get_recipe("table3-cifar100" if task == "pretrain" else "table6-cifar10", "XXS").replace(batch_size=32)
        images, labels = _batches(1, b=200)[0]
        labels = None if task == "pretrain" else labels
        results = []
        for captured in (False, True):
            trainer = _trainer(recipe.replace(cuda_graphs=captured), "auto")
            results.append([trainer.evaluate(images, labels, batch_size=64) for _ in range(2)])
        assert results[1][0] == pytest.approx(results[0][0], rel=1e-5)
        assert results[1][1] == results[1][0]  # deterministic, the graph reused


def test_run_trains_captured(tmp_path):
    from shared_data import CIFAR10_MINI

    from mlit.train.loop import run
    from mlit.train.metrics import read_metrics
    from mlit.train.recipes import get_recipe

    if CIFAR10_MINI is None:
        pytest.skip("shared/data/cifar10-mini not found")
    recipe = get_recipe("table8-mlit-xxs-cifar10").replace(
        data_dir=str(CIFAR10_MINI), verify=False, cache_dir=str(tmp_path / "cache"), epochs=2, batch_size=64,
        limit_train=512, limit_test=256, lr=2e-3, warmup_epochs=0.5, cuda_graphs=True)
    run(recipe, tmp_path / "run", device="cuda", progress=False, log=lambda _: None)
    records = read_metrics(tmp_path / "run")
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[1]["train_loss"] < records[0]["train_loss"] and records[1]["test_top1"] > 10
