"""Training: recipes (the paper's Tables 3-6), AdamW groups and schedules, checkpoints, metrics,
the epoch loop (single process or DistributedDataParallel)."""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .loop import RunError, Trainer, TrainingInterrupted, evaluate_checkpoint, run
from .metrics import MetricsLog, plot_run, read_metrics
from .optim import WarmupCosine, build_optimizer, param_groups
from .recipes import Recipe, RecipeError, get_recipe, recipe_names

__all__ = [
    "CheckpointError",
    "MetricsLog",
    "Recipe",
    "RecipeError",
    "RunError",
    "Trainer",
    "TrainingInterrupted",
    "WarmupCosine",
    "build_optimizer",
    "evaluate_checkpoint",
    "get_recipe",
    "load_checkpoint",
    "param_groups",
    "plot_run",
    "read_metrics",
    "recipe_names",
    "run",
    "save_checkpoint",
]
