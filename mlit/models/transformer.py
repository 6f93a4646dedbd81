"""The MoE transformer layer and a stack of them built from a TransformerConfig."""

from __future__ import annotations

import torch
import torch.nn as nn

from mlit_kernels import SharedSwiGLUMoE

from ..config import TransformerConfig
from .amp import autocast_weights
from .attention import GroupedQueryAttention


def biases_and_norms(module: nn.Module) -> set[str]:
    """Names (relative to ``module``) of its bias and normalisation parameters: every nn.Linear
    bias, every LayerNorm parameter, and the MoE layers' b1, b_v, b2 (b1 is (t, d_h) with one W_1
    per expert, so a bias is known by its role, not by ndim). These get no weight decay."""
    names = set()
    for prefix, sub in module.named_modules():
        dot = f"{prefix}." if prefix else ""
        if isinstance(sub, nn.LayerNorm):
            names |= {dot + n for n, _ in sub.named_parameters(recurse=False)}
        elif isinstance(sub, nn.Linear) and sub.bias is not None:
            names.add(dot + "bias")
        elif isinstance(sub, SharedSwiGLUMoE):
            names |= {dot + n for n in ("b1", "b_v", "b2")}
    return names


def set_moe_backend(module: nn.Module, backend: str) -> int:
    """Set ``backend`` on every SharedSwiGLUMoE (and GroupedQueryAttention: its fused half-block)
    inside ``module``; returns how many MoE layers."""
    for attn in (m for m in module.modules() if isinstance(m, GroupedQueryAttention)):
        attn.backend = backend
    layers = [m for m in module.modules() if isinstance(m, SharedSwiGLUMoE)]
    for layer in layers:
        layer.backend = backend
    return len(layers)


class MoETransformerLayer(nn.Module):
    """Pre-norm layer: x = x + GQA(LN(x)); x = x + MoE(LN(x)).

    forward(x (B, n, dim), seed=None, attn_weights=None, need_aux=True) → (x (B, n, dim), the MoE
    auxiliary loss (), None without ``need_aux``); ``seed`` goes to the MoE layer (its Triton
    kernels' Philox seed), ``attn_weights`` to the attention (its projections' autocast copies).
    ``device`` / ``dtype`` (torch.nn's factory keywords) place the norms and the attention; ``moe``
    comes built; ``backend`` is the attention's (its fused half-block ``x + GQA(norm1(x))``:
    :class:`GroupedQueryAttention`).
    """

    def __init__(self, dim: int, num_heads: int, num_groups: int, moe: SharedSwiGLUMoE, backend: str = "reference",
                 *, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, device=device, dtype=dtype)
        self.attn = GroupedQueryAttention(dim, num_heads, num_groups, backend=backend, device=device, dtype=dtype)
        self.norm2 = nn.LayerNorm(dim, device=device, dtype=dtype)
        self.moe = moe

    def forward(self, x: torch.Tensor, seed: torch.Tensor | None = None,
                attn_weights: list[torch.Tensor] | None = None,
                need_aux: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.attn.uses_triton(x):  # the fused half-block x + GQA(norm1(x))
            x = self.attn(x, norm=self.norm1)
        else:  # norm1 outside the attention module, so profiles and meters time it as a norm
            x = x + self.attn(self.norm1(x), attn_weights)
        # x + MoE(norm2(x)): the dense kernels fold norm2 and the residual add in
        return self.moe(x, seed=seed, norm=self.norm2, residual=True, need_aux=need_aux)


class MoETransformer(nn.Module):
    """cfg.depth MoE transformer layers with depth-wise hidden sizes and staged expert counts.

    forward(x (B, n, dim), need_aux=True) → (x (B, n, dim), the auxiliary losses summed over layers
    (), None without ``need_aux``: evaluation skips computing them). Under
    autocast the attention projections of all torch-attention layers are cast once (one launch, one
    for their gradients: :func:`mlit.models.amp.autocast_weights`) instead of per layer; fused
    (Triton) attention casts its weights in registers. ``device`` / ``dtype``: torch.nn's factory
    keywords, for every parameter.
    """

    def __init__(self, cfg: TransformerConfig, backend: str = "reference", *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.layers = nn.ModuleList(
            MoETransformerLayer(
                cfg.embed_dim,
                cfg.num_heads,
                cfg.num_groups,
                SharedSwiGLUMoE(
                    cfg.embed_dim,
                    cfg.hidden_dim(i),
                    cfg.num_experts(i),
                    k=cfg.top_k,
                    dropout=cfg.dropout,
                    shared=cfg.shared,
                    backend=backend,
                    **factory,
                ),
                backend,
                **factory,
            )
            for i in range(cfg.depth)
        )

    def forward(self, x: torch.Tensor, need_aux: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        seeds = self._gate_seeds(x)
        per_layer = [[] if layer.attn.uses_triton(x) else layer.attn.weights() for layer in self.layers]
        cast = autocast_weights([w for ws in per_layer for w in ws], x.device.type)
        aux_losses, start = [], 0
        for i, layer in enumerate(self.layers):
            count = len(per_layer[i])
            weights = None if cast is None or not count else cast[start : start + count]
            start += count
            x, aux_loss = layer(x, None if seeds is None else seeds[i : i + 1], weights, need_aux)
            aux_losses.append(aux_loss)
        return x, (torch.stack(aux_losses).sum() if need_aux else None)

    def _gate_seeds(self, x: torch.Tensor) -> torch.Tensor | None:
        """In training with Triton MoE layers, every layer's Philox seed drawn in one launch
        (torch.randint on the device: reproducible with torch.manual_seed, graph-safe)."""
        if not self.training or not any(layer.moe.uses_triton(x) for layer in self.layers):
            return None
        return torch.randint(0, 2**62, (len(self.layers),), dtype=torch.int64, device=x.device)

    def set_backend(self, backend: str) -> None:
        """Switch every MoE layer to another backend (same parameters)."""
        set_moe_backend(self, backend)

    def no_weight_decay(self) -> set[str]:
        return biases_and_norms(self)
