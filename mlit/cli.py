"""The `mlit` command line: one sub-command per job.

    mlit params                                   parameter counts beside the paper's
    mlit recipes [--show NAME [--model S]]        the paper's training presets
    mlit pretrain --recipe table3-cifar100 --model XXS --out runs/pre-xxs
    mlit finetune --recipe table5-cifar10 --model XXS --pretrained runs/pre-xxs --out runs/ft
    mlit train    --recipe table8-mlit-xxs-cifar10 --out runs/scratch   (= table6-cifar10 --model XXS)
    mlit train    --config runs/scratch/recipe.json --epochs 5           (a run's settings, overridden)
    mlit eval     runs/ft [--dataset cifar10 --split test]
    mlit plot     runs/ft
    mlit profile  --recipe table6-cifar10 --model S --batch-size 256
    mlit export   runs/ft --onnx ft.onnx
    mlit predict  runs/ft image.png [more.jpg batch.npy]
    mlit doctor   [--clear] [--json] [--quick] [--no-timing]   check and clear the kernels on this machine

Every recipe setting is a flag made from its :class:`~mlit.train.recipes.Recipe` field (help text
and allowed values from the field), so a bad value stops at parsing, with one
``mlit <cmd>: error:`` line naming the flag, before any data are loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from . import __version__

DEFAULT_RECIPE = {"pretrain": "table3-cifar100", "finetune": "table4-cifar100", "train": "table6-fashion_mnist"}
BACKENDS = ("auto", "reference", "triton")


class UsageError(SystemExit):
    """A bad command line: exit status 2; ``str()`` is the ``mlit <cmd>: error: ...`` line (printed)."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


class _Parser(argparse.ArgumentParser):
    """argparse with errors as UsageError (so callers of main() see the message)."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise UsageError(f"{self.prog}: error: {message}")


def _fail(command: str, err: BaseException | str) -> SystemExit:
    """A run-time error (bad file, data problem): exit status 1 with one error line."""
    return SystemExit(f"mlit {command}: error: {err}")


def _user_errors() -> tuple[type[BaseException], ...]:
    from .data import DataError
    from .train import CheckpointError, RecipeError, RunError

    return (RecipeError, CheckpointError, DataError, RunError, FileNotFoundError)


# ----------------------------------------------------------------------------------------------
# Value checks shared by the commands (argparse `type=` functions: they run while parsing)
# ----------------------------------------------------------------------------------------------


def _int_at_least(low: int):
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}; got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}; got {value}")
        return value

    convert.__name__ = f"int>={low}"
    return convert


def device_arg(text: str) -> str:
    """A device this machine has: cpu, cuda, cuda:N (N < the CUDA device count) or mps."""
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; choose cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return text
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(
                f"{text}: this machine has no usable CUDA device (torch {torch.__version__}, "
                f"{'built without CUDA' if torch.version.cuda is None else 'CUDA ' + torch.version.cuda}); use cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise argparse.ArgumentTypeError(f"{text}: this machine has {count} CUDA device(s), "
                                             f"cuda:0 to cuda:{count - 1}")
        return text
    if dev.type == "mps" and torch.backends.mps.is_available():
        return text
    raise argparse.ArgumentTypeError(f"{text}: no such device here; choose cpu" +
                                     (", cuda or cuda:N" if torch.cuda.is_available() else ""))


def backend_arg(text: str) -> str:
    if text not in BACKENDS:
        raise argparse.ArgumentTypeError(f"unknown backend {text!r}; choose one of {', '.join(BACKENDS)}")
    return text


def save_every_arg(text: str) -> tuple[str, float]:
    """``N`` (optimizer steps) → ("steps", N); ``Nm`` (minutes) → ("minutes", N)."""
    m = re.fullmatch(r"\s*(\d+)\s*", text)
    if m and int(m.group(1)) >= 1:
        return "steps", int(m.group(1))
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*m(?:in)?\s*", text)
    if m and float(m.group(1)) > 0:
        return "minutes", float(m.group(1))
    raise argparse.ArgumentTypeError(f"must be N (optimizer steps, N >= 1) or Nm (minutes > 0), e.g. 500 or 10m; "
                                     f"got {text!r}")


def check_backend(parser: argparse.ArgumentParser, backend: str, device: str | None) -> None:
    """--backend triton needs CUDA, or Triton's interpreter on the CPU (TRITON_INTERPRET=1)."""
    if backend != "triton":
        return
    import torch

    target = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        import triton  # noqa: F401 - only whether it is installed
    except ImportError:
        parser.error("argument --backend: triton is not installed here (pip install triton, Linux); "
                     "use --backend reference")
    if target.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error(f"argument --backend: triton on {target.type} runs only through Triton's interpreter: set "
                     f"TRITON_INTERPRET=1 in the environment (e.g. `TRITON_INTERPRET=1 mlit ...`; slow, for checking "
                     f"only), or use --backend reference or auto")


def _existing_path(what: str):
    def convert(text: str) -> str:
        if not Path(text).expanduser().exists():
            raise argparse.ArgumentTypeError(f"{what} {text} does not exist")
        return text

    return convert


# ----------------------------------------------------------------------------------------------
# Recipe flags, one per Recipe field
# ----------------------------------------------------------------------------------------------


def flag_of(name: str) -> str:
    """The CLI flag of a recipe field: ``warmup_epochs`` → ``--warmup-epochs``."""
    return "--" + name.replace("_", "-")


def _field_type(name: str):
    from .train.recipes import RecipeError, parse_field

    def convert(text: str):
        try:
            return parse_field(name, text)
        except RecipeError as e:
            raise argparse.ArgumentTypeError(e.detail) from None

    convert.__name__ = name
    return convert


def _metavar(name: str) -> str | None:
    from .train.recipes import FIELDS, field_kind

    choices = FIELDS[name].metadata["choices"]
    if choices is not None:
        return "{" + ",".join(choices + (("none",) if "None" in str(FIELDS[name].type) else ())) + "}"
    return {"pair": "A,B", "int": "N", "float": "X"}.get(field_kind(name), "VALUE" if "dir" not in name else "DIR")


def _add_recipe_flags(p: argparse.ArgumentParser, task: str) -> list[str]:
    """One flag per Recipe field that the task uses; returns the field names (dests)."""
    from .train.recipes import FIELDS, field_kind

    group = p.add_argument_group("recipe settings (default: the recipe's value; `mlit recipes --show NAME` lists them)")
    names = []
    for name, f in FIELDS.items():
        meta = f.metadata
        if not meta["cli"] or task not in meta["tasks"]:
            continue
        helptext = meta["help"]
        if field_kind(name) == "bool":
            group.add_argument(flag_of(name), dest=name, default=None, action=argparse.BooleanOptionalAction,
                               help=helptext)
        else:
            group.add_argument(flag_of(name), dest=name, default=None, type=_field_type(name), metavar=_metavar(name),
                               help=helptext)
        names.append(name)
    return names


def _add_training_args(p: argparse.ArgumentParser, task: str) -> None:
    p.add_argument("--recipe", default=None, metavar="NAME",
                   help=f"preset (`mlit recipes` lists them; default {DEFAULT_RECIPE[task]}, or the Table "
                        f"{'5' if task == 'finetune' else '6' if task == 'train' else '3'} recipe of --dataset)")
    p.add_argument("--config", default=None, type=_existing_path("config file"), metavar="FILE",
                   help="start from the settings in FILE: a run's recipe.json, or a recipe as `mlit recipes --show` "
                        "prints it (flags and --set override it)")
    p.set_defaults(recipe_fields=_add_recipe_flags(p, task))
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="override any recipe field (repeatable), e.g. --set hflip=0 --set autoaugment=none")
    p.add_argument("--out", default=None, help="run directory (default runs/<recipe>-<model>)")
    p.add_argument("--resume", default=None, type=_existing_path("checkpoint or run directory"),
                   help="checkpoint or run directory to continue exactly")
    p.add_argument("--device", default=None, type=device_arg, help="cpu, cuda, cuda:1 (default cuda if available)")
    p.add_argument("--backend", default="auto", type=backend_arg, choices=BACKENDS,
                   help="MoE implementation: auto (Triton on CUDA, else reference), triton, reference")
    p.add_argument("--stop-after-epochs", type=_int_at_least(1), default=None, metavar="N",
                   help="stop (with a checkpoint) after N epochs in this invocation; continue with --resume")
    p.add_argument("--save-every", type=save_every_arg, default=None, metavar="N|Nm",
                   help="also checkpoint every N optimizer steps, or every N minutes with Nm (e.g. 10m)")
    p.add_argument("--max-steps", type=_int_at_least(1), default=None, metavar="N",
                   help="stop after N optimizer steps in all (a smoke run; checkpoint written)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--no-clear", dest="clear_kernels", action="store_false",
                   help="on CUDA with --backend auto, skip checking the uncleared kernel families in child processes "
                        "before the first step (they then run as torch)")


# ----------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------


def cmd_params(args: argparse.Namespace) -> int:
    from .params import format_table, parameter_table

    print(format_table(parameter_table()))
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from .train.recipes import RecipeError, describe_recipes, get_recipe

    if args.show:
        try:
            recipe = get_recipe(args.show, args.model)
        except RecipeError as e:
            _recipe_error(args.parser, e)
        print(json.dumps(recipe.to_dict(), indent=2))
    else:
        print(describe_recipes())
    return 0


def default_recipe_name(task: str, dataset: str | None) -> str:
    """The preset a command runs without --recipe: its default, or the paper's recipe of ``dataset``
    for the task (Table 6 from scratch, Table 5 fine-tuning; pre-training has Table 3 only)."""
    if dataset is None or task == "pretrain":
        return DEFAULT_RECIPE[task]
    if task == "finetune" and dataset == "cifar100":
        return DEFAULT_RECIPE[task]
    return f"table{5 if task == 'finetune' else 6}-{dataset}"


def _load_config(path: str):
    from .train.recipes import FIELDS, Recipe, RecipeError

    try:
        blob = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecipeError(f"--config {path}: not a readable JSON file ({e})") from None
    d = blob.get("recipe", blob) if isinstance(blob, dict) else None
    if not isinstance(d, dict):
        raise RecipeError(f"--config {path}: expected a JSON object (a recipe, or a run's recipe.json)")
    unknown = sorted(set(d) - set(FIELDS))
    if unknown:
        raise RecipeError(f"--config {path}: unknown recipe field(s) {', '.join(unknown)}")
    return Recipe.from_dict(d)


def build_recipe(args: argparse.Namespace, task: str):
    """The recipe of a training command and its run folder: the preset (or --config file, or with
    --resume the checkpoint's recipe) plus flags and --set overrides; validated."""
    from .train.checkpoint import load_checkpoint
    from .train.recipes import Recipe, RecipeError, apply_overrides, get_recipe

    overrides = {name: getattr(args, name) for name in args.recipe_fields}
    model_override = overrides.pop("model")
    if args.config and (args.recipe or args.resume):
        raise RecipeError(f"--config cannot be combined with {'--recipe' if args.recipe else '--resume'}")
    if args.resume:
        state = load_checkpoint(args.resume)
        if not state.get("recipe"):
            raise RecipeError(f"{args.resume} carries no recipe; cannot resume from it")
        base = Recipe.from_dict(state["recipe"])
        if args.recipe and args.recipe.lower() != base.name:
            print(f"note: --recipe {args.recipe} ignored; resuming the checkpoint's recipe {base.name}",
                  file=sys.stderr)
    elif args.config:
        base = _load_config(args.config)
    else:
        base = get_recipe(args.recipe or default_recipe_name(task, overrides["dataset"]), model_override)
    recipe = apply_overrides(base, overrides, args.settings)
    if model_override is not None and (args.resume or args.config):  # presets: get_recipe applied it
        recipe = recipe.replace(model=model_override)
    if recipe.task != task:
        raise RecipeError(f"recipe {recipe.name!r} is a {recipe.task!r} recipe; run it with `mlit {recipe.task}`")
    if recipe.data_dir is not None and not Path(recipe.data_dir).expanduser().exists():
        raise RecipeError(f"{recipe.data_dir} does not exist", "data_dir")
    recipe.validate()
    out = args.out
    if out is None:
        if args.resume:
            p = Path(args.resume)
            out = str(p if p.is_dir() else p.parent)
        else:
            on = f"-{recipe.dataset}" if recipe.dataset != base.dataset else ""
            out = str(Path("runs") / f"{recipe.name}{on}-{recipe.model.lower()}")
    return recipe, base, out


def _recipe_error(parser: argparse.ArgumentParser, e) -> None:
    """Report a RecipeError as a usage error, naming the flag of the field at fault."""
    parser.error(f"argument {flag_of(e.field)}: {e.detail}" if e.field is not None else str(e))


def _run_kwargs(args: argparse.Namespace) -> dict:
    """The optional keywords of mlit.train.run from --save-every / --max-steps (only those given)."""
    kwargs = {}
    if args.save_every is not None:
        unit, value = args.save_every
        kwargs["save_every_steps" if unit == "steps" else "save_every_minutes"] = value
    if args.max_steps is not None:
        kwargs["max_steps"] = args.max_steps
    return kwargs


def cmd_train(args: argparse.Namespace) -> int:
    task = args.command
    from .train import TrainingInterrupted, run
    from .train.recipes import RecipeError

    try:
        recipe, base, out = build_recipe(args, task)
    except RecipeError as e:
        _recipe_error(args.parser, e)
    except _user_errors() as e:
        raise _fail(task, e) from None
    check_backend(args.parser, args.backend, args.device)
    if int(os.environ.get("RANK", "0")) == 0:
        for warning in recipe.warnings():
            print(f"mlit {task}: warning: {warning}", file=sys.stderr)
        if recipe.dataset != base.dataset:
            print(f"note: recipe {recipe.name} is the paper's setting for {base.dataset}; running it on "
                  f"{recipe.dataset}", file=sys.stderr)
        print(f"{task}: recipe {recipe.name}, model {recipe.model}, data {recipe.dataset}, "
              f"{recipe.epochs} epochs, batch {recipe.batch_size}, peak lr {recipe.peak_lr:.3g} -> {out}",
              file=sys.stderr)
    try:
        run(recipe, out, device=args.device, backend=args.backend, resume=args.resume,
            stop_after_epochs=args.stop_after_epochs, progress=args.progress, clear_kernels=args.clear_kernels,
            **_run_kwargs(args))
    except TrainingInterrupted as e:
        print(f"mlit {task}: {e}", file=sys.stderr)
        return e.exit_code
    except _user_errors() as e:
        raise _fail(task, e) from None
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .train import evaluate_checkpoint

    check_backend(args.parser, args.backend, args.device)
    try:
        res = evaluate_checkpoint(args.checkpoint, args.dataset, args.split, data_dir=args.data_dir,
                                  cache_dir=args.cache_dir, verify=args.verify, limit=args.limit, device=args.device,
                                  backend=args.backend, batch_size=args.batch_size)
    except _user_errors() as e:
        raise _fail("eval", e) from None
    except ValueError as e:  # unknown data set / split
        raise _fail("eval", e) from None
    print(json.dumps(res, indent=2))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .train import plot_run

    try:
        files = plot_run(args.run_dir)
    except (FileNotFoundError, ValueError) as e:
        raise _fail("plot", e) from None
    for f in files:
        print(f)
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from .profile import profile_training
    from .train.distributed import default_device
    from .train.recipes import RecipeError, apply_overrides, get_recipe

    check_backend(args.parser, args.backend, args.device)
    try:
        recipe = get_recipe(args.recipe, args.model)
        recipe = apply_overrides(recipe, {"batch_size": args.batch_size}, args.settings)
    except RecipeError as e:
        _recipe_error(args.parser, e)
    report = profile_training(recipe, args.device or default_device(), args.backend, steps=args.steps,
                              warmup=args.warmup)
    print(report.table())
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import ExportError, export_onnx

    try:
        report = export_onnx(args.run, args.onnx, opset=args.opset, check=args.check)
    except (ExportError, *_user_errors()) as e:
        raise _fail("export", e) from None
    print(report)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .predict import PredictError, format_predictions, predict_files

    check_backend(args.parser, args.backend, args.device)
    try:
        predictions = predict_files(args.run, args.images, top_k=args.top_k, device=args.device,
                                    backend=args.backend, batch_size=args.batch_size)
    except (PredictError, *_user_errors()) as e:
        raise _fail("predict", e) from None
    if args.json:
        print(json.dumps([p.to_dict() for p in predictions], indent=2))
    else:
        print(format_predictions(predictions))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import run

    families = tuple(args.families.split(",")) if args.families else None
    report = run(quick=args.quick, timing=args.timing and not args.clear, clear_only=args.clear, families=families,
                 model=args.model, task=args.task, batch=args.batch_size, as_json=args.json, timeout=args.timeout)
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    from .train.recipes import MODEL_SIZES

    parser = _Parser(prog="mlit", description="mLiT / mmLiT: lightweight MoE vision transformers")
    parser.add_argument("--version", action="version", version=f"mlit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, helptext: str, func) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=helptext, description=helptext)
        p.set_defaults(func=func, parser=p)
        return p

    command("params", "print the parameter counts of S, XS, XXS beside the paper's", cmd_params)

    p = command("recipes", "list the training presets (the paper's Tables 3-6 and result rows)", cmd_recipes)
    p.add_argument("--show", default=None, metavar="NAME", help="print every field of one recipe")
    p.add_argument("--model", default=None, type=str.upper, choices=MODEL_SIZES, help="model size for --show")

    for task, helptext in (("pretrain", "MAE pre-training (Table 3)"),
                           ("finetune", "fine-tune a pre-trained encoder (Tables 4-5)"),
                           ("train", "supervised training from scratch (Table 6)")):
        _add_training_args(command(task, helptext, cmd_train), task)

    p = command("eval", "top-1 of a checkpoint on a split", cmd_eval)
    p.add_argument("checkpoint", help="run dir, checkpoint.pt or model.safetensors")
    p.add_argument("--dataset", default=None, help="default: the checkpoint's data set")
    p.add_argument("--split", default="test", choices=("test", "val", "train"))
    p.add_argument("--data-dir", default=None, type=_existing_path("--data-dir"))
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--no-verify", dest="verify", action="store_false", help="no md5 check (unofficial copy)")
    p.add_argument("--limit", type=_int_at_least(1), default=None, metavar="N", help="first N images only")
    p.add_argument("--batch-size", type=_int_at_least(1), default=256, metavar="N")
    p.add_argument("--device", default=None, type=device_arg)
    p.add_argument("--backend", default="auto", type=backend_arg, choices=BACKENDS)

    p = command("profile", "time the components of a training step (torch.profiler)", cmd_profile)
    p.add_argument("--recipe", default="table6-cifar10", metavar="NAME")
    p.add_argument("--model", default=None, type=str.upper, choices=MODEL_SIZES)
    p.add_argument("--batch-size", type=_int_at_least(1), default=None, metavar="N")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=_int_at_least(1), default=20, metavar="N", help="profiled steps")
    p.add_argument("--warmup", type=_int_at_least(0), default=5, metavar="N", help="untimed steps first")
    p.add_argument("--device", default=None, type=device_arg)
    p.add_argument("--backend", default="auto", type=backend_arg, choices=BACKENDS)

    p = command("plot", "draw a run's loss / accuracy curves to PNG", cmd_plot)
    p.add_argument("run_dir")

    p = command("export", "export a trained classifier to ONNX (eval graph, reference MoE path, dynamic batch)",
                cmd_export)
    p.add_argument("run", help="run dir, checkpoint.pt or model.safetensors of a classifier")
    p.add_argument("--onnx", required=True, metavar="FILE", help="the .onnx file to write")
    p.add_argument("--opset", type=_int_at_least(18), default=None, metavar="N", help="ONNX opset (default: the "
                   "exporter's)")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the onnxruntime-versus-torch comparison on random inputs after export")

    p = command("doctor", "self-check: versions, device; every kernel family checked against its reference "
                "(values and gradients) in a child process and cleared for this GPU; timings; exit status 1 when a "
                "family fails", cmd_doctor)
    p.add_argument("--clear", action="store_true",
                   help="check only the families not yet cleared on this GPU for their current code; no timings")
    p.add_argument("--json", action="store_true", help="print one JSON record per family instead of the tables")
    p.add_argument("--quick", action="store_true", help="on a GPU, the fp16-autocast configuration only")
    p.add_argument("--no-timing", dest="timing", action="store_false", help="skip the timings")
    p.add_argument("--model", default="XXS", type=str.upper, choices=MODEL_SIZES,
                   help="on a GPU, check at this model's shapes (default XXS)")
    p.add_argument("--task", default="train", choices=("train", "pretrain"),
                   help="on a GPU, the families and shapes of this task (default train)")
    p.add_argument("--batch-size", type=_int_at_least(1), default=256, metavar="N", help="images a step (default 256)")
    p.add_argument("--families", default=None, metavar="A,B", help="only these families (mlit_kernels.registry names)")
    p.add_argument("--timeout", type=float, default=None, metavar="S", help="seconds a family's check may take")

    p = command("predict", "top-5 classes of image files (PNG/JPEG) or .npy batches with a trained classifier",
                cmd_predict)
    p.add_argument("run", help="run dir, checkpoint.pt or model.safetensors of a classifier")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="PNG / JPEG files, or .npy uint8 arrays "
                   "(H, W), (H, W, C), (N, H, W), (N, H, W, C) or (N, C, H, W)")
    p.add_argument("--top-k", type=_int_at_least(1), default=5, metavar="K", help="classes shown per image")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--batch-size", type=_int_at_least(1), default=256, metavar="N")
    p.add_argument("--device", default=None, type=device_arg)
    p.add_argument("--backend", default="auto", type=backend_arg, choices=BACKENDS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
