"""Launch code of the many-expert path: three launches forward, two backward (three with shared V / W2;
no host reads).

Forward: ``_gate_route_kernel`` (gate, partial statistics, per-tile routing), ``_experts_fwd_kernel``
(every pair's expert output, grouped by expert), ``_combine_kernel`` (y = dropout(Σ_j g o), and the
importance, load and auxiliary loss). Backward: ``_experts_bwd_kernel`` (per pair dx through W1, V,
and da, du, hc unless the weight gradients recompute them; the gate's backward per token tile),
``_weights_dx_kernel`` (every weight gradient, and dx), with shared V / W2 ``_shared_grads_kernel``
(their gradients: the weight kernel's partial sums per slot of experts, added in order). See
:mod:`mlit_kernels.dispatch.kernels`.

The grouped kernels' row tile and warps are the tuned configuration (:data:`CONFIGS`, those
:func:`configs_for` m allows); no reduction depends on it. Tuning runs once per key on CUDA,
never while a CUDA graph is captured (the default configuration is used then).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from ..common.device_model import H100
from ..common.precision import dot_precision
from ..common.settings import gate_flags
from ..common.tiling import MIN_CHUNK, hidden_chunk, next_pow2, round_up, width_chunks
from ..common.tuning import LaunchTuner
from .kernels import (ROUTE_BLOCK_N, SUPER_TILES, _combine_kernel, _experts_bwd_kernel, _experts_fwd_kernel,
                      _gate_route_kernel, _shared_grads_kernel, _weights_dx_kernel)

WEIGHT_TILE = 32  # the m chunk of a dW_g / dW_noise program
WEIGHT_D_CHUNK = 16  # d_h columns of a weight-gradient strip
WEIGHT_GROUP_MAX = 384  # m columns of a strip: its three fp32 (columns × 16) accumulators, 72 registers a
WEIGHT_WARPS = 8  # thread at the weight-gradient launch's 8 warps
# A group this wide or narrower is one power-of-two chunk (108 columns: 128, not 16 + 32 + 64): on sm_90 the
# chunks' separate tiles and addresses spilled (Triton 3.6: 72 B at mLiT-XXS; fp32 668 B, 640 B inside
# loops), one 128-wide chunk spills nothing in fp16, bf16 and fp32 with Triton 3.6, 3.8 and 3.9
# (bench/results/sm90-audit.md). The padded columns are masked: no bytes, some tensor-core work.
WEIGHT_SINGLE_CHUNK_MAX = 128
STRIP_PROGRAMS = 264  # with shared V / W2, the experts split into slots until there are this many strips (2 an H100 SM)
SHARED_BLOCK = 1024  # elements a program of the shared V / W2 gradients' sum
COMBINE_BLOCK_M = 64
BYTES_BUDGET = 3  # a training step's HBM bytes at most this × the least (tests/moe/test_dispatch.py pins it)


@dataclass(frozen=True)
class Config:
    """Launch configuration of the grouped kernels: row tile (pairs per program) and warps."""

    block_r: int
    num_warps: int


# No 64-row tile: its products (64 × d_h chunk over 16-wide K chunks) compile to wgmma 16 or 32 wide beside
# other tensor-core dots on sm_90, which Triton 3.6–3.7 miscompile (bench/sm90_audit.py, tests/checks/test_sm90_rule.py).
# The default spills least on sm_90 (bench/results/sm90-audit.md): the experts' backward at most 48 B (Triton
# 3.9) / 28 B (3.6) at 16 rows and 8 warps, up to 1268 B at 32 rows and 4 warps.
CONFIGS = (Config(16, 8), Config(32, 8), Config(16, 4), Config(32, 4))
ACCUMULATORS_PER_THREAD = 64  # the m-wide fp32 row accumulators a configuration may hold per thread


def configs_for(m: int) -> tuple[Config, ...]:
    """The candidates whose m-wide accumulators (row tile × m, fp32) fit ACCUMULATORS_PER_THREAD
    registers a thread; the first is the default."""
    width = sum(width_chunks(m))
    return tuple(c for c in CONFIGS if c.block_r * width <= ACCUMULATORS_PER_THREAD * 32 * c.num_warps)


TUNER: LaunchTuner[Config] = LaunchTuner("mlit_kernels.dispatch", CONFIGS)
force_config = TUNER.force  # ``with force_config(Config(16, 4)):`` runs the grouped kernels with that configuration


def _config(key: tuple, x: torch.Tensor, launch) -> Config:
    """:data:`TUNER`'s configuration for ``key`` (its second entry is m) among those m allows."""
    return TUNER.choose(key, x.device, launch, configs_for(key[1]))


def weight_groups(m: int) -> tuple[int, tuple[int, int, int, int]]:
    """(groups, chunk widths of one group): the m column groups of the weight-gradient strips, as
    few as keep a group within WEIGHT_GROUP_MAX columns, of equal width (rounded up to 16); one
    power-of-two chunk where that is at most WEIGHT_SINGLE_CHUNK_MAX wide."""
    groups = triton.cdiv(round_up(m, MIN_CHUNK), WEIGHT_GROUP_MAX)
    width = round_up(triton.cdiv(m, groups), MIN_CHUNK)
    single = next_pow2(width)
    chunks = (single, 0, 0, 0) if single <= WEIGHT_SINGLE_CHUNK_MAX else width_chunks(width)
    return triton.cdiv(m, sum(chunks)), chunks


def recompute_intermediates(pairs: int, m: int, d_h: int, itemsize: int, expert_bytes: int, least_bytes: int,
                            other_bytes: int) -> bool:
    """Whether the weight-gradient programs recompute each pair's a, u and dh rather than read da,
    du and hc (pairs, d_h) of ``itemsize`` bytes, which the experts' backward then stores.
    ``expert_bytes``: W1, V, W2 and their biases, which recomputing reads once more;
    ``least_bytes``: the least a training step of the layer moves (x, y, dy, dx and three passes
    over the weights); ``other_bytes``: what the step moves besides the intermediates.

    Recomputing costs 3 products of 2·m·d_h FLOPs a pair per m column group (:func:`weight_groups`)
    and a read of the expert weights, storing 6·d_h elements a pair (written and read). Chosen
    where it takes less modelled H100 time (:data:`mlit_kernels.common.device_model.H100`: at large N where
    groups · m < 2 · peak FLOP/s ÷ bandwidth, ≈ 590 in fp16, i.e. m ≤ WEIGHT_GROUP_MAX), and where
    storing would take the step past BYTES_BUDGET times the least."""
    stored = 6 * pairs * d_h * itemsize
    flops = 6 * weight_groups(m)[0] * m * d_h * pairs
    faster = flops / H100.peak_flops + expert_bytes / H100.bandwidth < stored / H100.bandwidth
    return faster or other_bytes + stored > BYTES_BUDGET * least_bytes


def expert_slots(t: int, strips_per_slot: int, separate: bool) -> tuple[int, int]:
    """(slots, experts a slot) of the weight-gradient strips: one expert a slot with separate
    experts; with shared V / W2 (their gradients summed over all experts, partial sums per slot
    added by a second launch) as few slots as give STRIP_PROGRAMS strips, at most one a slot."""
    slots = t if separate else min(t, triton.cdiv(STRIP_PROGRAMS, strips_per_slot))
    per_slot = triton.cdiv(t, slots)
    return triton.cdiv(t, per_slot), per_slot


def _separate(w1, v, w2) -> dict:
    """SEP_* constexprs: 1 where the projection has one weight per expert (a leading t)."""
    return dict(SEP_W1=int(w1.dim() == 3), SEP_V=int(v.dim() == 3), SEP_W2=int(w2.dim() == 3))


def _row_tiles(n: int, block_r: int) -> int:
    """Row tiles per (expert, super-chunk): a super-chunk's tokens bound any expert's pairs in it."""
    return triton.cdiv(min(n, SUPER_TILES * ROUTE_BLOCK_N), block_r)


def route_tiles(n: int) -> int:
    """Rows of the routing tables (one per gate tile, plus one so that none is empty)."""
    return triton.cdiv(n, ROUTE_BLOCK_N) + 1


def dispatch_forward(x, w_gate, w_noise, w1, b1, v, b_v, w2, b2, seed, noise, k: int, training: bool, noisy: bool,
                     dropout: float, noise_eps: float, w_importance: float, w_load: float, squared_cv: bool,
                     unbiased_cv: bool, dtype: torch.dtype):
    """The layer's forward in three launches.

    x (N, m) any float dtype; weights any float dtype, W1 (t, m, d_h) and V, W2 shared (m, d_h),
    (d_h, m) or per expert (t, m, d_h), (t, d_h, m); seed (1,) int64 on x's device; noise (N, t)
    fp32 or None; ``dtype`` the compute dtype of the expert products. Returns y (N, m) x's dtype,
    aux () fp32 and what the backward needs: idx, gates (N, k) int32 / fp32, route
    (tiles + 1, 2, t) int32, local (route rows · ROUTE_BLOCK_N · k,) int32, o (N·k, m) in ``dtype``
    (each pair's expert output), stats (2, t) fp32 (importance, load), keep (N, m) uint8 ((0,) without
    dropout)."""
    n, m = x.shape
    t = w_gate.shape[1]
    d_h = w1.shape[-1]
    dev = x.device
    flags = dict(gate_flags(training, noisy, noise is not None, k, t), DROPOUT=bool(training and dropout > 0))
    tiles = triton.cdiv(n, ROUTE_BLOCK_N)
    rows = route_tiles(n)
    idx = torch.empty(n, k, device=dev, dtype=torch.int32)
    gates = torch.empty(n, k, device=dev, dtype=torch.float32)
    part = torch.empty(rows, 2, t, device=dev, dtype=torch.float32)
    route = torch.empty(rows, 2, t, device=dev, dtype=torch.int32)
    local = torch.empty(rows * ROUTE_BLOCK_N * k, device=dev, dtype=torch.int32)
    o = torch.empty(n * k, m, device=dev, dtype=dtype)
    y = torch.empty_like(x)
    keep = torch.empty((n, m) if flags["DROPOUT"] else (0,), device=dev, dtype=torch.uint8)
    stats = torch.empty(2, t, device=dev, dtype=torch.float32)
    aux = torch.empty((), device=dev, dtype=torch.float32)
    block_t = max(16, next_pow2(t))
    _gate_route_kernel[(rows,)](
        x, w_gate, w_noise, noise if noise is not None else part, seed, idx, gates, part, route, local,
        n, m, t, float(noise_eps), K=k, NOISY=flags["NOISY"], NOISE_MODE=flags["NOISE_MODE"],
        LOAD_P=flags["LOAD_P"], BLOCK_N=ROUTE_BLOCK_N, BLOCK_T=block_t, num_warps=4)
    if n:
        m0, m1, m2, m3 = width_chunks(m)
        consts = dict(K=k, **_separate(w1, v, w2), M0=m0, M1=m1, M2=m2, M3=m3, DC=hidden_chunk(d_h),
                      SUPER=SUPER_TILES, BLOCK_N=ROUTE_BLOCK_N, **dot_precision(dtype))

        def launch(c: Config):
            rt = _row_tiles(n, c.block_r)
            _experts_fwd_kernel[(rt * t * triton.cdiv(tiles, SUPER_TILES),)](
                x, w1, b1, v, b_v, w2, b2, route, local, o, m, d_h, t, tiles, rt, BR=c.block_r, **consts,
                num_warps=c.num_warps)

        launch(_config(("fwd", m, d_h, t, k, dtype, tuple(consts[s] for s in ("SEP_W1", "SEP_V", "SEP_W2"))), x,
                       launch))
    _combine_kernel[(tiles + 1,)](
        o, gates, part, seed, y, keep if keep.numel() else part, stats, aux, n, m, t, tiles, float(dropout),
        float(w_importance), float(w_load), K=k, DROPOUT=flags["DROPOUT"], SQUARED=bool(squared_cv),
        UNBIASED=bool(unbiased_cv), BLOCK_N=ROUTE_BLOCK_N, BLOCK_M=COMBINE_BLOCK_M, BLOCK_T=block_t, num_warps=4)
    return y, aux, idx, gates, route, local, o, stats, keep


def dispatch_backward(dy, d_aux, x, w_gate, w_noise, w1, b1, v, b_v, w2, b2, seed, noise, idx, gates, route, local, o,
                      stats, keep, k: int, training: bool, noisy: bool, dropout: float, noise_eps: float,
                      w_importance: float, w_load: float, squared_cv: bool, unbiased_cv: bool, dtype: torch.dtype):
    """Gradients of :func:`dispatch_forward` in two launches, three with shared V / W2: (dx in x's
    dtype, dW_g, dW_noise, dW1, db1, dV, db_V, dW2, db2 in their parameters' dtypes). dy (N, m) any
    float dtype, d_aux () fp32; the rest as the forward returned."""
    n, m = x.shape
    t = w_gate.shape[1]
    d_h = w1.shape[-1]
    dev = x.device
    flags = dict(gate_flags(training, noisy, noise is not None, k, t), DROPOUT=bool(training and dropout > 0))
    grads = [torch.empty_like(p) for p in (x, w_gate, w_noise, w1, b1, v, b_v, w2, b2)]
    if not n:
        for g in grads[1:]:
            g.zero_()
        return tuple(grads)
    tiles = triton.cdiv(n, ROUTE_BLOCK_N)
    groups, group_chunks = weight_groups(m)
    expert_bytes = sum(w.nbytes for w in (w1, b1, v, b_v, w2, b2))
    least_bytes = 5 * x.nbytes + 3 * (expert_bytes + w_gate.nbytes + w_noise.nbytes)
    # besides the least: the pairs' outputs o (written, read twice) and dxp (written, read), x and dy
    # read by three more launches, the keep mask (written, read twice)
    other_bytes = least_bytes + 5 * n * k * m * dtype.itemsize + 3 * x.nbytes + 3 * keep.nbytes
    recompute = recompute_intermediates(n * k, m, d_h, dtype.itemsize, expert_bytes, least_bytes, other_bytes)
    da, du, hc = (torch.empty((0,) if recompute else (n * k, d_h), device=dev, dtype=dtype) for _ in range(3))
    dgate = torch.empty(n, 2, t, device=dev, dtype=torch.float32)
    dxp = torch.empty(n * k, m, device=dev, dtype=dtype)
    keep_arg = keep if keep.numel() else stats
    sep = _separate(w1, v, w2)
    assert sep["SEP_W1"] and sep["SEP_V"] == sep["SEP_W2"], "W1 per expert; V and W2 both shared or both per expert"
    common = dict(K=k, SUPER=SUPER_TILES, BLOCK_N=ROUTE_BLOCK_N, **dot_precision(dtype))
    dc = hidden_chunk(d_h)
    n_sc = triton.cdiv(tiles, SUPER_TILES)
    block_t = max(16, next_pow2(t))
    m0, m1, m2, m3 = width_chunks(m)

    def launch(c: Config):
        rt = _row_tiles(n, c.block_r)
        _experts_bwd_kernel[(rt * t * n_sc + tiles,)](
            x, dy, keep_arg, gates, w1, b1, v, b_v, w2, route, local, w_gate, w_noise,
            noise if noise is not None else stats, seed, idx, o, stats, d_aux, da, du, hc, dxp, dgate,
            n, m, d_h, t, tiles, rt, float(noise_eps), float(dropout), float(w_importance), float(w_load), **sep,
            NOISY=flags["NOISY"], NOISE_MODE=flags["NOISE_MODE"], LOAD_P=flags["LOAD_P"], DROPOUT=flags["DROPOUT"],
            SQUARED=bool(squared_cv), UNBIASED=bool(unbiased_cv), RECOMPUTE=recompute, M0=m0, M1=m1, M2=m2, M3=m3,
            DC=dc, BR=c.block_r, BLOCK_T=block_t, **common, num_warps=c.num_warps)

    launch(_config(("bwd", m, d_h, t, k, dtype, tuple(sep.values())), x, launch))
    strips_per_slot = triton.cdiv(d_h, WEIGHT_D_CHUNK) * groups
    slots, per_slot = expert_slots(t, strips_per_slot, sep["SEP_V"] == 1)
    shared_numel = 2 * m * d_h + d_h + m
    part = torch.empty((0,) if sep["SEP_V"] else (slots, shared_numel), device=dev, dtype=torch.float32)
    g0, g1, g2, g3 = group_chunks
    dx, dwg, dwn, dw1, db1, dv, dbv, dw2, db2 = grads
    _weights_dx_kernel[(slots * strips_per_slot + triton.cdiv(m, WEIGHT_TILE) + tiles,)](
        x, dy, keep_arg, gates, da, du, hc, dgate, dxp, route, local, w_gate, w_noise,
        *((w1, b1, v, b_v, w2) if recompute else (stats,) * 5), dw1, db1, dv, dbv, dw2, db2,
        part if part.numel() else stats, dwg, dwn, dx,
        n, m, d_h, t, tiles, per_slot, float(dropout), **sep, NOISY=flags["NOISY"], DROPOUT=flags["DROPOUT"],
        RECOMPUTE=recompute, WD=WEIGHT_D_CHUNK, G0=g0, G1=g1, G2=g2, G3=g3, WB=WEIGHT_TILE, BLOCK_T=block_t, **common,
        num_warps=WEIGHT_WARPS)
    if part.numel():
        _shared_grads_kernel[(triton.cdiv(shared_numel, SHARED_BLOCK),)](part, dv, dbv, dw2, db2, slots, m, d_h,
                                                                         BLOCK=SHARED_BLOCK)
    return tuple(grads)


__all__ = ["dispatch_forward", "dispatch_backward", "route_tiles", "Config", "CONFIGS", "configs_for",
           "force_config", "weight_groups", "recompute_intermediates", "expert_slots"]
