"""SharedSwiGLUMoE: the paper's MoE layer as one nn.Module with a choice of backend."""

from __future__ import annotations

import logging
import math
from typing import Sequence

import torch
import torch.nn as nn

from . import reference

PROJECTIONS = ("w1", "v", "w2")
BACKENDS = ("reference", "triton", "auto")
TRITON_VARIANTS = ("auto", "dispatch", "dense")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DEFAULT_SHARED = ("v", "w2")

log = logging.getLogger(__name__)


class SharedSwiGLUMoE(nn.Module):
    """Noisy top-k gated Mixture of SwiGLU experts whose V and W_2 (and biases) are shared.

    Args:
        dim: token width m.
        hidden_dim: expert hidden width d_h.
        num_experts: t.
        k: experts per token, 1 ≤ k ≤ t.
        dropout: dropout probability on the layer output (one mask per token, applied after the
            combine; equal in expectation to one mask per expert).
        shared: which of "w1", "v", "w2" all experts share (Table 9 ablation); default ("v", "w2").
        noisy_gating: add the gate noise in training (default, Eq. 3); False gates without noise
            (as the cited implementation's switch of the same name; for deterministic runs).
        noise_eps: added to softplus(x W_noise), the noise scale (1e-2, as the cited implementation).
        w_importance, w_load: weights of the two balancing losses (1e-2 each).
        squared_cv: use the squared coefficient of variation (default, as the cited
            implementation) or the plain CV (the paper's wording).
        unbiased_cv: variance divided by t − 1 (default, torch's ``var``) or by t.
        backend: "reference" (plain PyTorch), "triton" (the fused kernels of
            :mod:`mlit_kernels.functions`; default sharing ("v", "w2") only; CUDA tensors, or any
            device under TRITON_INTERPRET=1) or "auto" (Triton for CUDA tensors of a supported
            dtype with the default sharing, the reference otherwise).
        triton_variant: "auto" (measured once per shape on CUDA; see
            :func:`mlit_kernels.functions.choose_variant`), "dispatch" (tokens grouped by expert)
            or "dense" (every expert's x W_i per token tile, masked by the gates). The variant
            used last is :attr:`resolved_variant`.

    Parameters (the state_dict every backend shares): w_gate, w_noise (m, t); w1 (t, m, d_h) and
    b1 (t, d_h); v (m, d_h) and b_v (d_h,); w2 (d_h, m) and b2 (m,). A projection that is not
    shared gets a leading expert dimension t.

    forward(x (..., m), noise=None (N, t) with N = x.numel() // m) → (y (..., m), aux_loss ()).
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        k: int = 2,
        dropout: float = 0.1,
        shared: Sequence[str] = ("v", "w2"),
        noisy_gating: bool = True,
        noise_eps: float = reference.NOISE_EPS,
        w_importance: float = 1e-2,
        w_load: float = 1e-2,
        squared_cv: bool = True,
        unbiased_cv: bool = True,
        backend: str = "reference",
        triton_variant: str = "auto",
    ):
        super().__init__()
        for name, value in (("dim", dim), ("hidden_dim", hidden_dim), ("num_experts", num_experts)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(k, int) or not 1 <= k <= num_experts:
            raise ValueError(f"k must be an int with 1 <= k <= num_experts={num_experts}, got k={k!r}")
        unknown = set(shared) - set(PROJECTIONS)
        if unknown:
            raise ValueError(f"shared must name projections among {PROJECTIONS}, got {tuple(shared)!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.dim, self.hidden_dim, self.num_experts, self.k = dim, hidden_dim, num_experts, k
        self.shared = tuple(p for p in PROJECTIONS if p in shared)
        self.noisy_gating, self.noise_eps = noisy_gating, noise_eps
        self.w_importance, self.w_load = w_importance, w_load
        self.squared_cv, self.unbiased_cv = squared_cv, unbiased_cv
        self.dropout = nn.Dropout(dropout)
        self.backend = backend
        self.triton_variant = triton_variant
        self._resolved_variant: str | None = None

        t = num_experts
        self.w_gate = nn.Parameter(torch.zeros(dim, t))
        self.w_noise = nn.Parameter(torch.zeros(dim, t))
        self.w1, self.b1 = self._projection("w1", dim, hidden_dim)
        self.v, self.b_v = self._projection("v", dim, hidden_dim)
        self.w2, self.b2 = self._projection("w2", hidden_dim, dim)
        self.reset_parameters()

    def _projection(self, name: str, fan_in: int, fan_out: int) -> tuple[nn.Parameter, nn.Parameter]:
        lead = () if name in self.shared else (self.num_experts,)
        return nn.Parameter(torch.empty(*lead, fan_in, fan_out)), nn.Parameter(torch.empty(*lead, fan_out))

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
        if value == "triton" and self.shared != DEFAULT_SHARED:
            raise ValueError(
                f"backend='triton' supports only shared={DEFAULT_SHARED} (shared V and W2, one W_i per expert), "
                f"got shared={self.shared}; use backend='reference'")
        self._backend = value

    @property
    def triton_variant(self) -> str:
        return self._triton_variant

    @triton_variant.setter
    def triton_variant(self, value: str) -> None:
        if value not in TRITON_VARIANTS:
            raise ValueError(f"triton_variant must be one of {TRITON_VARIANTS}, got {value!r}")
        self._triton_variant = value

    @property
    def resolved_variant(self) -> str | None:
        """The Triton expert variant ("dispatch" or "dense") the last Triton forward used, else None."""
        return self._resolved_variant

    def _use_triton(self, x: torch.Tensor) -> bool:
        if self.backend == "triton":
            return True
        if self.backend == "auto":
            return x.is_cuda and self.shared == DEFAULT_SHARED and x.dtype in TRITON_DTYPES
        return False

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

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_input(x, noise)
        tokens = x.reshape(-1, self.dim)
        if self.training and not self.noisy_gating and noise is None:
            noise = tokens.new_zeros(tokens.shape[0], self.num_experts, dtype=torch.float32)
        if self._use_triton(tokens):
            y, aux_loss = self._forward_triton(tokens, noise)
        else:
            y, aux_loss = self._forward_reference(tokens, noise)
        return self.dropout(y).reshape(x.shape), aux_loss

    def _forward_reference(self, x: torch.Tensor, noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, m) → (y (N, m) before dropout, aux_loss); gate arithmetic in at least float32."""
        gate_dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            gates, _, load = reference.noisy_top_k_gating(
                x.to(gate_dtype),
                self.w_gate.to(gate_dtype),
                self.w_noise.to(gate_dtype),
                self.k,
                self.training,
                noise,
                self.noise_eps,
            )
            aux_loss = reference.auxiliary_loss(
                gates, load, self.w_importance, self.w_load, self.squared_cv, self.unbiased_cv
            )
        y = reference.shared_swiglu_experts(x, gates, self.w1, self.b1, self.v, self.b_v, self.w2, self.b2)
        return y, aux_loss

    def _forward_triton(self, x: torch.Tensor, noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, m) → (y (N, m) before dropout, aux_loss) with the fused Triton kernels.

        Under autocast the expert weights and x are cast to the autocast dtype (differentiably, so
        the fp32 parameters get their gradients); the gate always works in fp32."""
        from .functions import choose_variant, moe_triton  # imported lazily: triton kernels are built on import

        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
        else:
            dtype = x.dtype
        if dtype not in TRITON_DTYPES:
            raise TypeError(f"x has dtype {dtype}; backend='triton' supports {TRITON_DTYPES}")
        variant = self.triton_variant
        if not torch.compiler.is_compiling():
            # Eager: resolve "auto" here (timed once per shape on CUDA) so that resolved_variant
            # shows it. Under torch.compile "auto" goes to the custom op, which resolves it in its
            # first real call (no timing while tracing); resolved_variant is then not updated.
            n = x.shape[0]
            if variant == "auto":
                variant = choose_variant(n, self.dim, self.hidden_dim, self.num_experts, self.k, x.device, dtype)
            if variant != self._resolved_variant:
                log.debug("SharedSwiGLUMoE: triton variant %r (m=%d, d_h=%d, t=%d, k=%d, N=%d)", variant, self.dim,
                          self.hidden_dim, self.num_experts, self.k, n)
            self._resolved_variant = variant
        with torch.autocast(device_type, enabled=False):
            cast = lambda p: p if p.dtype == dtype else p.to(dtype)  # noqa: E731
            return moe_triton(
                cast(x).contiguous(),
                self.w_gate.float(),
                self.w_noise.float(),
                cast(self.w1),
                cast(self.b1),
                cast(self.v),
                cast(self.b_v),
                cast(self.w2),
                cast(self.b2),
                self.k,
                self.training,
                noise=None if noise is None else noise.float().contiguous(),
                noise_eps=self.noise_eps,
                w_importance=self.w_importance,
                w_load=self.w_load,
                squared_cv=self.squared_cv,
                unbiased_cv=self.unbiased_cv,
                variant=variant,
            )
