"""Checkpoints: atomic writes, RNG states, compatibility checks, safetensors export."""

from __future__ import annotations

import json
import os
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

CHECKPOINT_NAME = "checkpoint.pt"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or does not fit the model asked for."""


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None]) -> Path:
    """Write via ``write(file_object)`` into a temporary file beside ``path``, fsync, os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # the current device's
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    state = {"format_version": FORMAT_VERSION, **state}
    return atomic_write(path, lambda f: torch.save(state, f))


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A run directory means its checkpoint.pt (else its model.safetensors)."""
    p = Path(path)
    if p.is_dir():
        for name in (CHECKPOINT_NAME, WEIGHTS_NAME):
            if (p / name).is_file():
                return p / name
        raise CheckpointError(f"no {CHECKPOINT_NAME} or {WEIGHTS_NAME} in run directory {p}")
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} does not exist")
    return p


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint.pt (full state) or a model.safetensors (weights + metadata) into a dict
    with at least ``model``, ``task``, ``model_config``, ``num_classes``."""
    p = resolve_checkpoint(path)
    if p.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(p), framework="pt", device=str(map_location)) as f:
                meta = f.metadata() or {}
                weights = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # noqa: BLE001 - report any parse error clearly
            raise CheckpointError(f"cannot read {p}: {e}") from None
        state = {k: json.loads(v) for k, v in meta.items()}
        state["model"] = weights
        state.setdefault("task", None)
        return state
    try:
        state = torch.load(p, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"cannot read checkpoint {p}: {e}") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{p} is not an mlit checkpoint (no 'model' entry)")
    return state


def describe(task: str | None, model_config: dict | None, num_classes: int | None) -> str:
    cfg = model_config or {}
    keys = ("name", "embed_dim", "depth", "hidden_first", "hidden_last", "num_heads", "num_groups",
            "experts_per_stage", "shared")
    body = ", ".join(f"{k}={cfg.get(k)}" for k in keys if k in cfg)
    return f"task={task}, model {cfg.get('name', '?')} ({body}), num_classes={num_classes}"


def _same_config(a: dict, b: dict) -> bool:
    """Compare the shape-defining fields (dropout may differ)."""
    keys = set(a) | set(b)
    keys.discard("dropout")
    norm = lambda v: list(v) if isinstance(v, tuple) else v
    return all(norm(a.get(k)) == norm(b.get(k)) for k in keys)


def check_compatible(state: dict[str, Any], task: str, model_config: dict, num_classes: int | None, path: str = "") -> None:
    """Raise CheckpointError naming both configurations when a checkpoint is for another model."""
    ck_task, ck_cfg, ck_classes = state.get("task"), state.get("model_config") or {}, state.get("num_classes")
    same_kind = (ck_task == "pretrain") == (task == "pretrain")
    if not same_kind or not _same_config(ck_cfg, model_config) or (task != "pretrain" and ck_classes != num_classes):
        raise CheckpointError(
            f"checkpoint {path} does not match this run:\n"
            f"  checkpoint: {describe(ck_task, ck_cfg, ck_classes)}\n"
            f"  this run:   {describe(task, model_config, num_classes)}"
        )


def load_encoder(model: nn.Module, state: dict[str, Any], path: str = "") -> list[str]:
    """Copy the ``encoder.*`` weights of a (pre-training or classification) checkpoint into
    ``model.encoder``; the configurations must agree. Returns the loaded keys."""
    ck_cfg = state.get("model_config") or {}
    import dataclasses

    own_cfg = dataclasses.asdict(model.encoder.cfg)
    if not _same_config(ck_cfg, own_cfg):
        raise CheckpointError(
            f"pre-trained checkpoint {path} has another encoder:\n"
            f"  checkpoint: {describe(state.get('task'), ck_cfg, state.get('num_classes'))}\n"
            f"  this run:   {describe('finetune', own_cfg, getattr(model, 'num_classes', None))}"
        )
    weights = {k[len("encoder."):]: v for k, v in state["model"].items() if k.startswith("encoder.")}
    if not weights:
        raise CheckpointError(f"checkpoint {path} holds no encoder.* weights")
    missing, unexpected = model.encoder.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"encoder weights of {path} do not fit: missing {missing}, unexpected {unexpected}")
    return sorted(weights)


def save_safetensors(model: nn.Module, path: str | os.PathLike, metadata: dict[str, Any]) -> Path:
    """Final weights in safetensors, with task/config metadata (JSON strings)."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    meta = {k: json.dumps(v) for k, v in metadata.items()}
    data = save(tensors, metadata=meta)
    return atomic_write(path, lambda f: f.write(data))
