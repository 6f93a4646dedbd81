"""Training recipes: the paper's Tables 3-6 as named presets (SPEC §7).

Naming scheme
-------------
``table<N>-<dataset>`` is the recipe of the paper's Table N for one data set; the model size is
chosen with ``--model S|XS|XXS`` (default XXS):

* ``table3-cifar100``                                 MAE pre-training (epochs, warm-up and batch depend on the size)
* ``table4-cifar100``                                 fine-tuning set 1, 300 epochs (Table 7)
* ``table5-{cifar100,cifar10,svhn,flowers102}``       fine-tuning set 2, 100 epochs (Table 8, mmLiT rows)
* ``table6-{cifar100,cifar10,svhn,flowers102}``       supervised from scratch, 100 epochs (Table 8, mLiT rows)
* ``table5-fashion_mnist`` / ``table6-fashion_mnist`` beyond the paper: the CIFAR-10 column of Table 5 / 6

Each row of the results tables is also an alias that fixes the model size, e.g.
``table8-mlit-xxs-cifar10`` (= table6-cifar10, XXS), ``table8-mmlit-s-svhn`` (= table5-svhn, S),
``table7-mmlit-xs`` (= table4-cifar100, XS), ``table3-pretrain-xxs`` (= table3-cifar100, XXS).

Every field of :class:`Recipe` can be overridden (``--set key=value`` or the named CLI flags).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

MODEL_SIZES = ("S", "XS", "XXS")
TASKS = ("pretrain", "finetune", "train")


class RecipeError(ValueError):
    """An unknown recipe or a bad override."""


@dataclass
class Recipe:
    """Everything one training run needs besides the device and the output folder."""

    name: str
    task: str  # "pretrain" (MAE), "finetune" (from a pre-trained encoder) or "train" (from scratch)
    dataset: str
    model: str = "XXS"
    epochs: int = 100
    warmup_epochs: float = 5
    batch_size: int = 256  # global batch (all ranks together)
    base_lr: float = 1e-3  # lr = base_lr * batch_size / 256 (Eq. 17)
    lr: float | None = None  # absolute lr; overrides Eq. 17 when set
    min_lr: float = 0.0  # floor of the cosine
    weight_decay: float = 0.05
    layer_decay: float = 1.0  # layer-wise lr decay (1 = none)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = None  # max gradient norm; None = no clipping (the paper names none)
    label_smoothing: float = 0.0  # the paper names none
    aux_weight: float = 1.0  # weight of the MoE auxiliary loss added to the cross-entropy
    # augmentation
    augment: bool = True  # False: resize + normalise only (as at evaluation)
    crop_scale: tuple[float, float] = (0.8, 1.0)
    hflip: float = 0.5
    autoaugment: str | None = "cifar10"  # "cifar10", "svhn" or None
    # model
    dropout: float | None = None  # None: the model's 0.1
    gate_noise: bool = True  # False: noise-free gating in training (for deterministic tests)
    mask_ratio: float = 0.75  # MAE
    mae_alpha: float = 0.1  # Eq. 16
    mae_beta: float = 0.5  # Eq. 16
    # data
    data_dir: str | None = None
    cache_dir: str | None = None
    download: bool = False
    verify: bool = True  # False: read an unofficial subset (no md5 check)
    eval_split: str = "test"
    limit_train: int | None = None  # a seeded random subset of this many training images
    limit_test: int | None = None  # the first N evaluation images
    # run
    seed: int = 0
    amp: bool = True  # fp16 autocast + GradScaler on CUDA (always fp32 on CPU)
    # torch.compile the training model (inductor, default mode) on CUDA; ignored on CPU. The
    # Triton MoE is traced as custom ops (no graph break); evaluation and checkpoints use the
    # uncompiled module (Trainer.raw_model).
    compile: bool = False
    # Capture the whole training step (augmentation, forward, loss, backward, optimizer) and the
    # evaluation step as CUDA graphs after a warm-up; CUDA, one process. Elsewhere: uncaptured, with
    # a warning naming why.
    cuda_graphs: bool = False
    log_every: int | None = None  # progress (loss, img/s) read from the device every N steps; none: 4 per epoch
    eval_every: int = 1  # evaluate every N epochs (and after the last)
    pretrained: str | None = None  # finetune: checkpoint / safetensors / run dir of a pre-training
    notes: str = ""

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if self.task not in TASKS:
            raise RecipeError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.model.upper() not in MODEL_SIZES:
            raise RecipeError(f"model must be one of {MODEL_SIZES}, got {self.model!r}")
        self.model = self.model.upper()
        for name in ("epochs", "batch_size", "eval_every"):
            if int(getattr(self, name)) < 1:
                raise RecipeError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.warmup_epochs < 0:
            raise RecipeError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.base_lr <= 0 and self.lr is None:
            raise RecipeError(f"base_lr must be > 0, got {self.base_lr}")
        if not 0 < self.layer_decay <= 1:
            raise RecipeError(f"layer_decay must be in (0, 1], got {self.layer_decay}")
        if self.autoaugment not in (None, "cifar10", "svhn"):
            raise RecipeError(f"autoaugment must be 'cifar10', 'svhn' or none, got {self.autoaugment!r}")
        for name in ("limit_train", "limit_test", "log_every"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise RecipeError(f"{name} must be >= 1, got {v}")

    @property
    def peak_lr(self) -> float:
        """Eq. 17: base_lr × global batch / 256 (unless an absolute lr is set)."""
        return self.lr if self.lr is not None else self.base_lr * self.batch_size / 256

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recipe:
        known = {f.name for f in fields(cls)}
        d = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in known}
        return cls(**d)

    def replace(self, **changes) -> Recipe:
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise RecipeError(f"unknown recipe field(s) {sorted(unknown)}; fields: {field_names()}")
        return dataclasses.replace(self, **changes)


def field_names() -> list[str]:
    return [f.name for f in fields(Recipe)]


# --------------------------------------------------------------------------------------------
# The paper's presets
# --------------------------------------------------------------------------------------------

# Table 3, per model size: epochs, warm-up epochs, batch.
TABLE3 = {"S": (4000, 200, 840), "XS": (6000, 300, 1280), "XXS": (8000, 400, 1280)}

# Table 5 / 6 columns: batch, lr (×1e-3) fine-tune, lr scratch, layer decay (fine-tune), warm-up, AutoAugment.
TABLE56 = {
    "flowers102": dict(batch=16, lr5=10.0, lr6=10.0, decay=0.9, warmup=10, aa="cifar10"),
    "svhn": dict(batch=256, lr5=2.5, lr6=1.0, decay=0.9, warmup=10, aa="svhn"),
    "cifar10": dict(batch=256, lr5=2.5, lr6=1.0, decay=0.8, warmup=5, aa="cifar10"),
    "cifar100": dict(batch=128, lr5=5.0, lr6=2.0, decay=0.9, warmup=5, aa="cifar10"),
}
# Beyond the paper: Fashion-MNIST with the CIFAR-10 column.
TABLE56["fashion_mnist"] = dict(TABLE56["cifar10"])


def _table3(model: str) -> Recipe:
    epochs, warmup, batch = TABLE3[model]
    return Recipe(
        name="table3-cifar100", task="pretrain", dataset="cifar100", model=model, epochs=epochs,
        warmup_epochs=warmup, batch_size=batch, base_lr=3e-4, weight_decay=0.05, betas=(0.9, 0.95),
        crop_scale=(0.6, 1.0), hflip=0.5, autoaugment=None,
        notes="Table 3: MAE pre-training on CIFAR-100 (betas 0.9/0.95 as MAE)",
    )


def _table4(model: str) -> Recipe:
    return Recipe(
        name="table4-cifar100", task="finetune", dataset="cifar100", model=model, epochs=300, warmup_epochs=20,
        batch_size=448, base_lr=5e-3, weight_decay=0.05, layer_decay=0.9, crop_scale=(0.8, 1.0), hflip=0.5,
        autoaugment="cifar10", notes="Table 4: fine-tuning set 1, CIFAR-100, 300 epochs (Table 7)",
    )


def _table5(dataset: str, model: str) -> Recipe:
    c = TABLE56[dataset]
    return _table4(model).replace(
        name=f"table5-{dataset}", dataset=dataset, epochs=100, batch_size=c["batch"], base_lr=c["lr5"] * 1e-3,
        layer_decay=c["decay"], warmup_epochs=c["warmup"], autoaugment=c["aa"],
        notes=f"Table 5: fine-tuning set 2, {dataset}, 100 epochs (Table 8, mmLiT)"
        + (" [beyond the paper: CIFAR-10 column]" if dataset == "fashion_mnist" else ""),
    )


def _table6(dataset: str, model: str) -> Recipe:
    c = TABLE56[dataset]
    return _table4(model).replace(
        name=f"table6-{dataset}", task="train", dataset=dataset, epochs=100, batch_size=c["batch"],
        base_lr=c["lr6"] * 1e-3, layer_decay=1.0, warmup_epochs=c["warmup"], autoaugment=c["aa"],
        notes=f"Table 6: supervised from scratch, {dataset}, 100 epochs (Table 8, mLiT)"
        + (" [beyond the paper: CIFAR-10 column]" if dataset == "fashion_mnist" else ""),
    )


def _builders() -> dict[str, Any]:
    """recipe name → function(model) → Recipe."""
    b: dict[str, Any] = {"table3-cifar100": _table3, "table4-cifar100": _table4}
    for ds in TABLE56:
        b[f"table5-{ds}"] = lambda model, ds=ds: _table5(ds, model)
        b[f"table6-{ds}"] = lambda model, ds=ds: _table6(ds, model)
    return b


BUILDERS = _builders()


def _aliases() -> dict[str, tuple[str, str]]:
    """Results-table rows → (recipe, model)."""
    a: dict[str, tuple[str, str]] = {}
    for size in MODEL_SIZES:
        s = size.lower()
        a[f"table3-pretrain-{s}"] = ("table3-cifar100", size)
        a[f"table7-mmlit-{s}"] = ("table4-cifar100", size)
        for ds in TABLE56:
            a[f"table8-mlit-{s}-{ds}"] = (f"table6-{ds}", size)
            a[f"table8-mmlit-{s}-{ds}"] = (f"table5-{ds}", size)
    return a


ALIASES = _aliases()


def recipe_names() -> list[str]:
    return sorted(BUILDERS) + sorted(ALIASES)


def get_recipe(name: str, model: str | None = None) -> Recipe:
    """The preset ``name`` for ``model`` (S, XS, XXS; default XXS or the alias's size)."""
    key = name.lower()
    if key in ALIASES:
        base, size = ALIASES[key]
        if model is not None and model.upper() != size:
            raise RecipeError(f"recipe {name!r} is the {size} row; it conflicts with --model {model}")
        return BUILDERS[base](size)
    if key not in BUILDERS:
        raise RecipeError(f"unknown recipe {name!r}; `mlit recipes` lists them: {', '.join(sorted(BUILDERS))} "
                          f"(and the table rows such as table8-mlit-xxs-cifar10)")
    size = (model or "XXS").upper()
    if size not in MODEL_SIZES:
        raise RecipeError(f"unknown model size {model!r}; choose one of {MODEL_SIZES}")
    return BUILDERS[key](size)


def parse_value(recipe: Recipe, key: str, text: str) -> Any:
    """Convert ``text`` to the type of the field ``key`` (for ``--set key=value``)."""
    types = {f.name: f.type for f in fields(Recipe)}
    if key not in types:
        raise RecipeError(f"unknown recipe field {key!r}; fields: {', '.join(field_names())}")
    current = getattr(recipe, key)
    t = str(types[key])
    low = text.strip().lower()
    if low in ("none", "null") and "None" in t:
        return None
    try:
        if "bool" in t:
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if "tuple" in t:
            return tuple(float(v) for v in text.replace("(", "").replace(")", "").split(","))
        if "int" in t and "float" not in t:
            return int(text)
        if "float" in t:
            return float(text)
    except ValueError:
        raise RecipeError(f"bad value {text!r} for {key} (currently {current!r})") from None
    return text


def apply_overrides(recipe: Recipe, overrides: dict[str, Any], settings: list[str] | None = None) -> Recipe:
    """Named overrides (None values ignored) then ``key=value`` strings; validated."""
    changes = {k: v for k, v in overrides.items() if v is not None}
    for item in settings or []:
        if "=" not in item:
            raise RecipeError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        changes[key.strip()] = parse_value(recipe, key.strip(), value)
    return recipe.replace(**changes)


def describe_recipes() -> str:
    """A table of every preset for `mlit recipes`."""
    lines = [f"{'recipe':<24} {'task':<9} {'data':<13} {'epochs':>6} {'warmup':>6} {'batch':>5} "
             f"{'base_lr':>8} {'wd':>5} {'decay':>5} {'AA':<8} notes"]
    for name in sorted(BUILDERS):
        for size in (MODEL_SIZES if name == "table3-cifar100" else ("XXS",)):
            r = BUILDERS[name](size)
            label = f"{name} ({size})" if name == "table3-cifar100" else name
            lines.append(
                f"{label:<24} {r.task:<9} {r.dataset:<13} {r.epochs:>6} {r.warmup_epochs:>6g} {r.batch_size:>5} "
                f"{r.base_lr:>8.2e} {r.weight_decay:>5g} {r.layer_decay:>5g} {r.autoaugment!s:<8} {r.notes}"
            )
    lines.append("")
    lines.append("Model size: --model S|XS|XXS (default XXS). Results-table rows (model fixed):")
    for alias in sorted(ALIASES):
        base, size = ALIASES[alias]
        lines.append(f"  {alias:<32} = {base} --model {size}")
    lines.append("")
    lines.append("Override any field with --set key=value; fields: " + ", ".join(field_names()))
    return "\n".join(lines)
