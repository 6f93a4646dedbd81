"""The fused attention block's launch code: shapes to tiles, the tuned configuration (warps only),
the buffers, and the forward (two launches) and backward (four launches) over
:mod:`mlit_kernels.attention.kernels`.

Tiles are fixed: BLOCK_M query / token rows, BLOCK_N keys, BLOCK_E qkv columns per step, and the
backward's weight-gradient splits (at most MAX_SPLITS programs, each a whole number of BLOCK_M
tiles) follow from the shape alone; the tuned number of warps changes the speed (and, on a GPU, the
register layouts: results agree within the per-dtype tolerance across configurations).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from ..common.precision import dot_precision
from ..common.split_sum import split_sum
from ..common.tiling import next_pow2
from ..common.tuning import LaunchTuner
from .kernels import (_attn_bwd_kernel, _attn_fwd_kernel, _ln_qkv_bwd_kernel,
                      _ln_qkv_fwd_kernel, _proj_bwd_kernel)

BLOCK_M = 32  # query rows of an attention program; token rows of the LayerNorm / projection tiles
BLOCK_N = 32  # keys per step of the attention loops
BLOCK_E = 32  # qkv columns per step of the LayerNorm + qkv kernels
PROJ_ROWS = 16  # token rows per step of dW_proj's sums (its (D, head dim) gradient tile stays in registers)
MAX_SPLITS = 64  # weight-gradient partial sums: the long programs of the backward's split kernels
MAX_DIM = 256  # widths the register tiles hold (D_PAD)
# Software-pipeline stages of the backward's split kernels (_proj_bwd, _ln_qkv_bwd: long programs
# summing weight gradients beside per-token tiles). At Triton's default 3 they spill on sm_90
# (_ln_qkv_bwd: 216 B on Triton 3.6 at 8 warps, 708 B at 4; _proj_bwd: 8 B on 3.9); at 2 neither
# does at 8 warps, and both take 50 KB of shared memory instead of 82 (bench/results/sm90-audit.md).
SPLIT_KERNEL_STAGES = 2
MAX_HEAD_DIM = 64


@dataclass(frozen=True)
class Config:
    """Launch configuration of every kernel of the block: warps per program."""

    num_warps: int


# Candidates for CUDA autotuning (keyed by widths, heads, tokens, dtype); the first is the default.
# 8 warps hold every tile at the paper's widths in registers on sm_90 (4 spill at D = 144).
CONFIGS = (Config(8), Config(4))
TUNER: LaunchTuner[Config] = LaunchTuner("mlit_kernels.attention", CONFIGS)
force_config = TUNER.force  # ``with force_config(Config(4)):`` runs the block's kernels with 4 warps


def weight_splits(rows: int) -> tuple[int, int]:
    """(splits, rows per split) of the weight-gradient sums over ``rows`` token rows: at most
    MAX_SPLITS splits of whole BLOCK_M tiles, from the row count alone."""
    tiles = max(1, triton.cdiv(rows, BLOCK_M))
    rows_per_split = triton.cdiv(tiles, min(MAX_SPLITS, tiles)) * BLOCK_M
    return max(1, triton.cdiv(rows, rows_per_split)), rows_per_split


@dataclass(frozen=True)
class Shape:
    """B sequences of n tokens of width D; H query heads of HD columns in G groups."""

    B: int
    n: int
    D: int
    H: int
    G: int

    @property
    def HD(self) -> int:
        return self.D // self.H

    @property
    def N(self) -> int:
        return self.B * self.n

    @property
    def E(self) -> int:
        """Width of the fused q | k | v projection."""
        return self.D + 2 * self.G * self.HD

    @property
    def pads(self) -> dict:
        return dict(D_PAD=max(16, next_pow2(self.D)), HD_PAD=max(16, next_pow2(self.HD)))

    @property
    def splits(self) -> int:
        return weight_splits(self.N)[0]

    @property
    def rows_per_split(self) -> int:
        return weight_splits(self.N)[1]

    def grad_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Layout of the flat weight gradient: dW_qkv (E, D), db_qkv (E,), dγ (D,), dβ (D,),
        dW_proj (D, D), db_proj (D,)."""
        return (self.E, self.D), (self.E,), (self.D,), (self.D,), (self.D, self.D), (self.D,)

    @property
    def grad_numel(self) -> int:
        return sum(torch.Size(s).numel() for s in self.grad_shapes())


def split_grads(flat: torch.Tensor, shape: Shape) -> list[torch.Tensor]:
    """Views of :func:`block_backward`'s flat gradient, in :meth:`Shape.grad_shapes`' order."""
    shapes = shape.grad_shapes()
    return [p.view(s) for p, s in zip(flat.split([torch.Size(s).numel() for s in shapes]), shapes)]


def _config(kind: str, shape: Shape, dtype: torch.dtype, device: torch.device, launch) -> Config:
    """:data:`TUNER`'s configuration for ``kind`` ("fwd" / "bwd") at this shape (timed with
    ``launch(config)`` when it tunes)."""
    key = (kind, shape.D, shape.H, shape.G, shape.n, dtype)
    return TUNER.choose(key, device, launch)


def block_forward(x, ln_w, ln_b, qkv_w, qkv_b, proj_w, proj_b, num_heads: int, num_groups: int, eps: float,
                  dtype: torch.dtype):
    """y = x + proj(GQA(LN(x))) in two launches.

    x (B, n, D) any float dtype; weights any float dtype (cast in registers); ``dtype`` the compute
    dtype of the products. Returns y (B, n, D) x's dtype and what the backward needs: qkv (N, E),
    o (N, D) in ``dtype``, lse (N, H), mean, rstd (N,) fp32."""
    B, n, D = x.shape
    shape = Shape(B, n, D, num_heads, num_groups)
    dev = x.device
    x2 = x.reshape(shape.N, D)
    y = torch.empty_like(x)
    qkv = torch.empty(shape.N, shape.E, device=dev, dtype=dtype)
    o = torch.empty(shape.N, D, device=dev, dtype=dtype)
    lse = torch.empty(shape.N, num_heads, device=dev, dtype=torch.float32)
    mean = torch.empty(shape.N, device=dev, dtype=torch.float32)
    rstd = torch.empty(shape.N, device=dev, dtype=torch.float32)
    consts = dot_precision(dtype)
    pads = shape.pads

    def launch(config: Config):
        _ln_qkv_fwd_kernel[(triton.cdiv(shape.N, BLOCK_M),)](
            x2, ln_w, ln_b, qkv_w, qkv_b, qkv, mean, rstd, shape.N, D, shape.E, float(eps), D, D_PAD=pads["D_PAD"],
            BLOCK_M=BLOCK_M, BLOCK_E=BLOCK_E, **consts, HAS_BIAS=True, num_warps=config.num_warps)
        _attn_fwd_kernel[(triton.cdiv(n, BLOCK_M), B)](
            qkv, x2, proj_w, proj_b, o, lse, y, n, D, shape.E, num_heads, num_groups, shape.HD,
            1.0 / shape.HD ** 0.5, **pads, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, **consts, num_warps=config.num_warps)

    if shape.N:
        launch(_config("fwd", shape, dtype, dev, launch))
    return y, qkv, o, lse, mean, rstd


def block_backward(dy, x, ln_w, ln_b, qkv_w, proj_w, qkv, o, lse, mean, rstd, num_heads: int, num_groups: int,
                   dtype: torch.dtype):
    """Gradients of :func:`block_forward` in four launches: dx (x's dtype) and one flat buffer in
    the weights' dtype holding dW_qkv, db_qkv, dγ, dβ, dW_proj, db_proj (:func:`split_grads`).

    dy (B, n, D) any float dtype; the rest as :func:`block_forward` took and returned them."""
    B, n, D = x.shape
    shape = Shape(B, n, D, num_heads, num_groups)
    dev = x.device
    x2, dy2 = x.reshape(shape.N, D), dy.reshape(shape.N, D)
    dx = torch.empty_like(x)
    grads = torch.empty(shape.grad_numel, device=dev, dtype=qkv_w.dtype)
    if not shape.N:
        return dx, grads.zero_()
    d_o = torch.empty(shape.N, D, device=dev, dtype=dtype)
    delta = torch.empty(shape.N, num_heads, device=dev, dtype=torch.float32)
    dqkv = torch.empty(shape.N, shape.E, device=dev, dtype=dtype)
    part = torch.empty(shape.splits, shape.grad_numel, device=dev, dtype=torch.float32)
    consts = dot_precision(dtype)
    pads = shape.pads
    kv_tiles = triton.cdiv(n, BLOCK_N)
    tiles = triton.cdiv(shape.N, BLOCK_M)  # token tiles of the per-token programs
    wp_off = shape.E * D + shape.E + 2 * D  # each kernel gets the columns of the partial sums it writes

    def launch(config: Config):
        w = config.num_warps
        _proj_bwd_kernel[(shape.splits + tiles,)](
            dy2, o, proj_w, d_o, delta, part[:, wp_off:], shape.N, D, num_heads, shape.HD, shape.splits,
            shape.rows_per_split, shape.grad_numel, **pads, ROWS=PROJ_ROWS, BLOCK_M=BLOCK_M, **consts, num_warps=w,
            num_stages=SPLIT_KERNEL_STAGES)
        _attn_bwd_kernel[(kv_tiles + triton.cdiv(n, BLOCK_M), B)](
            qkv, d_o, lse, delta, dqkv, n, D, shape.E, num_heads, num_groups, shape.HD, 1.0 / shape.HD ** 0.5,
            kv_tiles, HD_PAD=pads["HD_PAD"], BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, **consts, num_warps=w)
        _ln_qkv_bwd_kernel[(shape.splits + tiles,)](
            x2, dy2, ln_w, ln_b, qkv_w, mean, rstd, dqkv, dx, part[:, :wp_off], shape.N, D, shape.E, shape.splits,
            shape.rows_per_split, shape.grad_numel, D, D_PAD=pads["D_PAD"], BLOCK_M=BLOCK_M, BLOCK_E=BLOCK_E,
            **consts, HAS_RESIDUAL=True, num_warps=w, num_stages=SPLIT_KERNEL_STAGES)
        split_sum(part, grads)

    launch(_config("bwd", shape, dtype, dev, launch))
    return dx, grads


__all__ = ["block_forward", "block_backward", "split_grads", "weight_splits", "Shape", "Config", "CONFIGS", "TUNER",
           "force_config", "BLOCK_M", "BLOCK_N", "BLOCK_E", "PROJ_ROWS", "MAX_DIM", "SPLIT_KERNEL_STAGES", "MAX_HEAD_DIM"]
