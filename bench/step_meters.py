"""Training-step meters, counted on the CPU: host syncs, kernel launches by part, and launches per
step without and with CUDA-graph capture, for one training step of each model and task.

Each step runs in the CUDA configuration emulated on the CPU — fp16 autocast, GradScaler, fused
AdamW, the Triton backend for the MoE layers and the augmentation — under
``mlit_kernels.meter.Meter(dry_run=True)``, so Triton kernels are counted, not run (their outputs
are garbage; nothing here reads them). The batch is tiny: launch counts do not depend on it.

* syncs: host reads of device values in the first step of a fresh trainer (no warm-up) and in a
  later step; both must be 0.
* launches by part: module hooks open a meter section per component (as ``mlit profile`` finds
  them), forward and backward; "loss" is the loss's own forward + backward, measured on its
  inputs as leaf tensors; "other" is the rest (residual adds, autocast casts, the sums).
* captured: a captured step replays one CUDA graph; what still launches per step is the batch
  gathered into the graph's input buffers (counted) + the replay.

    python bench/step_meters.py        # the table (also part of `python bench/meters.py`)
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlit_kernels.meter import Meter  # noqa: E402

from mlit.models import GroupedQueryAttention  # noqa: E402
from mlit.profile import component_of  # noqa: E402
from mlit.train.recipes import get_recipe  # noqa: E402
from mlit.train.step import Trainer  # noqa: E402

#: (label, recipe, model size)
CASES = (
    ("mLiT-XXS train", "table6-cifar10", "XXS"),
    ("mLiT-XS train", "table6-cifar10", "XS"),
    ("mLiT-S train", "table6-cifar10", "S"),
    ("mmLiT-XXS pretrain", "table3-cifar100", "XXS"),
    ("mmLiT-XXS finetune", "table5-cifar10", "XXS"),
)
PARTS = ("augment", "attention", "moe", "norms/embeddings", "loss", "optimizer", "other")
_SECTION = {"attention": "attention", "moe": "moe", "norms": "norms/embeddings", "embeddings/heads": "norms/embeddings"}

#: Budgets the tests pin (launches on the CPU-counted CUDA configuration).
AUGMENT_BUDGET = 20
XXS_STEP_BUDGET = 400


@dataclass
class StepRow:
    """The meters of one training step."""

    case: str
    first_step_syncs: int
    step_syncs: int
    launches: int
    by_part: dict[str, int] = field(default_factory=dict)
    captured_launches: int = 0


def make_trainer(recipe_name: str, size: str, batch: int = 2) -> tuple[Trainer, torch.Tensor, torch.Tensor | None]:
    """A trainer in the emulated CUDA configuration and one synthetic uint8 batch."""
    recipe = get_recipe(recipe_name, size).replace(batch_size=batch)
    task = recipe.task
    trainer = Trainer(recipe, None if task == "pretrain" else 10, steps_per_epoch=100, device="cpu",
                      backend="triton", amp=True)
    for module in trainer.raw_model.modules():  # as on CUDA: head dims zero-padded for the fused SDPA kernels
        if isinstance(module, GroupedQueryAttention):
            module.pad_head_dim = True
    g = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (batch, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = None if task == "pretrain" else torch.randint(0, 10, (batch,), generator=g)
    return trainer, images, labels


def _attach_sections(trainer: Trainer, meter: Meter) -> list:
    """Meter sections for the model's components (forward and backward), the augmentation and
    the optimizer step (GradScaler included). Returns what to undo."""
    handles = []
    for name, module in trainer.raw_model.named_modules():
        part = _SECTION.get(component_of(name, module) or "")
        if part is None:
            continue
        push = lambda *_, part=part: meter.push_section(part)  # noqa: E731
        pop = lambda *_: meter.pop_section()  # noqa: E731
        handles += [module.register_forward_pre_hook(push), module.register_forward_hook(pop)]
        if not name.endswith("patch_embed"):  # the pixels need no gradient: no backward to wrap
            handles += [module.register_full_backward_pre_hook(push), module.register_full_backward_hook(pop)]

    def wrap(obj, attr, part):
        original = getattr(obj, attr)

        def sectioned(*args, **kwargs):
            with meter.section(part):
                return original(*args, **kwargs)

        setattr(obj, attr, sectioned)
        handles.append((obj, attr, original, attr in vars(obj)))

    wrap(trainer, "augment", "augment")
    wrap(trainer.scaler, "step", "optimizer")
    wrap(trainer.scaler, "update", "optimizer")
    return handles


def _detach_sections(handles: list) -> None:
    for h in handles:
        if isinstance(h, tuple):
            obj, attr, original, own = h
            if own:
                setattr(obj, attr, original)
            else:
                delattr(obj, attr)  # a method: the class's is back
        else:
            h.remove()


def loss_launches(trainer: Trainer, images: torch.Tensor, labels: torch.Tensor | None) -> int:
    """Launches of the loss alone (forward + backward), on the model's outputs as leaf tensors."""
    model = trainer.raw_model
    with Meter(dry_run=True), torch.no_grad(), trainer.autocast():  # dry run: Triton kernels are not run
        x = trainer.augment(images)
        if trainer.task == "pretrain":
            tokens = model.encoder.embed(x)
            n = tokens.shape[1] - 1
            _, mask = __import__("mlit.models.mae", fromlist=["random_masking"]).random_masking(
                len(x), n, model.num_keep, x.device)
            pred = model.decoder_pred(model.decoder_norm(model.decoder_embed(tokens)))[:, :-1]
            outputs = (pred, mask, torch.zeros((), device=x.device))
        else:
            outputs = model(x)
    leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in outputs]
    with Meter(dry_run=True) as meter, trainer.autocast():
        if trainer.task == "pretrain":
            pred, mask, moe = leaves
            loss = model.loss(x, pred, mask.detach(), moe).loss
        else:
            loss = trainer.forward_loss(lambda _: tuple(leaves), x, labels)[0]
        trainer.scaler.scale(loss).backward()
    return meter.launches


def measure(case: str, recipe_name: str, size: str) -> StepRow:
    trainer, images, labels = make_trainer(recipe_name, size)
    with Meter(dry_run=True) as first:
        trainer.train_step(images, labels)
    with Meter(dry_run=True) as meter:
        handles = _attach_sections(trainer, meter)
        try:
            trainer.train_step(images, labels)
        finally:
            _detach_sections(handles)
    sections = meter.by_section()
    by_part = {part: sections.get(part, {}).get("launches", 0) for part in PARTS}
    by_part["loss"] = loss_launches(trainer, images, labels)
    by_part["other"] = meter.launches - sum(v for k, v in by_part.items() if k != "other")
    # per captured step: the batch gathered into the graph's inputs, then one replay
    data_x, data_y = images.repeat(4, 1, 1, 1), None if labels is None else labels.repeat(4)
    perm = torch.randperm(len(data_x))
    with Meter(dry_run=True) as gather:
        trainer.batch(data_x, data_y, perm[: len(images)])  # the loop's slice of the epoch's order
    return StepRow(case, first.syncs, meter.syncs, meter.launches, by_part, gather.launches + 1)


def step_rows() -> list[StepRow]:
    """One row per case of :data:`CASES`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return [measure(*case) for case in CASES]
    finally:
        torch.set_num_threads(threads)


def step_table(rows: list[StepRow] | None = None, markdown: bool = False) -> str:
    """The printable (or markdown) table of :func:`step_rows`."""
    rows = rows if rows is not None else step_rows()
    head = ["training step", "syncs 1st/later", "launches", *PARTS, "captured"]
    lines = [[r.case, f"{r.first_step_syncs}/{r.step_syncs}", str(r.launches), *(str(r.by_part[p]) for p in PARTS),
              str(r.captured_launches)] for r in rows]
    note = ("CPU-counted CUDA configuration: fp16 autocast, GradScaler, fused AdamW, Triton MoE + augmentation "
            "(dry run); captured = launches per step with cuda_graphs (the batch gathered into the graph's inputs "
            "+ 1 replay)")
    if markdown:
        return "\n".join(["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
                         + ["| " + " | ".join(line) + " |" for line in lines] + ["", note])
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    return "\n".join(["  ".join(x.rjust(w) if i else x.ljust(w) for i, (x, w) in enumerate(zip(line, widths)))
                      for line in [head] + lines] + [note])


if __name__ == "__main__":
    print(step_table())
