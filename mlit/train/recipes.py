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
import math
from dataclasses import dataclass, field, fields
from typing import Any

from ..config import ENCODERS
from ..data.datasets import DATASETS

MODEL_SIZES = tuple(ENCODERS)  # "S", "XS", "XXS"
TASKS = ("pretrain", "finetune", "train")
AUTOAUGMENT_POLICIES = ("cifar10", "svhn")


class RecipeError(ValueError):
    """An unknown recipe or a bad setting. ``field``: the recipe field at fault (or None);
    ``detail``: the message without the field's name (for a CLI error that names the flag)."""

    def __init__(self, message: str, field: str | None = None):
        self.field, self.detail = field, message
        super().__init__(f"{field}: {message}" if field else message)


# --------------------------------------------------------------------------------------------
# Constraints of single fields: each returns None when the value is allowed, else what is allowed
# --------------------------------------------------------------------------------------------


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def at_least_one(v) -> str | None:
    return None if isinstance(v, int) and not isinstance(v, bool) and v >= 1 else "an integer >= 1"


def positive(v) -> str | None:
    return None if _finite(v) and v > 0 else "a finite number > 0"


def non_negative(v) -> str | None:
    return None if _finite(v) and v >= 0 else "a finite number >= 0"


def probability(v) -> str | None:
    return None if _finite(v) and 0 <= v <= 1 else "a number in [0, 1]"


def below_one(v) -> str | None:
    return None if _finite(v) and 0 <= v < 1 else "a number in [0, 1)"


def decay_factor(v) -> str | None:
    return None if _finite(v) and 0 < v <= 1 else "a number in (0, 1]"


def scale_range(v) -> str | None:
    ok = len(v) == 2 and all(_finite(x) for x in v) and 0 < v[0] <= v[1] <= 1
    return None if ok else "two numbers LOW,HIGH with 0 < LOW <= HIGH <= 1"


def adam_betas(v) -> str | None:
    return None if len(v) == 2 and all(_finite(x) and 0 <= x < 1 for x in v) else "two numbers in [0, 1)"


def setting(default: Any, help: str, *, check=None, choices: tuple | None = None, cli: bool = True,
            tasks: tuple[str, ...] = TASKS) -> Any:
    """A Recipe field and what the CLI needs to make its flag: the help text, the constraint
    ``check`` (None or a function as above), the allowed ``choices``, whether there is a flag
    (``cli``) and for which commands (``tasks``)."""
    return field(default=default, metadata={"help": help, "check": check, "choices": choices, "cli": cli,
                                            "tasks": tasks})


@dataclass
class Recipe:
    """Everything one training run needs besides the device and the output folder.

    Each field carries its help text and constraint (``fields(Recipe)[i].metadata``): the CLI makes
    one flag per field from them (``--warmup-epochs`` for ``warmup_epochs``), :meth:`validate`
    applies the same constraints to every recipe (preset, ``--set``, ``--config`` file).
    """

    name: str = setting(None, "preset name", cli=False)
    task: str = setting(None, "pretrain (MAE), finetune (from a pre-trained encoder) or train (from scratch)",
                        choices=TASKS, cli=False)
    dataset: str = setting(None, "data set", choices=tuple(DATASETS))
    model: str = setting("XXS", "model size", choices=MODEL_SIZES)
    epochs: int = setting(100, "epochs", check=at_least_one)
    warmup_epochs: float = setting(5, "linear warm-up, in epochs (fractions allowed)", check=non_negative)
    batch_size: int = setting(256, "global batch (all processes together)", check=at_least_one)
    base_lr: float = setting(1e-3, "base lr; the peak lr is base_lr x batch / 256 (Eq. 17)", check=positive)
    lr: float | None = setting(None, "absolute peak lr (overrides Eq. 17; none: use Eq. 17)", check=positive)
    min_lr: float = setting(0.0, "lr at the end of the cosine", check=non_negative)
    weight_decay: float = setting(0.05, "AdamW weight decay", check=non_negative)
    layer_decay: float = setting(1.0, "layer-wise lr decay (1 = none)", check=decay_factor)
    betas: tuple[float, float] = setting((0.9, 0.999), "AdamW betas", check=adam_betas)
    grad_clip: float | None = setting(None, "max gradient norm (none: no clipping; the paper names none)",
                                      check=positive)
    label_smoothing: float = setting(0.0, "label smoothing of the cross-entropy", check=below_one,
                                     tasks=("finetune", "train"))
    aux_weight: float = setting(1.0, "weight of the MoE balancing loss added to the cross-entropy",
                                check=non_negative, tasks=("finetune", "train"))
    # augmentation
    augment: bool = setting(True, "augment training images (--no-augment: resize + normalise only, as at evaluation)")
    crop_scale: tuple[float, float] = setting((0.8, 1.0), "random resized crop: range of the area kept, LOW,HIGH", check=scale_range)
    hflip: float = setting(0.5, "horizontal flip probability", check=probability)
    autoaugment: str | None = setting("cifar10", "AutoAugment policy", choices=AUTOAUGMENT_POLICIES)
    # model
    dropout: float | None = setting(None, "MoE output dropout (none: the model's 0.1)", check=below_one)
    gate_noise: bool = setting(True, "noisy gating in training (--no-gate-noise: deterministic routing, for tests)")
    mask_ratio: float = setting(0.75, "MAE: share of patches hidden", check=below_one, tasks=("pretrain",))
    mae_alpha: float = setting(0.1, "MAE: weight of the visible-patch loss (Eq. 16)", check=non_negative,
                               tasks=("pretrain",))
    mae_beta: float = setting(0.5, "MAE: weight of the MoE loss (Eq. 16)", check=non_negative, tasks=("pretrain",))
    # data
    data_dir: str | None = setting(None, "folder with the data set's files (read from there, never elsewhere)")
    cache_dir: str | None = setting(None, "cache of decoded splits (default $MLIT_CACHE_DIR or ~/.cache/mlit)")
    download: bool = setting(False, "download missing official files")
    verify: bool = setting(True, "check the official md5s (--no-verify: read an unofficial copy or subset)")
    eval_split: str = setting("test", "split to evaluate on (val exists for flowers102 only)",
                              choices=("test", "val", "train"))
    limit_train: int | None = setting(None, "train on a seeded random subset of N images", check=at_least_one)
    limit_test: int | None = setting(None, "evaluate on the first N images", check=at_least_one)
    # run
    seed: int = setting(0, "seed of weights, order, augmentation")
    amp: bool = setting(True, "fp16 autocast + loss scaling on CUDA (--no-amp: fp32; always fp32 on CPU)")
    compile: bool = setting(False, "torch.compile the training model on CUDA (ignored on CPU); evaluation and "
                                   "checkpoints use the uncompiled module")
    cuda_graphs: bool = setting(False, "capture the training and evaluation steps as CUDA graphs after a warm-up "
                                       "(CUDA, one process; elsewhere uncaptured, with a warning naming why)")
    log_every: int | None = setting(None, "read progress (loss, img/s) from the device every N steps "
                                          "(none: 4 times per epoch)", check=at_least_one)
    eval_every: int = setting(1, "evaluate every N epochs (and after the last)", check=at_least_one)
    pretrained: str | None = setting(None, "pre-training run dir, checkpoint.pt or model.safetensors whose encoder "
                                           "to load", tasks=("finetune",))
    notes: str = setting("", "where the preset comes from", cli=False)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise RecipeError naming the first field whose value is not allowed."""
        if self.name is None or self.task is None or self.dataset is None:
            raise RecipeError("a recipe needs a name, a task and a data set")
        if isinstance(self.model, str):
            self.model = self.model.upper()
        if isinstance(self.autoaugment, str) and self.autoaugment.lower() == "none":
            self.autoaugment = None
        for f in fields(self):
            problem = field_problem(f.name, getattr(self, f.name))
            if problem is not None:
                raise RecipeError(f"must be {problem}; got {getattr(self, f.name)!r}", f.name)
        splits = DATASETS[self.dataset].splits
        if self.eval_split not in splits:
            raise RecipeError(f"{self.dataset} has no split {self.eval_split!r}; "
                              f"choose one of {', '.join(s for s in splits if s != 'train')}", "eval_split")

    def warnings(self) -> list[str]:
        """Settings that are allowed but likely not what was meant."""
        out = []
        if self.warmup_epochs >= self.epochs:
            out.append(f"warmup_epochs {self.warmup_epochs:g} >= epochs {self.epochs}: the lr rises for the whole run "
                       f"and never reaches its peak {self.peak_lr:.3g} nor decays")
        if self.min_lr > self.peak_lr:
            out.append(f"min_lr {self.min_lr:g} is above the peak lr {self.peak_lr:g}: the 'decay' raises the lr")
        if self.pretrained and self.task != "finetune":
            out.append(f"pretrained is ignored by a {self.task} run")
        if self.limit_train is not None and self.limit_train < self.batch_size:
            out.append(f"limit_train {self.limit_train} is smaller than one batch ({self.batch_size}): no step can run")
        if self.autoaugment == "svhn" and self.dataset != "svhn" or self.autoaugment == "cifar10" and self.dataset == "svhn":
            out.append(f"the {self.autoaugment} AutoAugment policy on {self.dataset}")
        return out

    @property
    def peak_lr(self) -> float:
        """Eq. 17: base_lr × global batch / 256 (unless an absolute lr is set)."""
        return self.lr if self.lr is not None else self.base_lr * self.batch_size / 256

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recipe:
        """A recipe from :meth:`to_dict`'s output (JSON lists become tuples); unknown keys are ignored."""
        known = {f.name for f in fields(cls)}
        d = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in known}
        return cls(**d)

    def replace(self, **changes) -> Recipe:
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise RecipeError(f"unknown recipe field(s) {sorted(unknown)}; fields: {field_names()}")
        return dataclasses.replace(self, **changes)


FIELDS = {f.name: f for f in fields(Recipe)}


def field_names() -> list[str]:
    return list(FIELDS)


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


def field_kind(name: str) -> str:
    """How a field's value is written: "bool", "int", "float", "pair" (two floats) or "str"."""
    t = str(FIELDS[name].type)
    for kind, marker in (("bool", "bool"), ("pair", "tuple"), ("float", "float"), ("int", "int")):
        if marker in t:
            return kind
    return "str"


_KIND_WORDS = {"bool": "true or false", "int": "an integer", "float": "a number", "pair": "two numbers a,b",
               "str": "a string"}


def field_problem(name: str, value: Any) -> str | None:
    """None if ``value`` is allowed for the field ``name``, else what is allowed."""
    f = FIELDS[name]
    if value is None:
        return None if "None" in str(f.type) else "set (it cannot be none)"
    kind = field_kind(name)
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    well_typed = {"bool": isinstance(value, bool), "int": number(value) and isinstance(value, int),
                  "float": number(value), "str": isinstance(value, str),
                  "pair": isinstance(value, tuple) and all(number(v) for v in value)}[kind]
    if not well_typed:
        return _KIND_WORDS[kind]
    allowed = f.metadata["choices"]
    if allowed is not None and value not in allowed:
        return f"one of {', '.join(map(str, allowed + (('none',) if 'None' in str(f.type) else ())))}"
    check = f.metadata["check"]
    return check(value) if check is not None else None


def parse_field(name: str, text: str) -> Any:
    """The value of field ``name`` written as ``text`` ("none" for an optional field; booleans as
    true/false/1/0/yes/no/on/off; pairs as "a,b"). Raises RecipeError naming what is allowed."""
    if name not in FIELDS:
        raise RecipeError(f"unknown recipe field {name!r}; fields: {', '.join(field_names())}")
    if not isinstance(text, str):
        raise RecipeError(f"expected text, got {text!r}", name)
    kind, low = field_kind(name), text.strip().lower()
    if low in ("none", "null") and "None" in str(FIELDS[name].type):
        return None
    try:
        if kind == "bool":
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if kind == "pair":
            value = tuple(float(v) for v in text.replace("(", "").replace(")", "").split(","))
        elif kind == "int":
            value = int(text)
        elif kind == "float":
            value = float(text)
        else:
            value = text.upper() if name == "model" else text
    except ValueError:
        value = text
        problem = _KIND_WORDS[kind]
    else:
        problem = field_problem(name, value)
    if problem is not None:
        raise RecipeError(f"must be {problem}; got {value!r}", name)
    return value


def apply_overrides(recipe: Recipe, overrides: dict[str, Any], settings: list[str] | None = None) -> Recipe:
    """Named overrides (None values ignored) then ``key=value`` strings; validated."""
    changes = {k: v for k, v in overrides.items() if v is not None}
    for item in settings or []:
        if "=" not in item:
            raise RecipeError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        changes[key.strip()] = parse_field(key.strip(), value)
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
