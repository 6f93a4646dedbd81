"""Launch helpers shared by the Triton modules: interpreter detection and tile sizes that fit the
paper's widths.

A Triton block dimension is a power of two. Rounding a width up to the next power of two wastes
44% at m = 144 (→ 256); instead a width is covered by up to four power-of-two *chunks* of at
least 16 columns (``width_chunks(144) == (16, 128, 0, 0)``), so the padding is what rounding up
to a multiple of 16 costs: 0% at 144 and 128, 3.6% at 108 (→ 112), 15.6% at 81 (→ 96) and 27
(→ 32).

The chunks come smallest first. A kernel's dots over the chunks share operands, and Triton gives
such a chain of mma.sync dots the warp layout of one of them, the last in program order; a 16-wide
chunk there (a 16- or 32-row tile × 16 columns) lays all warps along the rows, so every warp holds
the whole row tile of every chunk: at m = 144 the dispatch weight-gradient kernel spilled 1.3 KB
on sm_90, the experts' backward 68 B. With the widest chunk last, the warps lie along the columns
(bench/results/sm90-audit.md).
"""

from __future__ import annotations

import os

MIN_CHUNK = 16  # tl.dot needs every dimension ≥ 16
MAX_CHUNKS = 4


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def round_up(n: int, multiple: int) -> int:
    return -(-int(n) // multiple) * multiple


def width_chunks(width: int) -> tuple[int, int, int, int]:
    """Powers of two (each ≥ 16, smallest first, 0 = absent) whose sum is ``width`` rounded up to a
    multiple of 16 — or, for the rare widths whose multiple of 16 has more than four set bits, the
    smallest larger sum of at most four."""
    if width < 1:
        raise ValueError(f"width must be ≥ 1, got {width}")
    units = round_up(width, MIN_CHUNK) // MIN_CHUNK
    while bin(units).count("1") > MAX_CHUNKS:
        units += units & -units  # carry the lowest set bit
    chunks = [MIN_CHUNK << bit for bit in range(units.bit_length()) if units >> bit & 1]
    return tuple(chunks + [0] * (MAX_CHUNKS - len(chunks)))  # type: ignore[return-value]


def hidden_chunk(d_h: int, largest: int = 32) -> int:
    """The d_h chunk a per-token kernel loops over: the largest power of two ≤ ``largest`` whose
    rounding of d_h is no coarser than rounding to 16 (144 → 16, 108 → 16, 81 → 32, 27 → 32)."""
    chunk = largest
    while chunk > MIN_CHUNK and round_up(d_h, chunk) != round_up(d_h, MIN_CHUNK):
        chunk //= 2
    return chunk


def padding(width: int, covered: int) -> float:
    """Fraction of a tile's columns that are padding: (covered − width) / covered."""
    return (covered - width) / covered


__all__ = ["interpreting", "next_pow2", "round_up", "width_chunks", "hidden_chunk", "padding", "MIN_CHUNK"]
