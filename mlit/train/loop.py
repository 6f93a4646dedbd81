"""The training and evaluation steps and the epoch loop (pre-training, fine-tuning, from scratch).

Data stay on the device as uint8; each step indexes a batch, augments it there (GPUAugment),
then runs forward/backward under fp16 autocast with a GradScaler on CUDA (fp32 on CPU).
:class:`Trainer` holds the model, optimizer, scaler and schedule; ``train_step`` is one optimizer
step and can be called N times by a profiler or a benchmark. :func:`run` is the whole job.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import encoder_config
from ..models import MLiTClassifier, MMLiT
from . import checkpoint as ckpt
from . import distributed as D
from .metrics import MetricsLog
from .optim import WarmupCosine, build_optimizer
from .recipes import Recipe

_logger = logging.getLogger(__name__)


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was saved. ``exit_code`` is 128 + the signal number."""

    def __init__(self, signum: int, path: Path | None):
        self.signum, self.path = signum, path
        self.exit_code = 128 + signum
        super().__init__(f"interrupted by signal {signum}; checkpoint saved to {path}")


class RunError(ValueError):
    """A run that cannot start (bad output folder, data smaller than a batch, ...)."""


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


def model_config(recipe: Recipe):
    cfg = encoder_config(recipe.model)
    if recipe.dropout is not None:
        cfg = cfg.replace(dropout=recipe.dropout)
    return cfg


def build_model(task: str, cfg, num_classes: int | None, recipe: Recipe, backend: str = "reference") -> nn.Module:
    """MMLiT for pre-training, else MLiTClassifier; the backend string goes to the models unchanged
    (a value they reject becomes a RunError with their message)."""
    try:
        return _build_model(task, cfg, num_classes, recipe, backend)
    except ValueError as e:
        raise RunError(f"cannot build the {task} model {cfg.name} (backend {backend!r}): {e}") from None


def _build_model(task: str, cfg, num_classes: int | None, recipe: Recipe, backend: str) -> nn.Module:
    if task == "pretrain":
        from ..config import DECODER

        dec = DECODER if recipe.dropout is None else DECODER.replace(dropout=recipe.dropout)
        model = MMLiT(cfg, dec, mask_ratio=recipe.mask_ratio, alpha=recipe.mae_alpha, beta=recipe.mae_beta,
                      backend=backend)
    else:
        model = MLiTClassifier(cfg, num_classes, backend=backend)
    if not recipe.gate_noise:
        disable_gate_noise(model)
    return model


def disable_gate_noise(model: nn.Module) -> int:
    """Make every MoE layer gate without noise in training; returns the count of layers.

    For deterministic comparisons (DDP test); the load term keeps its P(x) form.
    """
    from mlit_kernels import SharedSwiGLUMoE

    layers = [m for m in model.modules() if isinstance(m, SharedSwiGLUMoE)]
    for layer in layers:
        layer.noisy_gating = False
    return len(layers)


# ----------------------------------------------------------------------------------------------
# The trainer: one optimizer step at a time
# ----------------------------------------------------------------------------------------------


class Trainer:
    """Model + AdamW (layer-wise lr decay) + warm-up/cosine schedule + GradScaler on one device.

    train_step(images uint8 (b, 3, H, W) on the device, labels (b,) or None) → dict of detached
    0-d tensors (no host sync): loss and its parts; "correct" for classification.
    """

    def __init__(self, recipe: Recipe, num_classes: int | None, steps_per_epoch: int, device: str | torch.device = "cpu",
                 backend: str = "reference", info: D.DistInfo | None = None, model: nn.Module | None = None):
        from ..data import GPUAugment

        self.recipe = recipe
        self.task = recipe.task
        self.device = torch.device(device)
        self.info = info or D.DistInfo(device=self.device)
        self.num_classes = num_classes
        self.cfg = model_config(recipe)
        self.raw_model = (model or build_model(self.task, self.cfg, num_classes, recipe, backend)).to(self.device)
        self.model = self.raw_model
        if self.info.enabled:
            # without gate noise W_noise takes no part in the loss (as in the cited implementation)
            self.model = nn.parallel.DistributedDataParallel(
                self.raw_model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=not recipe.gate_noise,
            )
        # recipe.compile: train through torch.compile (inductor, default mode; CUDA only: on CPU
        # inductor needs a C++ toolchain and minutes of compile for little gain). The compiled
        # module shares raw_model's parameters; state_dict / checkpoints / evaluate use raw_model.
        self.compiled = bool(recipe.compile and self.device.type == "cuda")
        if recipe.compile and not self.compiled:
            _logger.info("recipe.compile ignored on %s (torch.compile is used on CUDA only)", self.device)
        if self.compiled:
            self.model = torch.compile(self.model)
        self.use_amp = bool(recipe.amp and self.device.type == "cuda")
        self.optimizer = build_optimizer(self.raw_model, recipe.peak_lr, recipe.weight_decay, recipe.layer_decay,
                                         recipe.betas)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.use_amp)
        self.steps_per_epoch = steps_per_epoch
        self.scheduler = WarmupCosine(self.optimizer, recipe.peak_lr, recipe.epochs * steps_per_epoch,
                                      round(recipe.warmup_epochs * steps_per_epoch), recipe.min_lr)
        if recipe.augment:
            self.augment = GPUAugment(train=True, crop_scale=recipe.crop_scale, hflip=recipe.hflip,
                                      autoaugment=recipe.autoaugment)
        else:
            self.augment = GPUAugment(train=False)
        self.eval_transform = GPUAugment(train=False)
        self.global_step = 0

    def autocast(self):
        if self.use_amp:
            return torch.autocast(self.device.type, dtype=torch.float16)
        return contextlib.nullcontext()

    def forward_loss(self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        if self.task == "pretrain":
            out = model(x)
            return out.loss, {"masked_mse": out.masked_mse.detach(), "unmasked_mse": out.unmasked_mse.detach(),
                              "moe_loss": out.moe_loss.detach()}
        logits, aux = model(x)
        ce = F.cross_entropy(logits.float(), labels, label_smoothing=self.recipe.label_smoothing)
        loss = ce + self.recipe.aux_weight * aux.float()
        correct = (logits.argmax(-1) == labels).sum()
        return loss, {"ce": ce.detach(), "aux": aux.detach().float(), "correct": correct}

    def train_step(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        self.model.train()
        lr = self.scheduler.step(self.global_step)
        x = self.augment(images)
        with self.autocast():
            loss, parts = self.forward_loss(self.model, x, labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.recipe.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.raw_model.parameters(), self.recipe.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.global_step += 1
        return {"loss": loss.detach().float(), "lr": torch.tensor(lr), **parts}

    @torch.no_grad()
    def evaluate(self, images: torch.Tensor, labels: torch.Tensor | None, batch_size: int = 256) -> dict[str, float]:
        """Loss (and top-1 %) over a uint8 set on the device, sharded over ranks. Deterministic:
        the MAE's masks come from a fixed seed and the training RNG is left untouched."""
        model = self.raw_model
        was_training = model.training
        model.eval()
        n = len(images)
        lo = n * self.info.rank // self.info.world_size
        hi = n * (self.info.rank + 1) // self.info.world_size
        sums = torch.zeros(5, dtype=torch.float64, device=self.device)  # count, loss, correct, masked, unmasked
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.recipe.seed + 12345)
            for s in range(lo, hi, batch_size):
                e = min(hi, s + batch_size)
                x = self.eval_transform(images[s:e])
                with self.autocast():
                    if self.task == "pretrain":
                        out = model(x)
                        b = e - s
                        sums += torch.stack([torch.tensor(b, device=self.device, dtype=torch.float64),
                                             out.loss.double() * b, torch.zeros((), dtype=torch.float64, device=self.device),
                                             out.masked_mse.double() * b, out.unmasked_mse.double() * b])
                    else:
                        logits, _ = model(x)
                        y = labels[s:e]
                        loss = F.cross_entropy(logits.float(), y, reduction="sum")
                        correct = (logits.argmax(-1) == y).sum()
                        sums[0] += e - s
                        sums[1] += loss.double()
                        sums[2] += correct.double()
        D.all_reduce_sum(sums, self.info)
        model.train(was_training)
        count = max(1.0, sums[0].item())
        if self.task == "pretrain":
            return {"test_loss": sums[1].item() / count, "test_masked_mse": sums[3].item() / count,
                    "test_unmasked_mse": sums[4].item() / count}
        return {"test_loss": sums[1].item() / count, "test_top1": 100.0 * sums[2].item() / count}

    # -- state -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "global_step": self.global_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.raw_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.global_step = int(state["global_step"])


# ----------------------------------------------------------------------------------------------
# The whole job
# ----------------------------------------------------------------------------------------------


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


class _StopFlag:
    """SIGINT/SIGTERM set a flag the loop polls; a second SIGINT interrupts at once."""

    def __init__(self):
        self.signum = 0
        self._old = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def _progress(total: int, initial: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True, leave=False,
                file=sys.stderr)


def run(recipe: Recipe, out_dir: str | Path, *, device: str | None = None, backend: str = "reference",
        resume: str | Path | None = None, stop_after_epochs: int | None = None, progress: bool = True,
        log=print) -> dict[str, Any]:
    """Train (any task) as the recipe says; returns the last metrics record.

    resume: a checkpoint or run directory to continue exactly (recipe, weights, optimizer, scaler,
    schedule, RNG states, position in the epoch). stop_after_epochs: stop (checkpoint written)
    after that many epochs in this invocation, as a planned interruption.
    """
    info = D.setup(device)
    try:
        return _run(recipe, Path(out_dir), info, backend, resume, stop_after_epochs, progress, log)
    finally:
        D.cleanup()


def _run(recipe, out_dir, info, backend, resume, stop_after_epochs, progress, log):
    dev = info.device
    is_main = info.is_main
    out_dir = Path(out_dir)
    ckpt_path = out_dir / ckpt.CHECKPOINT_NAME
    resume_state = None
    if resume is not None:
        resume_state = ckpt.load_checkpoint(resume, map_location="cpu")
        if "optimizer" not in resume_state:
            raise ckpt.CheckpointError(f"{resume} holds weights only (no optimizer state); cannot resume from it")
    elif ckpt_path.exists():
        raise RunError(f"{out_dir} already holds a checkpoint; continue it with --resume {out_dir} or choose another --out")

    if recipe.batch_size % info.world_size:
        raise RunError(f"global batch {recipe.batch_size} does not split over {info.world_size} processes")
    local_batch = recipe.batch_size // info.world_size

    train, test = load_data(recipe)
    num_classes = None if recipe.task == "pretrain" else train.num_classes
    steps_per_epoch = len(train) // recipe.batch_size
    if steps_per_epoch < 1:
        raise RunError(f"the training set ({len(train)} images) is smaller than one global batch ({recipe.batch_size})")

    seed_everything(recipe.seed)  # identical initial weights on every rank
    cfg = model_config(recipe)
    model = build_model(recipe.task, cfg, num_classes, recipe, backend)
    model_cfg = dataclasses.asdict(cfg)
    if resume_state is not None:
        ckpt.check_compatible(resume_state, recipe.task, model_cfg, num_classes, str(resume))
    elif recipe.task == "finetune":
        if not recipe.pretrained:
            raise RunError("finetune needs a pre-trained checkpoint: --pretrained PATH (a pre-training run dir, "
                           "checkpoint.pt or model.safetensors)")
        pre = ckpt.load_checkpoint(recipe.pretrained, map_location="cpu")
        ckpt.load_encoder(model, pre, str(recipe.pretrained))
        if is_main:
            log(f"loaded the encoder of {recipe.pretrained}")

    trainer = Trainer(recipe, num_classes, steps_per_epoch, dev, backend, info, model=model)
    # per-rank streams for augmentation, gate noise, dropout, masking
    seed_everything(recipe.seed + 1 + 100_003 * info.rank)
    start_epoch, start_step = 0, 0
    if resume_state is not None:
        trainer.load_state_dict(resume_state)
        start_epoch, start_step = int(resume_state["epoch"]), int(resume_state.get("step_in_epoch", 0))
        rngs = resume_state.get("rng") or []
        if rngs:
            if len(rngs) != info.world_size and is_main:
                log(f"warning: checkpoint from {len(rngs)} process(es), resuming on {info.world_size}: "
                    "random streams are not continued exactly")
            ckpt.set_rng_state(rngs[info.rank % len(rngs)])
        if is_main:
            log(f"resumed {resume} at epoch {start_epoch} step {start_step} (global step {trainer.global_step})")

    metrics = MetricsLog(out_dir)
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / "recipe.json", "w") as f:
            json.dump({"recipe": recipe.to_dict(), "model_config": model_cfg, "task": recipe.task,
                       "num_classes": num_classes, "world_size": info.world_size, "backend": backend}, f, indent=2)
        if resume_state is not None:
            metrics.truncate_after(start_epoch)

    train_x = train.images.to(dev)
    train_y = train.labels.to(dev)
    test_x = test.images.to(dev)
    test_y = test.labels.to(dev)
    eval_batch = min(1024, max(64, 2 * local_batch))

    meta = {"task": recipe.task, "model_config": model_cfg, "num_classes": num_classes, "recipe": recipe.to_dict()}

    def save(epoch: int, step_in_epoch: int) -> Path:
        rngs = D.all_gather_object(ckpt.rng_state(), info)
        if is_main:
            state = {**meta, **trainer.state_dict(), "epoch": epoch, "step_in_epoch": step_in_epoch,
                     "rng": rngs, "world_size": info.world_size, "backend": backend,
                     "elapsed_s": time.time() - t_run}
            ckpt.save_checkpoint(ckpt_path, state)
        D.barrier(info)
        return ckpt_path

    record: dict[str, Any] = {}
    t_run = time.time() - (float(resume_state.get("elapsed_s", 0.0)) if resume_state is not None else 0.0)
    epochs_done = 0
    with _StopFlag() as stop:
        for epoch in range(start_epoch, recipe.epochs):
            perm = epoch_permutation(len(train_x), recipe.seed, epoch).to(dev)
            sums: dict[str, torch.Tensor] = {}
            n_steps = 0
            t0 = time.time()
            bar = _progress(steps_per_epoch, start_step, f"{recipe.task} {epoch + 1}/{recipe.epochs}",
                            progress and is_main)
            for s in range(start_step, steps_per_epoch):
                base = s * recipe.batch_size + info.rank * local_batch
                idx = perm[base: base + local_batch]
                out = trainer.train_step(train_x[idx], None if recipe.task == "pretrain" else train_y[idx])
                for k, v in out.items():
                    if k != "lr":
                        sums[k] = sums[k] + v.double() if k in sums else v.double()
                n_steps += 1
                bar.update(1)
                if is_main and progress and (n_steps % 10 == 1 or s == steps_per_epoch - 1):
                    ips = n_steps * recipe.batch_size / max(1e-9, time.time() - t0)
                    bar.set_postfix(loss=f"{out['loss'].item():.4f}", lr=f"{out['lr'].item():.2e}", img_s=f"{ips:.0f}")
                signum = stop.signum
                if info.enabled and (s % 10 == 0 or s == steps_per_epoch - 1):
                    flag = torch.tensor([float(signum)], device=dev)
                    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                    signum = int(flag.item())
                elif info.enabled:
                    signum = 0
                if signum:
                    bar.close()
                    done = s + 1
                    path = save(epoch + (done == steps_per_epoch), 0 if done == steps_per_epoch else done)
                    if is_main:
                        log(f"signal {signum}: checkpoint saved to {path}")
                    raise TrainingInterrupted(signum, path)
            bar.close()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            epoch_time = time.time() - t0
            # average the epoch's sums over steps and ranks
            keys = sorted(sums)
            vec = torch.stack([sums[k] for k in keys]) if keys else torch.zeros(0, dtype=torch.float64, device=dev)
            vec = torch.cat([vec.to(dev), torch.tensor([float(n_steps)], dtype=torch.float64, device=dev)])
            D.all_reduce_sum(vec, info)
            total_steps = max(1.0, vec[-1].item())
            avg = {k: vec[i].item() / total_steps for i, k in enumerate(keys)}
            images_seen = n_steps * recipe.batch_size
            record = {"epoch": epoch + 1, "task": recipe.task, "global_step": trainer.global_step,
                      "lr": trainer.optimizer.param_groups[-1]["lr"] / trainer.optimizer.param_groups[-1].get("lr_scale", 1.0),
                      "train_loss": avg.get("loss")}
            if recipe.task == "pretrain":
                record.update(train_masked_mse=avg.get("masked_mse"), train_unmasked_mse=avg.get("unmasked_mse"),
                              train_moe_loss=avg.get("moe_loss"))
            else:
                record.update(train_ce=avg.get("ce"), train_aux=avg.get("aux"),
                              train_top1=100.0 * avg.get("correct", 0.0) / local_batch)
            if (epoch + 1) % recipe.eval_every == 0 or epoch + 1 == recipe.epochs:
                t_eval = time.time()
                record.update(trainer.evaluate(test_x, None if recipe.task == "pretrain" else test_y, eval_batch))
                record["eval_time_s"] = time.time() - t_eval
            record.update(images_per_s=images_seen / max(1e-9, epoch_time), epoch_time_s=epoch_time,
                          wall_time_s=time.time() - t_run)
            save(epoch + 1, 0)
            if is_main:
                metrics.append(record)
                shown = {k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in record.items()
                         if k not in ("task",) and v is not None}
                log(json.dumps(shown))
            start_step = 0
            epochs_done += 1
            if stop_after_epochs is not None and epochs_done >= stop_after_epochs and epoch + 1 < recipe.epochs:
                if is_main:
                    log(f"stopped after {epochs_done} epoch(s) as asked; resume with --resume {out_dir}")
                return record

    if is_main:
        ckpt.save_safetensors(trainer.raw_model, out_dir / ckpt.WEIGHTS_NAME, meta)
        log(f"done: {out_dir / ckpt.WEIGHTS_NAME}")
    return record


# ----------------------------------------------------------------------------------------------
# Evaluation of a saved model
# ----------------------------------------------------------------------------------------------


def evaluate_checkpoint(path: str | Path, dataset: str | None = None, split: str = "test", *,
                        data_dir: str | None = None, cache_dir: str | None = None, verify: bool = True,
                        limit: int | None = None, device: str | None = None, backend: str = "reference",
                        batch_size: int = 256) -> dict[str, Any]:
    """Top-1 (or, for a pre-training checkpoint, the reconstruction losses) on one split."""
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
    trainer = Trainer(recipe.replace(augment=False), num_classes, 1, dev, backend, model=model)
    t0 = time.time()
    res = trainer.evaluate(x.to(dev), None if task == "pretrain" else y.to(dev), batch_size)
    return {"checkpoint": str(path), "task": task, "model": cfg.name, "dataset": dataset, "split": split,
            "images": len(x), **res, "seconds": time.time() - t0}
