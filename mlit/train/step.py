"""One training step and one evaluation pass on a device: :class:`Trainer` and :class:`Evaluator`.

Data stay on the device as uint8; a step augments its batch there (GPUAugment), runs forward and
backward under fp16 autocast with a GradScaler on CUDA (fp32 on CPU) and steps a fused AdamW.
No step reads a device value on the host: losses and accuracy are summed on the device
(:attr:`Trainer.sums`) and read by the loop only when it logs. With ``recipe.cuda_graphs`` the
whole step (augmentation, forward, loss, backward, optimizer, the sums) is captured once as a
CUDA graph after a warm-up and replayed; evaluation batches are captured too.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from typing import Any

import torch
from torch import nn

from mlit_kernels.loss import add_eval_sums, classification_loss

from ..config import encoder_config
from ..models import MLiTClassifier, MMLiT
from . import distributed as D
from .capture import DeviceSchedule, StepGraph, capture_unavailable, quiet_capturable_warning, side_stream
from .checkpoint import CheckpointError
from .optim import WarmupCosine, build_optimizer
from .progress import bar
from .recipes import Recipe

_logger = logging.getLogger(__name__)

#: The per-step values summed on the device, by task (the first is the loss).
METRICS = {"pretrain": ("loss", "masked_mse", "unmasked_mse", "moe_loss"), "classify": ("loss", "ce", "aux", "correct")}


class RunError(ValueError):
    """A run that cannot start (bad output folder, data smaller than a batch, a model the backend rejects, ...)."""


def model_config(recipe: Recipe):
    cfg = encoder_config(recipe.model)
    if recipe.dropout is not None:
        cfg = cfg.replace(dropout=recipe.dropout)
    return cfg


def build_model(task: str, cfg, num_classes: int | None, recipe: Recipe, backend: str = "reference") -> nn.Module:
    """MMLiT for pre-training, else MLiTClassifier; the backend string goes to the models unchanged
    (a value they reject becomes a RunError with their message)."""
    try:
        if task == "pretrain":
            from ..config import DECODER

            dec = DECODER if recipe.dropout is None else DECODER.replace(dropout=recipe.dropout)
            model = MMLiT(cfg, dec, mask_ratio=recipe.mask_ratio, alpha=recipe.mae_alpha, beta=recipe.mae_beta,
                          backend=backend)
        else:
            model = MLiTClassifier(cfg, num_classes, backend=backend)
    except ValueError as e:
        raise RunError(f"cannot build the {task} model {cfg.name} (backend {backend!r}): {e}") from None
    if not recipe.gate_noise:
        disable_gate_noise(model)
    return model


def disable_gate_noise(model: nn.Module) -> int:
    """Make every MoE layer gate without noise in training; returns the count of layers.

    For deterministic comparisons (DDP test). The load term is then the routing count (no
    gradient; W_noise unused), as the cited implementation's switch.
    """
    from mlit_kernels import SharedSwiGLUMoE

    layers = [m for m in model.modules() if isinstance(m, SharedSwiGLUMoE)]
    for layer in layers:
        layer.noisy_gating = False
    return len(layers)


def _device(device: str | torch.device) -> torch.device:
    """The device with its index (tensors report cuda:0, never plain cuda)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def persist_autotuning() -> None:
    """Keep Triton's autotuning results on disk beside its compiled kernels (~/.triton/cache), so
    a later run on the same shapes skips the benchmarks. Affects kernels defined after the call
    (mlit_kernels defines its Triton kernels at their first use); TRITON_CACHE_AUTOTUNING=0 opts out."""
    if os.environ.get("TRITON_CACHE_AUTOTUNING") is not None:
        return
    try:
        from triton import knobs

        knobs.autotuning.cache = True
    except (ImportError, AttributeError):  # an older Triton: its own default
        pass


def _autocast(device: torch.device, enabled: bool, cache: bool = True):
    if enabled:
        return torch.autocast(device.type, dtype=torch.float16, cache_enabled=cache)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


class Evaluator:
    """Loss (and top-1 %) of a model over a uint8 set on the device, sharded over ranks; needs no
    optimizer. Deterministic: the MAE's masks come from ``seed`` and the caller's RNG is left
    untouched. cuda_graphs: full batches replay one captured evaluation step (CUDA only).
    backend: the model's; a classifier's batch sums (cross-entropy, correct count) run as one
    Triton launch where it takes the loss kernels (:func:`mlit_kernels.loss.add_eval_sums`)."""

    def __init__(self, model: nn.Module, task: str, device: torch.device, *, amp: bool = False, seed: int = 0,
                 info: D.DistInfo | None = None, cuda_graphs: bool = False, backend: str = "reference"):
        from ..data import GPUAugment

        self.model, self.task, self.device = model, task, _device(device)
        self.use_amp, self.seed, self.backend = amp, seed, backend
        self.info = info or D.DistInfo(device=self.device)
        self.transform = GPUAugment(train=False)
        self.capture = cuda_graphs and capture_unavailable(self.device, self.info) is None
        self._graph: StepGraph | None = None
        self._sums = torch.zeros(5, dtype=torch.float64, device=self.device)  # count, loss, correct, masked, unmasked

    def _add_batch(self, images: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Add one batch's sums to ``_sums`` (on the device)."""
        x = self.transform(images)
        b = images.shape[0]
        with _autocast(self.device, self.use_amp, cache=not self.capture):
            if self.task == "pretrain":
                out = self.model(x)
                part = torch.stack([out.loss.double(), torch.zeros((), dtype=torch.float64, device=self.device),
                                    out.masked_mse.double(), out.unmasked_mse.double()]) * b
                self._sums[0] += b
                self._sums[1:] += part
            else:
                logits, _ = self.model(x, need_aux=False)
                add_eval_sums(logits, labels, self._sums[:3], backend=self.backend)
        return self._sums

    @torch.no_grad()
    def evaluate(self, images: torch.Tensor, labels: torch.Tensor | None, batch_size: int = 256,
                 progress: bool = False) -> dict[str, float]:
        model = self.model
        was_training = model.training
        model.eval()
        n = len(images)
        lo, hi = n * self.info.rank // self.info.world_size, n * (self.info.rank + 1) // self.info.world_size
        self._sums.zero_()
        starts = range(lo, hi, batch_size)
        devices = [self.device] if self.device.type == "cuda" else []
        shown = bar(len(starts), 0, "eval", progress and self.info.is_main)
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed + 12345)
            for i, s in enumerate(starts):
                e = min(hi, s + batch_size)
                batch = (images[s:e], None if labels is None else labels[s:e])
                if self.capture and e - s == batch_size and i > 0:  # the first full batch warms up
                    if self._graph is None or self._graph.inputs[0].shape != batch[0].shape:
                        self._graph = StepGraph(self._add_batch)
                        self._graph.capture(*self._static(batch))
                    self._graph.replay(*self._static(batch))
                else:
                    self._add_batch(*batch)
                shown.update(1)
        shown.close()
        sums = D.all_reduce_sum(self._sums.clone(), self.info).tolist()
        model.train(was_training)
        count = max(1.0, sums[0])
        if self.task == "pretrain":
            return {"test_loss": sums[1] / count, "test_masked_mse": sums[3] / count,
                    "test_unmasked_mse": sums[4] / count}
        return {"test_loss": sums[1] / count, "test_top1": 100.0 * sums[2] / count}

    def _static(self, batch):
        """The graph's inputs: images and labels (a placeholder when there are none)."""
        images, labels = batch
        return images, (labels if labels is not None else torch.zeros(len(images), dtype=torch.long,
                                                                       device=images.device))


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


class Trainer:
    """Model + AdamW (layer-wise lr decay) + warm-up/cosine schedule + GradScaler on one device.

    train_step(images uint8 (b, 3, H, W) on the device, labels (b,) or None) → dict of detached
    0-d tensors (no host sync): the loss and its parts ("correct" for classification). They are
    also added to :attr:`sums` ((K,) float64, in :attr:`metric_names` order) for the loop to read.
    amp: fp16 autocast + GradScaler (default: recipe.amp on CUDA; True on the CPU emulates the
    CUDA configuration, as the step meters do). With ``recipe.cuda_graphs`` on CUDA the step is
    captured by :meth:`warm_up` (or the first step) and replayed; the returned tensors are then
    overwritten by the next step.
    """

    def __init__(self, recipe: Recipe, num_classes: int | None, steps_per_epoch: int, device: str | torch.device = "cpu",
                 backend: str = "reference", info: D.DistInfo | None = None, model: nn.Module | None = None, *,
                 amp: bool | None = None):
        from ..data import GPUAugment

        self.recipe = recipe
        self.task = recipe.task
        self.device = _device(device)
        self.info = info or D.DistInfo(device=self.device)
        if self.device.type == "cuda":
            persist_autotuning()
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
        why_not = capture_unavailable(self.device, self.info) if recipe.cuda_graphs else None
        if why_not:
            _logger.warning("cuda_graphs: %s", why_not)
        self.capture = recipe.cuda_graphs and why_not is None
        self.use_amp = bool(recipe.amp and self.device.type == "cuda") if amp is None else amp
        self.optimizer = build_optimizer(self.raw_model, recipe.peak_lr, recipe.weight_decay, recipe.layer_decay,
                                         recipe.betas, capturable=self.capture)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.use_amp)
        self.steps_per_epoch = steps_per_epoch
        self.scheduler = WarmupCosine(self.optimizer, recipe.peak_lr, recipe.epochs * steps_per_epoch,
                                      round(recipe.warmup_epochs * steps_per_epoch), recipe.min_lr)
        self.backend = backend
        if recipe.augment:
            self.augment = GPUAugment(train=True, crop_scale=recipe.crop_scale, hflip=recipe.hflip,
                                      autoaugment=recipe.autoaugment, backend=backend)
        else:
            self.augment = GPUAugment(train=False)
        self.augment.prepare(self.device)
        self.evaluator = Evaluator(self.raw_model, self.task, self.device, amp=self.use_amp, seed=recipe.seed,
                                   info=self.info, cuda_graphs=self.capture, backend=backend)
        self.eval_transform = self.evaluator.transform
        self.metric_names = METRICS["pretrain" if self.task == "pretrain" else "classify"]
        self.sums = torch.zeros(len(self.metric_names), dtype=torch.float64, device=self.device)
        self.global_step = 0
        self._graph: StepGraph | None = None
        self._schedule: DeviceSchedule | None = None

    # -- the step ----------------------------------------------------------------------------------

    def autocast(self):
        return _autocast(self.device, self.use_amp, cache=not self.capture)

    def forward_loss(self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor | None) -> tuple[torch.Tensor,
                                                                                                   torch.Tensor]:
        """The loss and the step's values of ``metric_names`` ((K,) fp32, detached, the loss first)."""
        if self.task == "pretrain":
            out = model(x)
            return out.loss, out.metrics
        logits, aux = model(x)
        return classification_loss(logits, labels, aux, self.recipe.label_smoothing, self.recipe.aux_weight,
                                   backend=self.backend)

    def rehearse_launches(self, images: torch.Tensor, labels: torch.Tensor | None) -> None:
        """The kernels of a training step and of an evaluation batch, for a dry-run meter
        (:func:`mlit_kernels.precompile.record`): the augmentation, forward and backward of a copy of
        the model (this one, the optimizer and the schedule untouched), and the evaluator's batch
        (its sums restored)."""
        model = copy.deepcopy(self.raw_model).train()
        x = self.augment(images)
        with self.autocast():
            loss, _ = self.forward_loss(model, x, labels)
        loss.backward()  # the scaler's multiply launches no Triton kernel (and is left untouched)
        sums = self.evaluator._sums.clone()
        was_training = self.raw_model.training
        self.raw_model.eval()
        with torch.no_grad():
            self.evaluator._add_batch(images, labels)
        self.raw_model.train(was_training)
        self.evaluator._sums.copy_(sums)

    def _step(self, images: torch.Tensor, labels: torch.Tensor | None, update: bool = True) -> torch.Tensor:
        """Everything one step does on the device; returns its (K,) fp32 values.

        update=False: forward and backward only, then an optimizer step that changes nothing
        (found_inf set: the fused AdamW skips it, but creates its state) — the warm-up."""
        if self._schedule is not None:
            self._schedule.advance()
        x = self.augment(images)
        with self.autocast():
            loss, values = self.forward_loss(self.model, x, labels)
        self.scaler.scale(loss).backward()
        if not update:
            if self.optimizer.defaults.get("fused"):  # fused AdamW skips a step with found_inf set
                self.optimizer.found_inf = torch.ones((), device=self.device)
                self.optimizer.grad_scale = None
                try:
                    self.optimizer.step()
                finally:
                    del self.optimizer.found_inf, self.optimizer.grad_scale
            return values
        if self.recipe.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.raw_model.parameters(), self.recipe.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.sums.add_(values)
        return values

    def train_step(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if self.model is None:
            raise RuntimeError("Trainer.train_step: this trainer was closed (Trainer.close); build a new one")
        self.model.train()
        if self.capture:
            if self._graph is None:
                self.warm_up(images, labels)
            values = self._graph.replay(*self._inputs(images, labels))
            self.scheduler.last_step = self.global_step
        else:
            self.scheduler.step(self.global_step)
            self.optimizer.zero_grad(set_to_none=True)
            values = self._step(images, labels)
        self.global_step += 1
        return dict(zip(self.metric_names, values.unbind()))

    def _inputs(self, images, labels):
        return (images, labels) if labels is not None else (images,)

    def batch(self, images: torch.Tensor, labels: torch.Tensor | None, idx: torch.Tensor):
        """The batch ``idx`` of a device-resident set: gathered straight into the captured step's
        input buffers when there is one (one launch each, no copy)."""
        if self._graph is not None:
            outs = self._graph.inputs
            torch.index_select(images, 0, idx, out=outs[0])
            if labels is not None:
                torch.index_select(labels, 0, idx, out=outs[1])
            return outs[0], (outs[1] if labels is not None else None)
        return images.index_select(0, idx), (None if labels is None else labels.index_select(0, idx))

    def warm_up(self, images: torch.Tensor, labels: torch.Tensor | None = None, steps: int = 2) -> None:
        """Run the step on these shapes without changing anything (weights, optimizer moments,
        loss scale, RNG streams, sums): Triton autotuning, the MoE variant choice, compilation and
        lazy allocations happen here rather than in the first timed step. Then, with cuda_graphs,
        capture the step (it runs from the next ``train_step``)."""
        if self._graph is not None:
            return  # warm already (and captured)
        self.model.train()
        sums = self.sums.clone()
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), side_stream(self.device), quiet_capturable_warning():
            for _ in range(steps):
                self.optimizer.zero_grad(set_to_none=True)
                self._step(images, labels, update=False)
        self.optimizer.zero_grad(set_to_none=True)
        self.sums.copy_(sums)
        if self.capture and self._graph is None:
            self._schedule = DeviceSchedule(self.optimizer, self.scheduler, self.device)
            self._schedule.install(self.global_step)
            self._graph = StepGraph(lambda *batch: self._step(batch[0], batch[1] if len(batch) > 1 else None))
            self._graph.capture(*self._inputs(images, labels))

    def close(self) -> None:
        """Release the training wrapper: DistributedDataParallel (its gradient reducer) or the
        compiled module. Call it before the process group is destroyed
        (:func:`mlit.train.distributed.cleanup` says why). The trainer still evaluates and saves."""
        self.model = None

    # -- evaluation, state ---------------------------------------------------------------------------

    def reset_sums(self, values: list[float] | None = None) -> None:
        """Zero the epoch's device sums, or set them (a resumed partial epoch)."""
        if values is None:
            self.sums.zero_()
        else:
            self.sums.copy_(torch.tensor(values, dtype=torch.float64))

    def evaluate(self, images: torch.Tensor, labels: torch.Tensor | None, batch_size: int = 256,
                 progress: bool = False) -> dict[str, float]:
        """Loss (and top-1 %) over a uint8 set on the device (:class:`Evaluator`)."""
        return self.evaluator.evaluate(images, labels, batch_size, progress)

    def lr(self) -> float:
        """The peak-relative lr of the last step (the schedule's value, no device read)."""
        return self.scheduler.lr_at(max(0, self.global_step - 1))

    def state_dict(self) -> dict[str, Any]:
        optimizer = self.optimizer.state_dict()
        lr = self.scheduler.lr_at(max(0, self.global_step - 1))
        for group in optimizer["param_groups"]:  # plain floats (a captured step keeps device tensors)
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return {
            "model": self.raw_model.state_dict(),
            "optimizer": optimizer,
            "scaler": self.scaler.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "global_step": self.global_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._graph is not None:
            raise RuntimeError("load the state before the first step: the captured step holds the current tensors")
        self.raw_model.load_state_dict(state["model"])
        saved_groups, groups = len(state["optimizer"]["param_groups"]), len(self.optimizer.param_groups)
        if saved_groups != groups:
            raise CheckpointError(
                f"the checkpoint's optimizer has {saved_groups} parameter groups where this version builds {groups} "
                "(layers with the same lr scale now share an AdamW group); its weights still load with "
                "--pretrained, or resume it with the mlit version that wrote it")
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.global_step = int(state["global_step"])
