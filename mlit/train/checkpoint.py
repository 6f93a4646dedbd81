"""Checkpoints: atomic writes, RNG states, compatibility checks, safetensors export.

Loading is safe: ``checkpoint.pt`` is read with ``torch.load(weights_only=True)``, which builds
tensors and plain containers only and never runs code a file carries. A checkpoint therefore
holds only tensors, ints, floats, bools, str, None and lists / tuples / dicts of those: the
numpy and python RNG states are converted to tensors and lists when saved. ``model.safetensors``
holds tensors and JSON metadata only.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..atomic import atomic_write

CHECKPOINT_NAME = "checkpoint.pt"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 2  # 2: RNG states as tensors / lists (loadable with weights_only=True)

__all__ = ["CHECKPOINT_NAME", "WEIGHTS_NAME", "CheckpointError", "atomic_write", "check_compatible", "describe",
           "load_checkpoint", "load_encoder", "resolve_checkpoint", "rng_state", "same_config", "save_checkpoint",
           "save_safetensors", "set_rng_state"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or does not fit the model asked for."""


def rng_state() -> dict[str, Any]:
    """The python, numpy, torch (and current CUDA device's) RNG states as tensors and lists."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": [version, list(internal), gauss],
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)), "pos": int(np_state["state"]["pos"]),
                  "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # the current device's
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (also the numpy-tuple form of format version 1)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    if isinstance(np_state, dict):
        np.random.set_state({"bit_generator": "MT19937",
                             "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
                             "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]})
    else:
        np.random.set_state(np_state)
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


def _version1_numpy_globals() -> list:
    """What format-1 checkpoints pickled besides tensors: numpy's RNG state (a uint32 array)."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


# Allowed for the duration of one load only (never registered globally).
_VERSION1_NUMPY_GLOBALS = _version1_numpy_globals()


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
        with torch.serialization.safe_globals(_VERSION1_NUMPY_GLOBALS):
            state = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"cannot read checkpoint {p}: {e} (checkpoints are read with torch.load("
                              f"weights_only=True): tensors and plain Python values only)") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{p} is not an mlit checkpoint (no 'model' entry)")
    return state


def describe(task: str | None, model_config: dict | None, num_classes: int | None) -> str:
    cfg = model_config or {}
    keys = ("name", "embed_dim", "depth", "hidden_first", "hidden_last", "num_heads", "num_groups",
            "experts_per_stage", "shared")
    body = ", ".join(f"{k}={cfg.get(k)}" for k in keys if k in cfg)
    return f"task={task}, model {cfg.get('name', '?')} ({body}), num_classes={num_classes}"


def same_config(a: dict, b: dict) -> bool:
    """Compare the shape-defining fields (dropout may differ)."""
    keys = set(a) | set(b)
    keys.discard("dropout")
    norm = lambda v: list(v) if isinstance(v, tuple) else v
    return all(norm(a.get(k)) == norm(b.get(k)) for k in keys)


def check_compatible(state: dict[str, Any], task: str, model_config: dict, num_classes: int | None, path: str = "") -> None:
    """Raise CheckpointError naming both configurations when a checkpoint is for another model."""
    ck_task, ck_cfg, ck_classes = state.get("task"), state.get("model_config") or {}, state.get("num_classes")
    same_kind = (ck_task == "pretrain") == (task == "pretrain")
    if not same_kind or not same_config(ck_cfg, model_config) or (task != "pretrain" and ck_classes != num_classes):
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
    if not same_config(ck_cfg, own_cfg):
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
