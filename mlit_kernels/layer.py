"""SharedSwiGLUMoE: the paper's MoE layer as one nn.Module with a choice of backend."""

from __future__ import annotations

import math
import os
import warnings
from typing import Sequence

import torch
import torch.nn as nn

from . import reference, selfcheck
from .common.settings import AUX_LOSS_WEIGHT, DEFAULT_SHARED, NOISE_EPS
from .common.clearance import BACKENDS, uses_triton
from .common.precision import COMPUTE_DTYPES, compute_dtype
from .variants import FAMILIES, resolve_variant

PROJECTIONS = ("w1", "v", "w2")
TRITON_SHARED = (DEFAULT_SHARED, ())  # the sharings the Triton backend runs (() on the dispatch variant)
BACKEND_ENV = "MLIT_MOE_BACKEND"  # "reference" or "triton": forces every layer's backend
FORCED_BACKENDS = ("reference", "triton")


def forced_backend() -> str | None:
    """The backend the environment variable MLIT_MOE_BACKEND forces on every layer, or None."""
    value = os.environ.get(BACKEND_ENV, "")
    if value and value not in FORCED_BACKENDS:
        raise ValueError(f"{BACKEND_ENV} must be one of {FORCED_BACKENDS} or unset, got {value!r}")
    return value or None


class SharedSwiGLUMoE(nn.Module):
    """Noisy top-k gated Mixture of SwiGLU experts whose V and W_2 (and biases) are shared.

    Args:
        dim: token width m (timm: ``in_features``).
        hidden_dim: expert hidden width d_h (timm: ``hidden_features``).
        num_experts: t.
        k: experts per token, 1 ≤ k ≤ t.
        dropout: dropout probability on the layer output (timm: ``drop``; default 0.1; one mask
            per token, applied after the combine: equal in expectation to one mask per expert).
        shared: which of "w1", "v", "w2" all experts share (Table 9 ablation); default ("v", "w2") (``settings.DEFAULT_SHARED``).
        noisy_gating: add the gate noise in training (default, Eq. 3); False gates without noise
            and counts tokens per expert for the load (no gradient), as the cited implementation's
            switch of the same name.
        noise_eps: added to softplus(x W_noise), the noise scale (1e-2, as the cited implementation).
        w_importance, w_load: weights of the two balancing losses (1e-2 each).
        squared_cv: use the squared coefficient of variation (default, as the cited
            implementation) or the plain CV (the paper's wording).
        unbiased_cv: variance divided by t − 1 (default, torch's ``var``) or by t.
        backend: "reference" (plain PyTorch, :func:`mlit_kernels.reference.moe_reference`),
            "triton" (:func:`mlit_kernels.moe_triton`; sharing ("v", "w2") or () — separate experts
            run the dispatch variant; CUDA tensors, or any device under TRITON_INTERPRET=1) or
            "auto" (Triton for CUDA tensors of a supported dtype with one of those sharings once the
            variant's kernels are cleared on the GPU present — ``mlit doctor --clear`` checks them
            in child processes, :mod:`mlit_kernels.common.clearance`; the reference otherwise, with
            one warning naming that command). On CUDA the first Triton call of each configuration is checked
            against the reference (:func:`mlit_kernels.selfcheck.triton_passes`): a kernel that
            fails to compile or disagrees makes the layer fall back to the reference with one
            warning naming the cause. The environment variable ``MLIT_MOE_BACKEND=reference|triton``
            forces a backend on every layer (``triton``: no check, no fallback).
        triton_variant: "auto" (dense up to 8 experts, dispatch above), "dense" (the fused
            kernels: every expert a token tile routes to, masked by the gates) or "dispatch"
            (tokens grouped by expert); :attr:`resolved_variant` tells which runs.
        return_aux: True (default): ``forward`` returns ``(y, aux_loss)``. False: it returns ``y``
            and adds the auxiliary loss to :attr:`aux_loss`, which
            :func:`mlit_kernels.collect_aux_loss` sums over a model and resets — so the layer can
            stand where timm-style code expects an MLP returning a tensor.
        in_features, hidden_features, out_features, act_layer, norm_layer, bias, drop: timm's
            ``mlp_layer`` keywords. ``out_features`` must be None or ``in_features``;
            ``norm_layer`` None; ``bias`` True (the experts have biases); ``act_layer`` is
            accepted and not used — the experts are SwiGLU (silu), so another activation warns.
        device, dtype: where and of which floating dtype the parameters are created (torch.nn's
            factory keywords; ``device="meta"`` allocates nothing).

    Parameters (the state_dict every backend shares): w_gate, w_noise (m, t); w1 (t, m, d_h) and
    b1 (t, d_h); v (m, d_h) and b_v (d_h,); w2 (d_h, m) and b2 (m,). A projection that is not
    shared gets a leading expert dimension t.

    forward(x (..., m), noise=None (N, t) with N = x.numel() // m, seed=None, norm=None) → (y (..., m),
    aux_loss ()), or y alone with ``return_aux=False``. ``seed``: the (1,) int64 device tensor the
    Triton kernels draw the gate noise and dropout from (drawn per call with ``torch.randint`` when
    None; a model can draw all its layers' seeds in one launch); the reference path uses torch's RNG.
    ``norm``: an ``nn.LayerNorm(dim)`` (with weight and bias) the layer applies to x first, y =
    MoE(norm(x)) — the pre-norm of a transformer block, owned by the caller (its parameters stay
    where they are in the state_dict); the dense Triton kernels fold it in (no launch of its own,
    its gradients computed with the layer's), the other paths run it first. ``residual=True``:
    the layer returns x + y (the block's residual add; in the dense kernels' store with ``norm``).
    ``need_aux=False``: aux_loss is None (and nothing is kept with ``return_aux=False``); in
    evaluation the dense kernels then skip the launch that computes it.
    """

    def __init__(
        self,
        dim: int | None = None,
        hidden_dim: int | None = None,
        num_experts: int | None = None,
        k: int = 2,
        dropout: float | None = None,
        shared: Sequence[str] = DEFAULT_SHARED,
        noisy_gating: bool = True,
        noise_eps: float = NOISE_EPS,
        w_importance: float = AUX_LOSS_WEIGHT,
        w_load: float = AUX_LOSS_WEIGHT,
        squared_cv: bool = True,
        unbiased_cv: bool = True,
        backend: str = "reference",
        triton_variant: str = "auto",
        *,
        return_aux: bool = True,
        in_features: int | None = None,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer=None,
        norm_layer=None,
        bias: bool = True,
        drop: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        dim = _one_of("dim", dim, "in_features", in_features)
        hidden_dim = _one_of("hidden_dim", hidden_dim, "hidden_features", hidden_features)
        dropout = _one_of("dropout", dropout, "drop", drop, default=0.1)
        for name, value in (("dim", dim), ("hidden_dim", hidden_dim), ("num_experts", num_experts)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if out_features is not None and out_features != dim:
            raise ValueError(f"out_features must be None or equal to in_features={dim}, got {out_features!r}")
        if norm_layer is not None:
            raise ValueError(f"norm_layer must be None (the MoE layer has no inner norm), got {norm_layer!r}")
        if bias is not True:
            raise ValueError(f"bias must be True (the SwiGLU experts have biases), got {bias!r}")
        if act_layer is not None and not _is_silu(act_layer):
            warnings.warn(f"SharedSwiGLUMoE: act_layer={getattr(act_layer, '__name__', act_layer)!r} is not used: the "
                          "experts are SwiGLU (silu gates)", stacklevel=2)
        if not isinstance(k, int) or not 1 <= k <= num_experts:
            raise ValueError(f"k must be an int with 1 <= k <= num_experts={num_experts}, got k={k!r}")
        unknown = set(shared) - set(PROJECTIONS)
        if unknown:
            raise ValueError(f"shared must name projections among {PROJECTIONS}, got {tuple(shared)!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if dtype is not None and not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
        self.dim, self.hidden_dim, self.num_experts, self.k = dim, hidden_dim, num_experts, k
        self.shared = tuple(p for p in PROJECTIONS if p in shared)
        self.noisy_gating, self.noise_eps = noisy_gating, noise_eps
        self.w_importance, self.w_load = w_importance, w_load
        self.squared_cv, self.unbiased_cv = squared_cv, unbiased_cv
        self.dropout = nn.Dropout(dropout)
        self.backend = backend
        self.triton_variant = triton_variant
        self.return_aux = return_aux
        self.aux_loss: torch.Tensor | None = None

        factory = dict(device=device, dtype=dtype)
        t = num_experts
        self.w_gate = nn.Parameter(torch.empty(dim, t, **factory))
        self.w_noise = nn.Parameter(torch.empty(dim, t, **factory))
        self.w1, self.b1 = self._projection("w1", dim, hidden_dim, factory)
        self.v, self.b_v = self._projection("v", dim, hidden_dim, factory)
        self.w2, self.b2 = self._projection("w2", hidden_dim, dim, factory)
        self.reset_parameters()

    def _projection(self, name: str, fan_in: int, fan_out: int, factory: dict) -> tuple[nn.Parameter, nn.Parameter]:
        lead = () if name in self.shared else (self.num_experts,)
        return (nn.Parameter(torch.empty(*lead, fan_in, fan_out, **factory)),
                nn.Parameter(torch.empty(*lead, fan_out, **factory)))

    def reset_parameters(self) -> None:
        """nn.Linear's default init (uniform ±1/sqrt(fan_in)) for W_i, V, W_2 and their biases;
        W_g and W_noise start at zero, as in the cited implementation."""
        nn.init.zeros_(self.w_gate)
        nn.init.zeros_(self.w_noise)
        for weight, bias in ((self.w1, self.b1), (self.v, self.b_v), (self.w2, self.b2)):
            bound = 1.0 / math.sqrt(weight.shape[-2])
            nn.init.uniform_(weight, -bound, bound)
            nn.init.uniform_(bias, -bound, bound)

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {value!r}")
        if value == "triton" and self.shared not in TRITON_SHARED:
            raise ValueError(
                f"backend='triton' supports only shared={DEFAULT_SHARED} (shared V and W2, one W_i per expert) or "
                f"shared=() (separate experts), got shared={self.shared}; use backend='reference'")
        self._backend = value

    @property
    def triton_variant(self) -> str:
        return self._triton_variant

    @triton_variant.setter
    def triton_variant(self, value: str) -> None:
        try:
            resolve_variant(value, self.num_experts, per_expert=self.shared == ())
        except ValueError as err:
            raise ValueError(f"triton_variant: {err}") from None
        self._triton_variant = value

    @property
    def resolved_variant(self) -> str:
        """The Triton variant ("dense" or "dispatch") this layer runs with backend="triton" on the
        device its weights are on."""
        return resolve_variant(self.triton_variant, self.num_experts, per_expert=self.shared == (),
                               device=self.w1.device)

    def uses_triton(self, x: torch.Tensor) -> bool:
        """Whether a call on x runs the Triton kernels: MLIT_MOE_BACKEND, else the backend (with
        "auto": sharing and dtype the kernels take, and the variant cleared on this GPU:
        :func:`mlit_kernels.common.clearance.uses_triton`), and the first-use check of this
        configuration (run here when due)."""
        forced = forced_backend()
        if forced == "triton":
            if self.shared not in TRITON_SHARED:
                raise ValueError(f"{BACKEND_ENV}=triton, but the Triton kernels support only shared={DEFAULT_SHARED} "
                                 f"or shared=(), and this layer has shared={self.shared}")
            return True
        if forced == "reference" or self.backend == "reference":
            return False
        if self.backend == "auto" and not (self.shared in TRITON_SHARED and compute_dtype(x) in COMPUTE_DTYPES
                                           and uses_triton(FAMILIES[self.resolved_variant], "auto", x.device)):
            return False
        return selfcheck.triton_passes(self, x.reshape(-1, self.dim))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, hidden_dim={self.hidden_dim}, num_experts={self.num_experts}, k={self.k}, "
            f"shared={self.shared}, backend={self.backend!r}"
        )

    def _check_input(self, x: torch.Tensor, noise: torch.Tensor | None) -> None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (..., {self.dim}), got {tuple(x.shape)}")
        if noise is not None:
            n_tokens = x.numel() // self.dim
            if noise.shape != (n_tokens, self.num_experts):
                raise ValueError(f"noise must have shape ({n_tokens}, {self.num_experts}), got {tuple(noise.shape)}")
            if not noise.is_floating_point():
                raise TypeError(f"noise must be a floating-point tensor, got {noise.dtype}")

    def _check_norm(self, norm) -> None:
        if not (isinstance(norm, nn.LayerNorm) and tuple(norm.normalized_shape) == (self.dim,)
                and norm.weight is not None and norm.bias is not None):
            raise ValueError(f"norm must be None or an nn.LayerNorm({self.dim}) with weight and bias, got {norm!r}")

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None, seed: torch.Tensor | None = None,
                norm: nn.LayerNorm | None = None, residual: bool = False, need_aux: bool = True):
        self._check_input(x, noise)
        if norm is not None:
            self._check_norm(norm)
        tokens = x.reshape(-1, self.dim)
        options = dict(noise=noise, noisy_gating=self.noisy_gating, noise_eps=self.noise_eps, dropout=self.dropout.p,
                       w_importance=self.w_importance, w_load=self.w_load, squared_cv=self.squared_cv,
                       unbiased_cv=self.unbiased_cv, norm=None if norm is None else (norm.weight, norm.bias, norm.eps),
                       residual=residual)
        params = (self.w_gate, self.w_noise, self.w1, self.b1, self.v, self.b_v, self.w2, self.b2)
        if self.uses_triton(tokens):
            from .functional import moe_triton  # lazily: Triton fixes interpret-or-compile when kernels are defined

            y, aux_loss = moe_triton(tokens, *params, self.k, self.training, seed=seed, variant=self.triton_variant,
                                     need_aux=need_aux, **options)
        else:
            y, aux_loss = reference.moe_reference(tokens, *params, self.k, self.training, **options)
            aux_loss = aux_loss if need_aux else None
        y = y.reshape(x.shape)
        if self.return_aux:
            return y, aux_loss
        if aux_loss is not None:
            self.aux_loss = aux_loss if self.aux_loss is None else self.aux_loss + aux_loss
        return y


def collect_aux_loss(model: nn.Module) -> torch.Tensor:
    """The sum of the auxiliary losses the ``return_aux=False`` MoE layers of ``model`` kept since
    the last call (a 0-d tensor; zero when none ran), and reset them."""
    total = None
    for module in model.modules():
        if isinstance(module, SharedSwiGLUMoE) and module.aux_loss is not None:
            total = module.aux_loss if total is None else total + module.aux_loss
            module.aux_loss = None
    if total is None:
        param = next(model.parameters(), None)
        return torch.zeros((), device=param.device if param is not None else None)
    return total


def _one_of(name: str, value, alias: str, alias_value, default=None):
    """A value given under its own name or its timm alias (not both, unless equal)."""
    if value is not None and alias_value is not None and value != alias_value:
        raise ValueError(f"{name}={value!r} and {alias}={alias_value!r} disagree; give one of them")
    chosen = value if value is not None else alias_value
    return default if chosen is None else chosen


def _is_silu(act_layer) -> bool:
    return act_layer in (nn.SiLU, torch.nn.functional.silu) or isinstance(act_layer, nn.SiLU)
