"""AdamW parameter groups (layer-wise lr decay, no-decay set) and the warm-up + cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn


def _strip(name: str) -> str:
    """Drop DDP / torch.compile prefixes."""
    for prefix in ("module.", "_orig_mod."):
        while name.startswith(prefix):
            name = name[len(prefix):]
    return name


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while isinstance(getattr(model, "module", None), nn.Module) or isinstance(getattr(model, "_orig_mod", None), nn.Module):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def no_weight_decay(model: nn.Module) -> set[str]:
    """Names of the parameters that get no weight decay: the model's own ``no_weight_decay()``
    (timm's convention: biases, norms, position tables, the mask token for the mLiT models), or,
    for a model without that method, every parameter with at most one dimension."""
    inner = _unwrap(model)
    if hasattr(inner, "no_weight_decay"):
        return set(inner.no_weight_decay())
    return {_strip(n) for n, p in inner.named_parameters() if p.ndim <= 1}


def layer_id(name: str, num_layers: int) -> int:
    """BEiT/MAE layer id: embeddings 0, encoder layer j (1-based) j, everything else num_layers + 1."""
    name = _strip(name)
    if name.startswith(("encoder.patch_embed", "encoder.pos_embed")):
        return 0
    prefix = "encoder.blocks.layers."
    if name.startswith(prefix):
        return int(name[len(prefix):].split(".", 1)[0]) + 1
    return num_layers + 1


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """AdamW groups keyed by (lr scale, decay or not), each with an ``lr_scale`` entry.

    lr scale = layer_decay ** (L_E + 1 − layer_id): the head (and the final norm, the decoder)
    get 1, encoder layer j gets decay^(L_E + 1 − j), the embeddings decay^(L_E + 1).
    """
    inner = _unwrap(model)
    num_layers = len(inner.encoder.blocks.layers)
    skip = no_weight_decay(inner)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in inner.named_parameters():
        if not p.requires_grad:
            continue
        lid = layer_id(name, num_layers)
        decay = name not in skip
        key = (lid, decay)
        if key not in groups:
            groups[key] = {
                "params": [],
                "names": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": layer_decay ** (num_layers + 1 - lid),
                "layer_id": lid,
            }
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, layer_decay: float = 1.0,
                    betas=(0.9, 0.999), capturable: bool = False) -> torch.optim.AdamW:
    """AdamW over ``param_groups``, fused on CUDA and CPU (one kernel per group; it takes the
    GradScaler's inf check on the device, no host sync); capturable: for a CUDA-graph step."""
    groups = param_groups(model, weight_decay, layer_decay)
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    devices = {p.device.type for g in groups for p in g["params"]}
    fused = devices <= {"cuda", "cpu"}
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay, fused=fused,
                             capturable=capturable)


class WarmupCosine:
    """Per-step schedule: linear warm-up from 0 to the peak lr over ``warmup_steps``, then a cosine
    down to ``min_lr`` at ``total_steps``. Sets every group's lr to (lr × factor) × lr_scale.

    ``step(i)`` sets the lr for optimizer step i (0-based); its state is the last step set.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, peak_lr: float, total_steps: int, warmup_steps: int,
                 min_lr: float = 0.0):
        self.optimizer = optimizer
        self.peak_lr, self.min_lr = peak_lr, min_lr
        self.total_steps, self.warmup_steps = max(1, total_steps), max(0, warmup_steps)
        self.last_step = -1

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr + (self.peak_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def step(self, step: int) -> float:
        lr = self.lr_at(step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        self.last_step = step
        return lr

    def state_dict(self) -> dict:
        return {"peak_lr": self.peak_lr, "min_lr": self.min_lr, "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps, "last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)
