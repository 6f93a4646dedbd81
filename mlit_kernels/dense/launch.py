"""The dense variant's launch code: shapes to tiles, the tuned configuration, the buffers, and the
layer's forward (two launches) and backward (three launches) over :mod:`mlit_kernels.dense.kernels`,
optionally with the LayerNorm before the layer folded in (``norm``: no launch of its own)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from ..common.options import MoEOptions
from ..common.precision import dot_precision
from ..common.settings import BLOCK_T, MAX_SPLITS, MIN_SPLIT_ROWS, SUM_ROWS, WGRAD_ROWS, WGRAD_WARPS, gate_flags
from ..common.split_sum import split_sum
from ..common.tiling import hidden_chunk, width_chunks
from ..common.tuning import LaunchTuner
from .kernels import (_fused_aux_kernel, _fused_bwd_tokens_kernel, _fused_bwd_weights_kernel,
                      _fused_fwd_kernel)

AUX_BLOCK_P = 64  # partial sums the aux kernel adds per step


@dataclass(frozen=True)
class Config:
    """Launch configuration of the per-token kernels: BLOCK_N tokens per program, warps."""

    block_n: int
    num_warps: int


# Candidates for CUDA autotuning (keyed by m, d_h, t, k, dtype); the first is the default. Every
# BLOCK_N is a multiple of SUM_ROWS, so the forward's partial sums never straddle two programs.
# No 64-token tile: its products (64 × 16-column d_h chunks) compile to wgmma 16 wide beside other
# tensor-core dots on sm_90, which Triton 3.6–3.7 miscompile (bench/sm90_audit.py, tests/checks/test_sm90_rule.py).
# The default spills least on sm_90 (bench/results/sm90-audit.md): at 16 tokens and 8 warps no token
# kernel spills with Triton 3.6 (the GPU machines'), at most 24 B with 3.9; at 32 tokens the
# backward's spilled 152 / 272 B at mLiT-XXS, at 32 tokens and 4 warps 1.2 KB (dropped).
CONFIGS = (Config(16, 8), Config(32, 8), Config(16, 4))
TUNER: LaunchTuner[Config] = LaunchTuner("mlit_kernels.dense", CONFIGS)
force_config = TUNER.force  # ``with force_config(Config(32, 8)):`` runs the dense kernels with that configuration


@dataclass(frozen=True)
class Geometry:
    """What the launchers derive from the shape (chunks, d_h chunk, partial-sum groups, splits)
    and the tuned configuration (block_n, num_warps: the token tiles only)."""

    n: int
    m: int
    d_h: int
    t: int
    block_n: int
    num_warps: int
    norm: bool = False  # a LayerNorm folded in: its weight and bias gradients join the flat gradient

    @property
    def chunks(self) -> tuple[int, int, int, int]:
        return width_chunks(self.m)

    @property
    def dc(self) -> int:
        return hidden_chunk(self.d_h, largest=16)

    @property
    def tiles(self) -> int:
        return triton.cdiv(self.n, self.block_n)

    @property
    def groups(self) -> int:
        """Partial sums of importance and load: one per SUM_ROWS tokens (at least one)."""
        return max(1, triton.cdiv(self.n, SUM_ROWS))

    @property
    def splits(self) -> int:
        return max(1, min(MAX_SPLITS, triton.cdiv(self.n, MIN_SPLIT_ROWS)))

    @property
    def rows_per_split(self) -> int:
        return triton.cdiv(triton.cdiv(self.n, self.splits), WGRAD_ROWS) * WGRAD_ROWS

    @property
    def grad_numel(self) -> int:
        return sum(torch.Size(shape).numel() for shape in grad_shapes(self.m, self.d_h, self.t, self.norm))

    def width_constexprs(self) -> dict:
        m0, m1, m2, m3 = self.chunks
        return dict(M0=m0, M1=m1, M2=m2, M3=m3, DC=self.dc, BLOCK_T=BLOCK_T)

    def token_constexprs(self) -> dict:
        """The per-token kernels' tile constexprs (the tuned BLOCK_N)."""
        return dict(self.width_constexprs(), BLOCK_N=self.block_n)

    def weight_constexprs(self) -> dict:
        """The weight-gradient kernel's (ROWS fixed: its sums do not depend on the tuning)."""
        return dict(self.width_constexprs(), ROWS=WGRAD_ROWS, SUM_ROWS=SUM_ROWS, NCH=sum(c > 0 for c in self.chunks))

    @property
    def weight_grid(self) -> tuple[int, int]:
        nd = triton.cdiv(self.d_h, self.dc)
        nch = sum(c > 0 for c in self.chunks)
        return (self.t + 1 + nch) * nd + nch * (1 + self.norm), self.splits


def grad_shapes(m: int, d_h: int, t: int, norm: bool = False) -> tuple[tuple[int, ...], ...]:
    """The layout of the flat weight gradient (``_fused_bwd_weights_kernel`` writes it in this
    order): dW_g, dW_noise (m, t), dW_1 (t, m, d_h), db_1 (t, d_h), dV (m, d_h), db_V (d_h,),
    dW_2 (d_h, m), db_2 (m,); with ``norm`` then the LayerNorm's dweight, dbias (m,)."""
    return (m, t), (m, t), (t, m, d_h), (t, d_h), (m, d_h), (d_h,), (d_h, m), (m,), *(((m,), (m,)) if norm else ())


def split_grads(flat: torch.Tensor, m: int, d_h: int, t: int, norm: bool = False) -> list[torch.Tensor]:
    """Views of :func:`fused_backward`'s flat gradient buffer, in :func:`grad_shapes`' order."""
    shapes = grad_shapes(m, d_h, t, norm)
    return [part.view(shape) for part, shape in zip(flat.split([torch.Size(s).numel() for s in shapes]), shapes)]


def _geometry(kind: str, x: torch.Tensor, m: int, d_h: int, t: int, options: MoEOptions, launch,
              norm: bool = False) -> Geometry:
    """The geometry for ``kind`` ("fwd" / "bwd") at this shape, with :data:`TUNER`'s configuration
    (timed with ``launch(geometry)`` when it tunes)."""
    n = x.shape[0]

    def geometry(config: Config) -> Geometry:
        return Geometry(n, m, d_h, t, config.block_n, config.num_warps, norm)

    key = (kind, m, d_h, t, options.k, options.dtype, norm)
    return geometry(TUNER.choose(key, x.device, lambda config: launch(geometry(config))))


def _gate_constexprs(options: MoEOptions, noise, t: int) -> dict:
    flags = gate_flags(options.training, options.noisy, noise is not None, options.k, t)
    return dict(flags, DROPOUT=bool(options.training and options.dropout > 0))


def _norm_args(norm, fallback: torch.Tensor) -> tuple:
    """(ln_w, ln_b, ln_eps, NORM) kernel arguments of ``norm`` = (weight (m,), bias (m,), eps) or None
    (then ``fallback`` stands in for the pointers the kernels do not read)."""
    if norm is None:
        return fallback, fallback, 0.0, False
    weight, bias, eps = norm
    return weight, bias, float(eps), True


def fused_forward(x, w_gate, w_noise, w1, b1, v, b_v, w2, b2, seed, noise, options: MoEOptions, norm=None,
                  residual: bool = False):
    """The layer's forward in two launches (one in evaluation without ``options.need_aux``: aux_loss and
    stats then stay unset).

    x (N, m) any float dtype; weights in any float dtype (converted in registers); seed (1,)
    int64 on x's device (Philox key of the gate noise and the dropout); noise (N, t) fp32 or None;
    ``options.dtype`` the compute dtype of the expert products; ``norm`` None, or (weight (m,),
    bias (m,), eps) of a LayerNorm applied to x first (in the kernel, fp32, its output rounded to
    x's dtype as nn.LayerNorm's); ``residual``: y = x + the layer's output (the pre-norm block's
    residual add, in the store). Returns y (N, m) in x's dtype, aux_loss () fp32, topk_idx (N, k)
    int32, stats (2, t) fp32 (importance, load), keep (N, m) uint8 (the dropout keep mask; (0,)
    without dropout) and ln_stats (2, N) fp32 (the norm's mean and rstd per token; (0,) without)."""
    n, m = x.shape
    t, _, d_h = w1.shape
    dev = x.device
    flags = _gate_constexprs(options, noise, t)
    ln_stats = torch.empty((2, n) if norm is not None else (0,), device=dev, dtype=torch.float32)
    ln_w, ln_b, ln_eps, has_norm = _norm_args(norm, ln_stats)
    y = torch.empty_like(x)
    idx = torch.empty(n, options.k, device=dev, dtype=torch.int32)
    keep = torch.empty((n, m) if flags["DROPOUT"] else (0,), device=dev, dtype=torch.uint8)
    stats = torch.empty(2, t, device=dev, dtype=torch.float32)
    aux = torch.empty((), device=dev, dtype=torch.float32)
    noise_arg = noise if noise is not None else stats
    part = torch.empty(max(1, triton.cdiv(n, SUM_ROWS)), 2, t, device=dev, dtype=torch.float32)
    scalars = dict(K=options.k, SUM_ROWS=SUM_ROWS, **dot_precision(options.dtype), **flags)

    def launch(geo: Geometry):
        _fused_fwd_kernel[(geo.tiles,)](
            x, w_gate, w_noise, w1, b1, v, b_v, w2, b2, noise_arg, seed, y, idx, part, keep, ln_w, ln_b,
            ln_stats if has_norm else stats, n, m, d_h, t, float(options.noise_eps), float(options.dropout), ln_eps,
            NORM=has_norm, RESIDUAL=bool(residual), **scalars, **geo.token_constexprs(), num_warps=geo.num_warps)

    geo = _geometry("fwd", x, m, d_h, t, options, launch, has_norm)
    if n:
        launch(geo)
    else:
        part.zero_()
    if not (options.need_aux or options.training):
        return y, aux, idx, stats, keep, ln_stats  # evaluation without the auxiliary loss: aux, stats unset
    _fused_aux_kernel[(1,)](part, stats, aux, geo.groups, t, float(options.w_importance), float(options.w_load),
                            SQUARED=bool(options.squared_cv), UNBIASED=bool(options.unbiased_cv),
                            BLOCK_P=AUX_BLOCK_P, BLOCK_T=BLOCK_T)
    return y, aux, idx, stats, keep, ln_stats


def fused_backward(dy, d_aux, x, w_gate, w_noise, w1, b1, v, b_v, w2, seed, noise, idx, stats, keep,
                   options: MoEOptions, norm=None, ln_stats=None, residual: bool = False):
    """Gradients of :func:`fused_forward` in three launches: dx (x's dtype) and one flat buffer in
    the parameters' dtype holding dW_g, dW_noise, dW_1, db_1, dV, db_V, dW_2, db_2 (+ the norm's
    dweight, dbias with ``norm``; see :func:`split_grads`).

    dy (N, m) any float dtype; d_aux () fp32; the rest (``norm``, ``ln_stats``, ``residual``
    included) as given to and saved by the forward (with ``residual`` dx includes dy)."""
    n, m = x.shape
    t, _, d_h = w1.shape
    dev = x.device
    flags = _gate_constexprs(options, noise, t)
    ln_w, ln_b, _, has_norm = _norm_args(norm, stats)
    ln_stats = ln_stats if has_norm else stats
    ln_part = torch.empty((max(1, triton.cdiv(n, SUM_ROWS)), 2, m) if has_norm else (0,), device=dev,
                          dtype=torch.float32)
    ln_part_arg = ln_part if has_norm else stats
    dtype = options.dtype
    dx = torch.empty_like(x)
    da = torch.empty(n, options.k, d_h, device=dev, dtype=dtype)
    du = torch.empty(n, d_h, device=dev, dtype=dtype)
    h = torch.empty(n, d_h, device=dev, dtype=dtype)
    dgate = torch.empty(n, 2, t, device=dev, dtype=torch.float32)
    noise_arg = noise if noise is not None else stats
    keep_arg = keep if keep.numel() else stats
    scalars = dict(K=options.k, **dot_precision(dtype))

    def launch_tokens(geo: Geometry):
        _fused_bwd_tokens_kernel[(geo.tiles,)](
            dy, d_aux, x, w_gate, w_noise, w1, b1, v, b_v, w2, noise_arg, seed, idx, stats, keep_arg, ln_w, ln_b,
            ln_stats, dx, da, du, h, dgate, ln_part_arg, n, m, d_h, t, float(options.noise_eps), float(options.dropout),
            float(options.w_importance), float(options.w_load), SQUARED=bool(options.squared_cv),
            UNBIASED=bool(options.unbiased_cv), NORM=has_norm, RESIDUAL=bool(residual), SUM_ROWS=SUM_ROWS, **scalars,
            **flags, **geo.token_constexprs(), num_warps=geo.num_warps)

    geo = _geometry("bwd", x, m, d_h, t, options, launch_tokens, has_norm)
    grads = torch.empty(geo.grad_numel, device=dev, dtype=w1.dtype)
    if n:
        launch_tokens(geo)
        part = torch.empty(geo.splits, geo.grad_numel, device=dev, dtype=torch.float32)
        _fused_bwd_weights_kernel[geo.weight_grid](
            x, dy, keep_arg, idx, da, du, h, dgate, ln_w, ln_b, ln_stats, ln_part_arg, part, n, m, d_h, t,
            float(options.dropout), geo.rows_per_split, geo.grad_numel, NOISY=flags["NOISY"], DROPOUT=flags["DROPOUT"],
            NORM=has_norm, **scalars, **geo.weight_constexprs(), num_warps=WGRAD_WARPS)
        split_sum(part, grads)
    else:
        grads.zero_()
    return dx, grads


__all__ = ["fused_forward", "fused_backward", "split_grads", "grad_shapes", "force_config", "Config", "CONFIGS",
           "TUNER", "Geometry"]
