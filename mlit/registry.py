"""The model registry: ``mlit.create_model(name, ...)`` and ``mlit.list_models()``, as in timm.

Names: ``mlit_s``, ``mlit_xs``, ``mlit_xxs`` (the classifier, MLiTClassifier) and ``mmlit_s``,
``mmlit_xs``, ``mmlit_xxs`` (the masked auto-encoder used for pre-training, MMLiT). A fine-tuned
mmLiT is an ``mlit_*`` classifier (same architecture); build it from its run with
``create_model("mlit_xxs", checkpoint="runs/ft")``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import os

from torch import nn

from .config import DECODER, ENCODERS, TransformerConfig

log = logging.getLogger(__name__)

#: name → (kind, encoder size); kind "classifier" (mLiT) or "mae" (mmLiT pre-training).
MODELS: dict[str, tuple[str, str]] = {
    **{f"mlit_{size.lower()}": ("classifier", size) for size in ENCODERS},
    **{f"mmlit_{size.lower()}": ("mae", size) for size in ENCODERS},
}
DEFAULT_NUM_CLASSES = 10


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching the shell-style ``pattern`` (e.g. ``"mlit_*"``), sorted."""
    return sorted(n for n in MODELS if fnmatch.fnmatch(n, pattern.lower()))


def _lookup(name: str) -> tuple[str, str]:
    try:
        return MODELS[name.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(list_models())}") from None


def create_model(name: str, num_classes: int | None = None, backend: str = "auto",
                 checkpoint: str | os.PathLike | None = None, dropout: float | None = None) -> nn.Module:
    """Build a registered model, optionally with the weights of a run.

    name: one of :func:`list_models`. num_classes: classes of an ``mlit_*`` head (default: the
    checkpoint's, else 10). backend: MoE implementation of every layer ("auto": Triton for CUDA
    tensors, the reference otherwise; "reference"; "triton"). checkpoint: a run directory,
    ``checkpoint.pt`` or ``model.safetensors`` written by ``mlit``; its model size must be the
    name's. A classifier checkpoint fills an ``mlit_*`` model (a different ``num_classes`` keeps
    its encoder and starts a fresh head); a pre-training checkpoint fills an ``mmlit_*`` model, or
    the encoder of an ``mlit_*`` one (fresh head). dropout: the MoE output dropout (default the
    checkpoint's, else 0.1). The model is returned in training mode, on the CPU.
    """
    state = None
    if checkpoint is not None:
        from .train.checkpoint import load_checkpoint

        state = load_checkpoint(checkpoint, map_location="cpu")
    return _create(name, num_classes, backend, state, str(checkpoint), dropout)


def load_model(checkpoint: str | os.PathLike, backend: str = "auto") -> tuple[nn.Module, dict]:
    """The model a run trained, named by its checkpoint (``mmlit_*`` for pre-training, else
    ``mlit_*``), in eval mode; and the checkpoint's metadata (task, model_config, num_classes,
    recipe; no weights)."""
    from .train.checkpoint import CheckpointError, load_checkpoint

    state = load_checkpoint(checkpoint, map_location="cpu")
    if not state.get("model_config") or not state.get("task"):
        raise CheckpointError(f"{checkpoint} carries no model configuration / task; was it written by mlit?")
    model = _create(model_name(state["model_config"], state["task"]), None, backend, state, str(checkpoint), None)
    meta = {k: v for k, v in state.items() if k in ("task", "model_config", "num_classes", "recipe")}
    return model.eval(), meta


def _create(name: str, num_classes: int | None, backend: str, state: dict | None, source: str,
            dropout: float | None) -> nn.Module:
    from .models import MLiTClassifier, MMLiT

    kind, size = _lookup(name)
    cfg = ENCODERS[size]
    if state is not None:
        from .train.checkpoint import CheckpointError, describe, same_config

        ck_cfg = state.get("model_config") or {}
        if not same_config(ck_cfg, dataclasses.asdict(cfg)):
            raise CheckpointError(
                f"checkpoint {source} does not hold a {name} model:\n"
                f"  checkpoint: {describe(state.get('task'), ck_cfg, state.get('num_classes'))}\n"
                f"  {name}: {describe('pretrain' if kind == 'mae' else 'train', dataclasses.asdict(cfg), num_classes)}")
        if dropout is None and "dropout" in ck_cfg:
            dropout = ck_cfg["dropout"]
        if kind == "mae" and state.get("task") != "pretrain":
            raise CheckpointError(f"checkpoint {source} holds a {state.get('task')} classifier, not a masked "
                                  f"auto-encoder; build it with create_model('mlit_{size.lower()}', checkpoint=...)")
    if dropout is not None:
        cfg = cfg.replace(dropout=dropout)
    if kind == "mae":
        recipe = (state or {}).get("recipe") or {}
        decoder = DECODER if dropout is None else DECODER.replace(dropout=dropout)
        model = MMLiT(cfg, decoder, mask_ratio=recipe.get("mask_ratio", 0.75), alpha=recipe.get("mae_alpha", 0.1),
                      beta=recipe.get("mae_beta", 0.5), backend=backend)
    else:
        ck_classes = state.get("num_classes") if state is not None and state.get("task") != "pretrain" else None
        if num_classes is None:
            num_classes = ck_classes or DEFAULT_NUM_CLASSES
        model = MLiTClassifier(cfg, num_classes, backend=backend)
    if state is not None:
        _load(model, state, source, kind, num_classes)
    return model


def _load(model: nn.Module, state: dict, path: str, kind: str, num_classes: int | None) -> None:
    from .train.checkpoint import load_encoder

    if kind == "classifier" and (state.get("task") == "pretrain" or state.get("num_classes") != num_classes):
        load_encoder(model, state, path)
        log.info("%s: loaded the encoder; the %d-class head starts fresh", path, num_classes)
        return
    model.load_state_dict(state["model"])
    recipe = state.get("recipe") or {}
    if recipe.get("gate_noise") is False:  # trained with noise-free gating: keep it so
        for layer in model.modules():
            if hasattr(layer, "noisy_gating"):
                layer.noisy_gating = False


def model_name(model_config: dict | TransformerConfig, task: str | None) -> str:
    """The registry name of a run's model: ``mmlit_<size>`` for pre-training, else ``mlit_<size>``."""
    cfg_name = model_config.name if isinstance(model_config, TransformerConfig) else model_config.get("name", "?")
    return f"{'mmlit' if task == 'pretrain' else 'mlit'}_{str(cfg_name).lower()}"
