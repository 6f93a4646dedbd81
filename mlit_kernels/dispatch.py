"""Routing metadata for the dispatch variant: group the N·k (token, expert) pairs by expert.

Pair ``p = n * k + j`` is token n's j-th selected expert. The grouping is a counting sort with no
padding and no atomics (so it is deterministic and stable: within an expert, pairs keep their
order):

1. ``_histogram_kernel``: per tile of BLOCK_P pairs, the number of pairs of each expert,
   written to a (tiles, t) table;
2. torch prefix sums over the experts (``expert_offsets``) and over the tiles (each tile's first
   slot inside each expert's group) — tiny (tiles × t) tensors;
3. ``_scatter_kernel``: per tile, each pair's rank among the tile's pairs of the same expert
   (``tl.cumsum`` of a one-hot), hence its sorted position; writes ``sorted_pairs`` (the pair at
   each sorted position) and its inverse ``pair_pos`` (the sorted position of each pair).

The result equals ``torch.argsort(expert_of_pair, stable=True)``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .common.tiling import interpreting, next_pow2


ROUTE_BLOCK_P = 64 if interpreting() else 256


class Routing(NamedTuple):
    """Pairs grouped by expert. ``sorted_pairs`` (N·k,) int32: pair id at each sorted position;
    ``pair_pos`` (N·k,) int32: sorted position of each pair (the inverse permutation);
    ``expert_offsets`` (t + 1,) int32: expert e's group is sorted positions
    ``[expert_offsets[e], expert_offsets[e + 1])``; ``counts`` (t,) int32."""

    sorted_pairs: torch.Tensor
    pair_pos: torch.Tensor
    expert_offsets: torch.Tensor
    counts: torch.Tensor


@triton.jit
def _histogram_kernel(expert_ptr, hist_ptr, P, T, BLOCK_P: tl.constexpr, BLOCK_T: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    cols = tl.arange(0, BLOCK_T)
    ex = tl.load(expert_ptr + offs, mask=offs < P, other=-1)
    onehot = (ex[:, None] == cols[None, :]).to(tl.int32)
    tl.store(hist_ptr + pid * T + cols, tl.sum(onehot, axis=0), mask=cols < T)


@triton.jit
def _scatter_kernel(expert_ptr, base_ptr, sorted_ptr, pos_ptr, P, T, BLOCK_P: tl.constexpr, BLOCK_T: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    cols = tl.arange(0, BLOCK_T)
    ok = offs < P
    ex = tl.load(expert_ptr + offs, mask=ok, other=-1)
    onehot = (ex[:, None] == cols[None, :]).to(tl.int32)
    rank = tl.cumsum(onehot, axis=0) - onehot  # exclusive: earlier pairs of the same expert in this tile
    base = tl.load(base_ptr + pid * T + cols, mask=cols < T, other=0)
    pos = tl.sum(tl.where(onehot != 0, rank + base[None, :], 0), axis=1)
    tl.store(sorted_ptr + pos, offs.to(tl.int32), mask=ok)
    tl.store(pos_ptr + offs, pos.to(tl.int32), mask=ok)


def route(topk_idx: torch.Tensor, num_experts: int) -> Routing:
    """Group the pairs of ``topk_idx`` (N, k) int32 by expert (see the module docstring)."""
    expert = topk_idx.reshape(-1)
    if expert.dtype != torch.int32:
        expert = expert.to(torch.int32)
    expert = expert.contiguous()
    p, t = expert.numel(), num_experts
    dev = expert.device
    block_t = max(16, next_pow2(t))
    tiles = triton.cdiv(p, ROUTE_BLOCK_P)
    sorted_pairs = torch.empty(p, device=dev, dtype=torch.int32)
    pair_pos = torch.empty(p, device=dev, dtype=torch.int32)
    if tiles == 0:
        zeros = torch.zeros(t, device=dev, dtype=torch.int32)
        return Routing(sorted_pairs, pair_pos, torch.zeros(t + 1, device=dev, dtype=torch.int32), zeros)
    hist = torch.empty(tiles, t, device=dev, dtype=torch.int32)
    _histogram_kernel[(tiles,)](expert, hist, p, t, BLOCK_P=ROUTE_BLOCK_P, BLOCK_T=block_t)
    counts = hist.sum(0, dtype=torch.int32)
    expert_offsets = torch.zeros(t + 1, device=dev, dtype=torch.int32)
    expert_offsets[1:] = counts.cumsum(0)
    base = (hist.cumsum(0, dtype=torch.int32) - hist + expert_offsets[:-1]).to(torch.int32).contiguous()
    _scatter_kernel[(tiles,)](expert, base, sorted_pairs, pair_pos, p, t, BLOCK_P=ROUTE_BLOCK_P, BLOCK_T=block_t)
    return Routing(sorted_pairs, pair_pos, expert_offsets, counts)


__all__ = ["Routing", "route"]
