"""Where a training step's time goes: `mlit profile`.

Runs training steps of a recipe on random (non-zero) uint8 images with torch.profiler, each
component of the model wrapped in a named range by module hooks (forward and backward), and
reports time by component beside images/s measured without the profiler.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.autograd.profiler import record_function

from mlit_kernels import SharedSwiGLUMoE

from .models.attention import GroupedQueryAttention
from .train.loop import Trainer
from .train.recipes import Recipe

COMPONENTS = ("attention", "moe", "norms", "embeddings/heads", "augmentation", "optimizer")
PREFIX = "mlit::"


def component_of(name: str, module: nn.Module) -> str | None:
    """The component a leaf module's time counts to, or None for containers."""
    if isinstance(module, GroupedQueryAttention):
        return "attention"
    if isinstance(module, SharedSwiGLUMoE):
        return "moe"
    if isinstance(module, nn.LayerNorm):
        return "norms"
    if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in ("patch_embed", "head", "decoder_embed", "decoder_pred"):
        return "embeddings/heads"
    return None


class _Range:
    """A named profiler range opened in one hook and closed in another (per module, per pass)."""

    def __init__(self, name: str):
        self.name = name
        self.open: list[record_function] = []

    def enter(self, *_):
        rf = record_function(self.name)
        rf.__enter__()
        self.open.append(rf)

    def exit(self, *_):
        if self.open:
            self.open.pop().__exit__(None, None, None)


def annotate(model: nn.Module, trainer: Trainer) -> list:
    """Wrap every component of the model, the augmentation and the optimizer step in ranges
    ``mlit::fwd:<component>`` / ``mlit::bwd:<component>``. Returns the hook handles."""
    handles = []
    for name, module in model.named_modules():
        comp = component_of(name, module)
        if comp is None:
            continue
        fwd, bwd = _Range(f"{PREFIX}fwd:{comp}"), _Range(f"{PREFIX}bwd:{comp}")
        handles.append(module.register_forward_pre_hook(fwd.enter))
        handles.append(module.register_forward_hook(fwd.exit))
        if name.endswith("patch_embed"):
            continue  # its input (the pixels) needs no gradient: no backward pass to wrap
        handles.append(module.register_full_backward_pre_hook(bwd.enter))
        handles.append(module.register_full_backward_hook(bwd.exit))
    opt = _Range(f"{PREFIX}step:optimizer")
    handles.append(trainer.optimizer.register_step_pre_hook(opt.enter))
    handles.append(trainer.optimizer.register_step_post_hook(opt.exit))
    augment = trainer.augment

    def augmented(images):
        with record_function(f"{PREFIX}step:augmentation"):
            return augment(images)

    trainer.augment = augmented
    return handles


@dataclass
class ProfileReport:
    """ms per step by component; step_ms is the measured step (without profiler overhead)."""

    device: str
    recipe: str
    backend: str
    batch_size: int
    step_ms: float
    images_per_s: float
    busy_ms: float  # device (or CPU) time of all work inside the profiled steps, per step
    by_component: dict[str, float]

    def table(self) -> str:
        lines = [
            f"{self.recipe} · model {self.backend} backend · batch {self.batch_size} · {self.device}",
            f"step {self.step_ms:.2f} ms · {self.images_per_s:,.0f} images/s",
            "",
            f"{'component':<20} {'ms/step':>9} {'share':>7}",
        ]
        for comp, ms in self.by_component.items():
            lines.append(f"{comp:<20} {ms:>9.3f} {100 * ms / self.step_ms:>6.1f}%")
        return "\n".join(lines)


def _synthetic_batch(trainer: Trainer, batch_size: int, generator: torch.Generator):
    images = torch.randint(1, 256, (batch_size, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, trainer.num_classes or 1, (batch_size,), generator=generator)
    return images.to(trainer.device), labels.to(trainer.device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step_times_ms(trainer: Trainer, batches, steps: int) -> list[float]:
    """Each step's time: CUDA events between steps on a GPU (no sync inside the run), the
    wall clock on the CPU."""
    if trainer.device.type == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        events[0].record()
        for i in range(steps):
            trainer.train_step(*batches[i % 2])
            events[i + 1].record()
        events[-1].synchronize()
        return [a.elapsed_time(b) for a, b in zip(events, events[1:])]
    times = []
    for i in range(steps):
        start = time.perf_counter()
        trainer.train_step(*batches[i % 2])
        times.append((time.perf_counter() - start) * 1e3)
    return times


def profile_training(recipe: Recipe, device: str, backend: str, steps: int = 20, warmup: int = 5) -> ProfileReport:
    """Time `steps` training steps of the recipe (after the trainer's own warm-up on these shapes
    and `warmup` more steps), then profile `steps` more. The step time is the median of the timed
    steps, so one slow step (an allocation burst, a neighbour's load) does not move it."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    dev = torch.device(device)
    num_classes = None if recipe.task == "pretrain" else 10
    trainer = Trainer(recipe, num_classes, steps_per_epoch=max(1, steps), device=dev, backend=backend)
    g = torch.Generator().manual_seed(recipe.seed)
    batches = [_synthetic_batch(trainer, recipe.batch_size, g) for _ in range(2)]

    trainer.warm_up(*batches[0])  # autotuning, lazy state, first allocations: before any clock
    for i in range(warmup):
        trainer.train_step(*batches[i % 2])
    step_ms = statistics.median(_step_times_ms(trainer, batches, steps))

    handles = annotate(trainer.raw_model, trainer)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if dev.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for i in range(steps):
            trainer.train_step(*batches[i % 2])
        _sync(dev)
    for h in handles:
        h.remove()

    use_device = dev.type == "cuda"
    per_component = dict.fromkeys(COMPONENTS, 0.0)
    busy_us = 0.0
    for evt in prof.key_averages():
        total = evt.device_time_total if use_device else evt.cpu_time_total
        if evt.key.startswith(PREFIX):
            per_component[evt.key.split(":", 3)[-1]] += total
        elif use_device:
            busy_us += evt.self_device_time_total
    if not use_device:
        busy_us = sum(evt.self_cpu_time_total for evt in prof.key_averages() if not evt.key.startswith(PREFIX))
    by_component = {c: us / 1e3 / steps for c, us in per_component.items()}
    busy_ms = busy_us / 1e3 / steps
    by_component["other (residuals, loss)"] = max(0.0, busy_ms - sum(by_component.values()))
    by_component["idle gaps"] = max(0.0, step_ms - busy_ms) if use_device else 0.0
    name = torch.cuda.get_device_name(dev) if use_device else "cpu"
    return ProfileReport(name, recipe.name, backend, recipe.batch_size, step_ms, recipe.batch_size * 1e3 / step_ms,
                         busy_ms, by_component)
