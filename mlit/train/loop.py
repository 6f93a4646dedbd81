"""The whole job: :func:`run` (pre-training, fine-tuning, from scratch) and :func:`evaluate_checkpoint`.

A run prepares (data on the device, model, resume), warms the step up on the real shapes, then
for each epoch trains its steps — polling stop and save requests after each step, reading the
progress from the device only every ``log_every`` steps — and closes the epoch: averages,
evaluation, a checkpoint that carries the epoch's metrics record, then the record appended to
metrics.jsonl. The steps themselves are :class:`~mlit.train.step.Trainer`'s.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import checkpoint as ckpt
from . import distributed as D
from .control import Request, RunControl
from .metrics import MetricsLog
from .progress import EpochProgress, default_log_every
from .recipes import Recipe
from .step import Evaluator, RunError, Trainer, build_model, disable_gate_noise, model_config

__all__ = ["Evaluator", "RunError", "Trainer", "TrainingInterrupted", "build_model", "disable_gate_noise",
           "epoch_permutation", "evaluate_checkpoint", "load_data", "model_config", "run", "seed_everything"]


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was saved. ``exit_code`` is 128 + the signal number."""

    def __init__(self, signum: int, path: Path | None):
        self.signum, self.path = signum, path
        self.exit_code = 128 + signum
        super().__init__(f"interrupted by signal {signum}; checkpoint saved to {path}")


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The global order of epoch ``epoch``: the same on every rank, independent of any RNG state."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def load_data(recipe: Recipe):
    """(train ImageSet, eval ImageSet) with the recipe's limits applied."""
    from ..data import load_split

    kw = dict(data_dir=recipe.data_dir, cache_dir=recipe.cache_dir, download=recipe.download, verify=recipe.verify)
    train = load_split(recipe.dataset, "train", **kw)
    test = load_split(recipe.dataset, recipe.eval_split, **kw)
    if recipe.limit_train is not None and recipe.limit_train < len(train):
        idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(recipe.seed))[: recipe.limit_train]
        idx = idx.sort().values
        train = dataclasses.replace(train, images=train.images[idx], labels=train.labels[idx])
    if recipe.limit_test is not None and recipe.limit_test < len(test):
        test = dataclasses.replace(test, images=test.images[: recipe.limit_test], labels=test.labels[: recipe.limit_test])
    return train, test


def run(recipe: Recipe, out_dir: str | Path, *, device: str | None = None, backend: str = "reference",
        resume: str | Path | None = None, stop_after_epochs: int | None = None, progress: bool = True,
        log=print, save_every_steps: int | None = None, save_every_minutes: float | None = None,
        max_steps: int | None = None, clear_kernels: bool = True) -> dict[str, Any]:
    """Train (any task) as the recipe says; returns the last metrics record.

    clear_kernels: on CUDA with backend "auto", first check in child processes every kernel family
    the run uses that is not cleared on this GPU for its current code, at the run's shapes
    (:func:`mlit.doctor.clear_for_run`; rank 0, the other ranks wait): "auto" then runs the
    cleared ones and torch for the rest.

    resume: a checkpoint or run directory to continue exactly (recipe, weights, optimizer, scaler,
    schedule, RNG states, position in the epoch and the epoch's sums so far).
    stop_after_epochs: stop (checkpoint written) after that many epochs in this invocation.
    save_every_steps / save_every_minutes: also checkpoint inside epochs, every N steps / minutes.
    max_steps: stop at global step N (a smoke run): evaluate, record the partial epoch, save the
    checkpoint and the weights; ``--resume`` continues the same schedule.
    """
    for name, value in (("save_every_steps", save_every_steps), ("max_steps", max_steps)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise RunError(f"{name} must be an integer >= 1, got {value!r}")
    if save_every_minutes is not None and not save_every_minutes > 0:
        raise RunError(f"save_every_minutes must be > 0, got {save_every_minutes!r}")
    info = D.setup(device)
    job = None
    try:
        job = _Job(recipe, Path(out_dir), info, backend, resume, progress, log, clear_kernels)
        return job.train(stop_after_epochs, max_steps, save_every_steps, save_every_minutes)
    finally:
        if job is not None:
            job.trainer.close()  # the DDP reducer goes before the process group does
        D.cleanup()


class _Job:
    """One invocation of :func:`run`: where training stands (``epoch``, ``step`` = the next step
    of that epoch) and the pieces that move it on, one job each."""

    def __init__(self, recipe: Recipe, out_dir: Path, info: D.DistInfo, backend: str, resume, progress: bool, log,
                 clear_kernels: bool = True):
        self.recipe, self.out_dir, self.info, self.backend = recipe, out_dir, info, backend
        self.progress, self.log = progress, log
        self.ckpt_path = out_dir / ckpt.CHECKPOINT_NAME
        state = self._resume_state(resume)
        if recipe.batch_size % info.world_size:
            raise RunError(f"global batch {recipe.batch_size} does not split over {info.world_size} processes")
        self.local_batch = recipe.batch_size // info.world_size

        train, test = load_data(recipe)
        self.num_classes = None if recipe.task == "pretrain" else train.num_classes
        self.steps_per_epoch = len(train) // recipe.batch_size
        if self.steps_per_epoch < 1:
            raise RunError(f"the training set ({len(train)} images) is smaller than one global batch ({recipe.batch_size})")
        if clear_kernels and backend == "auto" and info.device.type == "cuda":
            self._clear_kernels()
        self.trainer = self._build_trainer(state, resume)
        if info.device.type == "cuda":
            self._precompile(train)
        seed_everything(recipe.seed + 1 + 100_003 * info.rank)  # per-rank augmentation, noise, dropout, masking
        # where training stands, and the sums of the epoch so far (a resumed partial epoch)
        self.epoch, self.step = 0, 0
        self.carried_sums: list[float] | None = None
        self.rank_steps, self.carried_seconds = 0, 0.0
        self.last_record: dict[str, Any] = {}
        elapsed = 0.0
        if state is not None:
            elapsed = self._restore(state, resume)
        self.metrics = MetricsLog(out_dir)
        self._write_run_files(state)
        dev = info.device
        self.train_x, self.test_x = train.images.to(dev), test.images.to(dev)
        self.train_y = None if recipe.task == "pretrain" else train.labels.to(dev)
        self.test_y = None if recipe.task == "pretrain" else test.labels.to(dev)
        self.eval_batch = min(1024, max(64, 2 * self.local_batch))
        self.log_every = recipe.log_every or default_log_every(self.steps_per_epoch)
        self.t_run = time.time() - elapsed
        self.epoch_t0 = time.time() - self.carried_seconds

    # -- preparing ---------------------------------------------------------------------------------

    def _precompile(self, train) -> None:
        """Compile the Triton kernels of a training step and an evaluation batch in parallel child
        processes before the first step (:mod:`mlit_kernels.precompile`; rank 0, the others wait)."""
        from mlit_kernels.precompile import record, warm

        if self.info.rank == 0:
            images = train.images[:self.local_batch].to(self.info.device)
            labels = None if self.recipe.task == "pretrain" else train.labels[:self.local_batch].to(self.info.device)
            signatures = record(lambda: self.trainer.rehearse_launches(images, labels))
            if signatures:
                report = warm(signatures)
                failed = f", {len(report.failures)} failed: {report.failures[0]}" if report.failures else ""
                self.log(f"kernels: {report.signatures} kernel specialisations compiled in {report.wall_s:.0f} s by "
                         f"{report.jobs} processes{failed}")
        D.barrier(self.info)

    def _clear_kernels(self) -> None:
        """Check the run's uncleared kernel families in child processes (rank 0; the others wait)."""
        from ..doctor import clear_for_run

        if self.info.rank == 0:
            clear_for_run(model_config(self.recipe), self.local_batch, self.recipe.task, self.info.device,
                          self.num_classes or 10)
        D.barrier(self.info)

    def _resume_state(self, resume):
        if resume is None:
            if self.ckpt_path.exists():
                raise RunError(f"{self.out_dir} already holds a checkpoint; continue it with --resume {self.out_dir} "
                               "or choose another --out")
            return None
        state = ckpt.load_checkpoint(resume, map_location="cpu")
        if "optimizer" not in state:
            raise ckpt.CheckpointError(f"{resume} holds weights only (no optimizer state); cannot resume from it")
        return state

    def _build_trainer(self, state, resume) -> Trainer:
        recipe = self.recipe
        seed_everything(recipe.seed)  # identical initial weights on every rank
        cfg = model_config(recipe)
        model = build_model(recipe.task, cfg, self.num_classes, recipe, self.backend)
        self.model_cfg = dataclasses.asdict(cfg)
        if state is not None:
            ckpt.check_compatible(state, recipe.task, self.model_cfg, self.num_classes, str(resume))
        elif recipe.task == "finetune":
            if not recipe.pretrained:
                raise RunError("finetune needs a pre-trained checkpoint: --pretrained PATH (a pre-training run dir, "
                               "checkpoint.pt or model.safetensors)")
            pre = ckpt.load_checkpoint(recipe.pretrained, map_location="cpu")
            ckpt.load_encoder(model, pre, str(recipe.pretrained))
            if self.info.is_main:
                self.log(f"loaded the encoder of {recipe.pretrained}")
        return Trainer(recipe, self.num_classes, self.steps_per_epoch, self.info.device, self.backend, self.info,
                       model=model)

    def _restore(self, state: dict[str, Any], resume) -> float:
        """Weights, optimizer, position, RNG streams and the partial epoch's sums of a checkpoint;
        returns the run's elapsed seconds."""
        info = self.info
        self.trainer.load_state_dict(state)
        self.epoch, self.step = int(state["epoch"]), int(state.get("step_in_epoch", 0))
        rngs = state.get("rng") or []
        if rngs:
            if len(rngs) != info.world_size and info.is_main:
                self.log(f"warning: checkpoint from {len(rngs)} process(es), resuming on {info.world_size}: "
                         "random streams are not continued exactly")
            ckpt.set_rng_state(rngs[info.rank % len(rngs)])
        self.last_record = dict(state.get("record") or {})
        if self.step and state.get("epoch_sums") is not None:  # rank 0 carries the whole epoch's sums
            sums = [float(v) for v in state["epoch_sums"]]
            self.carried_sums = sums if info.is_main else [0.0] * len(sums)
            self.rank_steps = int(state.get("epoch_rank_steps", 0)) if info.is_main else 0
        self.carried_seconds = float(state.get("epoch_seconds", 0.0))
        if info.is_main:
            self.log(f"resumed {resume} at epoch {self.epoch} step {self.step} (global step {self.trainer.global_step})")
        return float(state.get("elapsed_s", 0.0))

    def _write_run_files(self, state) -> None:
        if not self.info.is_main:
            return
        recipe = self.recipe
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "recipe.json", "w") as f:
            json.dump({"recipe": recipe.to_dict(), "model_config": self.model_cfg, "task": recipe.task,
                       "num_classes": self.num_classes, "world_size": self.info.world_size, "backend": self.backend},
                      f, indent=2)
        if state is not None:
            self.metrics.resume(self.epoch, self.last_record, log=self.log)

    @property
    def meta(self) -> dict[str, Any]:
        return {"task": self.recipe.task, "model_config": self.model_cfg, "num_classes": self.num_classes,
                "recipe": self.recipe.to_dict()}

    # -- training ----------------------------------------------------------------------------------

    def train(self, stop_after_epochs, max_steps, save_every_steps, save_every_minutes) -> dict[str, Any]:
        recipe, trainer = self.recipe, self.trainer
        record = self.last_record
        epochs_done = 0
        with RunControl(self.info, save_every_minutes) as control:
            if self.epoch < recipe.epochs and not self._at_step_limit(max_steps):
                self._warm_up()
            while self.epoch < recipe.epochs:
                if self._at_step_limit(max_steps):
                    return self._stop_at_max_steps(max_steps)
                request = self._train_epoch(control, max_steps, save_every_steps)
                if request.signum:
                    self._interrupt(request.signum)
                if self.step < self.steps_per_epoch:  # max_steps inside the epoch
                    return self._stop_at_max_steps(max_steps)
                record = self._close_epoch()
                control.saved()
                epochs_done += 1
                if stop_after_epochs is not None and epochs_done >= stop_after_epochs and self.epoch < recipe.epochs:
                    if self.info.is_main:
                        self.log(f"stopped after {epochs_done} epoch(s) as asked; resume with --resume {self.out_dir}")
                    return record
        if self.info.is_main:
            ckpt.save_safetensors(trainer.raw_model, self.out_dir / ckpt.WEIGHTS_NAME, self.meta)
            self.log(f"done: {self.out_dir / ckpt.WEIGHTS_NAME}")
        return record

    def _at_step_limit(self, max_steps: int | None) -> bool:
        return max_steps is not None and self.trainer.global_step >= max_steps

    def _warm_up(self) -> None:
        """The step on the real shapes before the clock starts (see Trainer.warm_up)."""
        idx = torch.arange(self.local_batch, device=self.info.device)
        self.trainer.warm_up(*self.trainer.batch(self.train_x, self.train_y, idx))

    def _train_epoch(self, control: RunControl, max_steps, save_every_steps) -> Request:
        """Run the epoch's remaining steps; stop early at a signal or at max_steps (``self.step``
        then tells where). Returns the last agreed request."""
        recipe, trainer, info = self.recipe, self.trainer, self.info
        perm = epoch_permutation(len(self.train_x), recipe.seed, self.epoch).to(info.device)
        trainer.reset_sums(self.carried_sums)
        self.carried_sums = None
        bar = EpochProgress(self.steps_per_epoch, self.step, f"{recipe.task} {self.epoch + 1}/{recipe.epochs}",
                            self.progress and info.is_main, self.log_every, recipe.batch_size, trainer.sums,
                            trainer.metric_names, steps_before=self.rank_steps)
        self.epoch_t0 = time.time() - self.carried_seconds
        request = Request()
        try:
            for s in range(self.step, self.steps_per_epoch):
                base = s * recipe.batch_size + info.rank * self.local_batch
                trainer.train_step(*trainer.batch(self.train_x, self.train_y, perm[base: base + self.local_batch]))
                self.step, self.rank_steps = s + 1, self.rank_steps + 1
                bar.step(s, trainer.lr())
                request = control.poll()
                if request.signum or self._at_step_limit(max_steps):
                    return request
                due = save_every_steps is not None and trainer.global_step % save_every_steps == 0
                if (request.save or due) and self.step < self.steps_per_epoch:
                    self._save()
                    control.saved()
            return control.flush()
        finally:
            bar.close()

    def _epoch_sums(self) -> tuple[list[float], int]:
        """The epoch's sums and step count over all ranks (a device read; a collective)."""
        vec = torch.cat([self.trainer.sums, torch.tensor([float(self.rank_steps)], dtype=torch.float64,
                                                         device=self.info.device)])
        values = D.all_reduce_sum(vec, self.info).tolist()
        return values[:-1], int(values[-1])

    def _record(self, evaluate: bool) -> dict[str, Any]:
        """The metrics record of the epoch so far: averages over its steps, evaluation, timing."""
        recipe, trainer = self.recipe, self.trainer
        sums, rank_steps = self._epoch_sums()
        epoch_time = time.time() - self.epoch_t0
        avg = {k: v / max(1, rank_steps) for k, v in zip(trainer.metric_names, sums)}
        record: dict[str, Any] = {"epoch": self.epoch + 1, "task": recipe.task, "global_step": trainer.global_step,
                                  "lr": trainer.lr(), "train_loss": avg.get("loss")}
        if recipe.task == "pretrain":
            record.update(train_masked_mse=avg.get("masked_mse"), train_unmasked_mse=avg.get("unmasked_mse"),
                          train_moe_loss=avg.get("moe_loss"))
        else:
            record.update(train_ce=avg.get("ce"), train_aux=avg.get("aux"),
                          train_top1=100.0 * avg.get("correct", 0.0) / self.local_batch)
        if evaluate:
            t_eval = time.time()
            record.update(trainer.evaluate(self.test_x, self.test_y, self.eval_batch, progress=self.progress))
            record["eval_time_s"] = time.time() - t_eval
        images = rank_steps * self.local_batch
        record.update(images_per_s=images / max(1e-9, epoch_time), epoch_time_s=epoch_time,
                      wall_time_s=time.time() - self.t_run)
        return record

    def _close_epoch(self) -> dict[str, Any]:
        """Record the finished epoch, checkpoint with the record inside, then append it."""
        e = self.epoch + 1
        record = self._record(evaluate=e % self.recipe.eval_every == 0 or e == self.recipe.epochs)
        self.epoch, self.step, self.rank_steps, self.carried_seconds = e, 0, 0, 0.0
        self.last_record = record
        self.trainer.reset_sums()
        self._save()
        self._append(record)
        return record

    def _stop_at_max_steps(self, max_steps: int) -> dict[str, Any]:
        """At --max-steps: inside an epoch, evaluate, record the partial epoch and checkpoint (at
        an epoch's end that is done); then the weights."""
        record = self.last_record
        if self.step:
            record = dict(self._record(evaluate=True), partial=True)
            record["epoch"] = self.epoch + self.step / self.steps_per_epoch
            self._save(record)
            self._append(record)
        if self.info.is_main:
            ckpt.save_safetensors(self.trainer.raw_model, self.out_dir / ckpt.WEIGHTS_NAME, self.meta)
            self.log(f"stopped at global step {self.trainer.global_step} (max_steps {max_steps}); weights in "
                     f"{self.out_dir / ckpt.WEIGHTS_NAME}; continue with --resume {self.out_dir}")
        return record

    def _interrupt(self, signum: int):
        path = self._save()
        if self.info.is_main:
            self.log(f"signal {signum}: checkpoint saved to {path}")
        raise TrainingInterrupted(signum, path)

    # -- saving ------------------------------------------------------------------------------------

    def _save(self, record: dict[str, Any] | None = None) -> Path:
        """An atomic checkpoint of the current position; it carries the last epoch's record (or
        ``record``) and the sums of the epoch in progress, so a resumed run loses neither."""
        info = self.info
        rngs = D.all_gather_object(ckpt.rng_state(), info)
        sums, rank_steps = self._epoch_sums() if self.step else (None, 0)
        if info.is_main:
            state = {**self.meta, **self.trainer.state_dict(), "epoch": self.epoch, "step_in_epoch": self.step,
                     "rng": rngs, "world_size": info.world_size, "backend": self.backend,
                     "elapsed_s": time.time() - self.t_run, "record": record or self.last_record,
                     "epoch_sums": sums, "epoch_rank_steps": rank_steps,
                     "epoch_seconds": time.time() - self.epoch_t0 if self.step else 0.0}
            ckpt.save_checkpoint(self.ckpt_path, state)
        D.barrier(info)
        return self.ckpt_path

    def _append(self, record: dict[str, Any]) -> None:
        if self.info.is_main:
            self.metrics.append(record)
            shown = {k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in record.items()
                     if k != "task" and v is not None}
            self.log(json.dumps(shown))


# ----------------------------------------------------------------------------------------------
# Evaluation of a saved model
# ----------------------------------------------------------------------------------------------


def evaluate_checkpoint(path: str | Path, dataset: str | None = None, split: str = "test", *,
                        data_dir: str | None = None, cache_dir: str | None = None, verify: bool = True,
                        limit: int | None = None, device: str | None = None, backend: str = "reference",
                        batch_size: int = 256, progress: bool = True) -> dict[str, Any]:
    """Top-1 (or, for a pre-training checkpoint, the reconstruction losses) on one split; builds
    the model only (no optimizer, scaler or schedule)."""
    from ..config import TransformerConfig
    from ..data import load_split

    state = ckpt.load_checkpoint(path, map_location="cpu")
    task = state.get("task")
    rdict = state.get("recipe") or {}
    cfg_d = dict(state.get("model_config") or {})
    if not cfg_d or task is None:
        raise ckpt.CheckpointError(f"{path} carries no model configuration / task; was it written by mlit?")
    cfg_d = {k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg_d.items()}
    cfg = TransformerConfig(**cfg_d)
    recipe = Recipe.from_dict(rdict) if rdict else Recipe(name="eval", task=task, dataset=dataset or "cifar10")
    dataset = dataset or recipe.dataset
    data = load_split(dataset, split, data_dir=data_dir, cache_dir=cache_dir, verify=verify)
    num_classes = state.get("num_classes")
    if task != "pretrain" and data.num_classes != num_classes:
        raise ckpt.CheckpointError(f"{path} classifies {num_classes} classes but {dataset} has {data.num_classes}")
    dev = torch.device(device or D.default_device())
    model = build_model(task, cfg, num_classes, recipe, backend)
    model.load_state_dict(state["model"])
    x, y = data.images, data.labels
    if limit is not None:
        x, y = x[:limit], y[:limit]
    evaluator = Evaluator(model.to(dev), task, dev, amp=bool(recipe.amp and dev.type == "cuda"), seed=recipe.seed,
                          backend=backend)
    t0 = time.time()
    res = evaluator.evaluate(x.to(dev), None if task == "pretrain" else y.to(dev), batch_size, progress)
    return {"checkpoint": str(path), "task": task, "model": cfg.name, "dataset": dataset, "split": split,
            "images": len(x), **res, "seconds": time.time() - t0}
