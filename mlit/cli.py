"""The `mlit` command line: one sub-command per job.

    mlit params                                   parameter counts beside the paper's
    mlit recipes [--show NAME [--model S]]        the paper's training presets
    mlit pretrain --recipe table3-cifar100 --model XXS --out runs/pre-xxs
    mlit finetune --recipe table5-cifar10 --model XXS --pretrained runs/pre-xxs --out runs/ft
    mlit train    --recipe table8-mlit-xxs-cifar10 --out runs/scratch   (= table6-cifar10 --model XXS)
    mlit eval     runs/ft [--dataset cifar10 --split test]
    mlit plot     runs/ft
    mlit profile  --recipe table6-cifar10 --model S --batch-size 256
"""

from __future__ import annotations

import argparse
import json
import sys

DEFAULT_RECIPE = {"pretrain": "table3-cifar100", "finetune": "table4-cifar100", "train": "table6-fashion_mnist"}


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
            raise _fail("recipes", e) from None
        print(json.dumps(recipe.to_dict(), indent=2))
    else:
        print(describe_recipes())
    return 0


# Named flags → recipe fields (None = not given, keep the recipe's value).
_FLAGS = [
    ("--model", "model", str, "model size S, XS or XXS (default XXS, or the row's size)"),
    ("--dataset", "dataset", str, "data set (cifar10, cifar100, svhn, flowers102, fashion_mnist)"),
    ("--epochs", "epochs", int, "epochs"),
    ("--warmup-epochs", "warmup_epochs", float, "warm-up epochs"),
    ("--batch-size", "batch_size", int, "global batch (all processes together)"),
    ("--base-lr", "base_lr", float, "base lr; lr = base_lr x batch / 256 (Eq. 17)"),
    ("--lr", "lr", float, "absolute peak lr (overrides Eq. 17)"),
    ("--min-lr", "min_lr", float, "lr at the end of the cosine"),
    ("--weight-decay", "weight_decay", float, "AdamW weight decay"),
    ("--layer-decay", "layer_decay", float, "layer-wise lr decay"),
    ("--seed", "seed", int, "seed"),
    ("--data-dir", "data_dir", str, "folder with the data set's files"),
    ("--cache-dir", "cache_dir", str, "cache of decoded splits"),
    ("--limit-train", "limit_train", int, "train on a seeded random subset of N images"),
    ("--limit-test", "limit_test", int, "evaluate on the first N images"),
    ("--eval-every", "eval_every", int, "evaluate every N epochs"),
    ("--eval-split", "eval_split", str, "split to evaluate on (test; val for flowers102)"),
]


def _add_training_args(p: argparse.ArgumentParser, task: str) -> None:
    p.add_argument("--recipe", default=None,
                   help=f"preset (`mlit recipes` lists them; default {DEFAULT_RECIPE[task]})")
    for flag, dest, typ, helptext in _FLAGS:
        p.add_argument(flag, dest=dest, type=typ, default=None, help=helptext)
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="override any recipe field (repeatable), e.g. --set hflip=0 --set autoaugment=none")
    p.add_argument("--no-verify", dest="verify", action="store_const", const=False, default=None,
                   help="read an unofficial copy/subset of the data set (no md5 check)")
    p.add_argument("--download", dest="download", action="store_const", const=True, default=None,
                   help="download missing official files")
    p.add_argument("--no-augment", dest="augment", action="store_const", const=False, default=None,
                   help="no augmentation (resize + normalise only)")
    p.add_argument("--no-amp", dest="amp", action="store_const", const=False, default=None,
                   help="fp32 on CUDA too (no autocast / loss scaling)")
    if task == "finetune":
        p.add_argument("--pretrained", dest="pretrained", default=None,
                       help="pre-training run dir, checkpoint.pt or model.safetensors whose encoder to load")
    p.add_argument("--out", default=None, help="run directory (default runs/<recipe>-<model>)")
    p.add_argument("--resume", default=None, help="checkpoint or run directory to continue exactly")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default cuda if available)")
    p.add_argument("--backend", default="auto", help="MoE backend: auto (Triton on CUDA, else reference), triton, reference")
    p.add_argument("--stop-after-epochs", type=int, default=None,
                   help="stop (with a checkpoint) after N epochs in this invocation; continue with --resume")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _fail(command: str, err: BaseException) -> SystemExit:
    return SystemExit(f"mlit {command}: error: {err}")


def _user_errors() -> tuple[type[BaseException], ...]:
    from .data import DataError
    from .train import CheckpointError, RecipeError, RunError

    return (RecipeError, CheckpointError, DataError, RunError, FileNotFoundError)


def build_recipe(args: argparse.Namespace, task: str):
    """The recipe of a training command: the preset (or, with --resume, the checkpoint's) plus overrides."""
    from pathlib import Path

    from .data import DATASETS
    from .train.checkpoint import load_checkpoint
    from .train.recipes import Recipe, RecipeError, apply_overrides, get_recipe

    overrides = {dest: getattr(args, dest) for _, dest, _, _ in _FLAGS}
    for dest in ("verify", "download", "augment", "amp", "pretrained"):
        overrides[dest] = getattr(args, dest, None)
    if args.resume:
        state = load_checkpoint(args.resume)
        if not state.get("recipe"):
            raise RecipeError(f"{args.resume} carries no recipe; cannot resume from it")
        recipe = Recipe.from_dict(state["recipe"])
        if args.recipe and args.recipe.lower() != recipe.name:
            print(f"note: --recipe {args.recipe} ignored; resuming the checkpoint's recipe {recipe.name}",
                  file=sys.stderr)
    else:
        recipe = get_recipe(args.recipe or DEFAULT_RECIPE[task], args.model)
    model_override = overrides.pop("model")
    recipe = apply_overrides(recipe, overrides, args.settings)
    if model_override is not None and args.resume:  # fresh runs: get_recipe applied it
        recipe = recipe.replace(model=model_override)
    if recipe.task != task:
        raise RecipeError(f"recipe {recipe.name!r} is a {recipe.task!r} recipe; run it with `mlit {recipe.task}`")
    if recipe.dataset not in DATASETS:
        raise RecipeError(f"unknown data set {recipe.dataset!r}; choose one of {', '.join(DATASETS)}")
    recipe.validate()
    out = args.out
    if out is None:
        if args.resume:
            p = Path(args.resume)
            out = str(p if p.is_dir() else p.parent)
        else:
            out = str(Path("runs") / f"{recipe.name}-{recipe.model.lower()}")
    return recipe, out


def cmd_train(args: argparse.Namespace) -> int:
    task = args.command
    from .train import TrainingInterrupted, run

    try:
        recipe, out = build_recipe(args, task)
        import os

        if int(os.environ.get("RANK", "0")) == 0:
            print(f"{task}: recipe {recipe.name}, model {recipe.model}, data {recipe.dataset}, "
                  f"{recipe.epochs} epochs, batch {recipe.batch_size}, peak lr {recipe.peak_lr:.3g} -> {out}",
                  file=sys.stderr)
        run(recipe, out, device=args.device, backend=args.backend, resume=args.resume,
            stop_after_epochs=args.stop_after_epochs, progress=args.progress)
    except TrainingInterrupted as e:
        print(f"mlit {task}: {e}", file=sys.stderr)
        return e.exit_code
    except _user_errors() as e:
        raise _fail(task, e) from None
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .train import evaluate_checkpoint

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

    try:
        recipe = get_recipe(args.recipe, args.model)
        recipe = apply_overrides(recipe, {"batch_size": args.batch_size}, args.settings)
    except RecipeError as e:
        raise _fail("profile", e) from None
    report = profile_training(recipe, args.device or default_device(), args.backend, steps=args.steps,
                              warmup=args.warmup)
    print(report.table())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlit", description="mLiT / mmLiT: lightweight MoE vision transformers")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("params", help="print the parameter counts of S, XS, XXS beside the paper's")
    p.set_defaults(func=cmd_params)

    p = sub.add_parser("recipes", help="list the training presets (the paper's Tables 3-6 and result rows)")
    p.add_argument("--show", default=None, help="print every field of one recipe")
    p.add_argument("--model", default=None, help="model size for --show")
    p.set_defaults(func=cmd_recipes)

    for task, helptext in (("pretrain", "MAE pre-training (Table 3)"),
                           ("finetune", "fine-tune a pre-trained encoder (Tables 4-5)"),
                           ("train", "supervised training from scratch (Table 6)")):
        p = sub.add_parser(task, help=helptext)
        _add_training_args(p, task)
        p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="top-1 of a checkpoint on a split")
    p.add_argument("checkpoint", help="run dir, checkpoint.pt or model.safetensors")
    p.add_argument("--dataset", default=None, help="default: the checkpoint's data set")
    p.add_argument("--split", default="test")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--no-verify", dest="verify", action="store_false")
    p.add_argument("--limit", type=int, default=None, help="first N images only")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default=None)
    p.add_argument("--backend", default="auto")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("profile", help="time the components of a training step (torch.profiler)")
    p.add_argument("--recipe", default="table6-cifar10")
    p.add_argument("--model", default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default=None)
    p.add_argument("--backend", default="auto")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("plot", help="draw a run's loss / accuracy curves to PNG")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_plot)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
