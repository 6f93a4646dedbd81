"""The package's settings, one home each (Triton-free: the reference and the layer import them
before any kernel is defined; a kernel reads them through ``tl.constexpr`` copies)."""

from __future__ import annotations

NOISE_EPS = 1e-2  # added to softplus(x W_noise), the noise scale (the cited implementation's value)
CV_EPS = 1e-10  # CV² = var / (mean² + CV_EPS); the plain CV is sqrt(CV² + CV_EPS²)
AUX_LOSS_WEIGHT = 1e-2  # default w_importance and w_load of the balancing loss (Eq. 10)
DEFAULT_SHARED = ("v", "w2")  # the projections all experts share by default (the Triton backend's only sharing)

BLOCK_T = 16  # gate columns of a token tile: the dense kernels hold the whole gate in one tile (t ≤ 16)

# Gate noise modes (a kernel constexpr): none, given as an (N, t) tensor, drawn by Philox in-kernel.
NOISE_NONE, NOISE_GIVEN, NOISE_PHILOX = 0, 1, 2

# Reduction boundaries that depend on the shape only, never on a tuned configuration, so every
# configuration sums the same groups in the same order: the forward's importance and
# load are summed per group of SUM_ROWS tokens (every tuned token tile is a multiple), the weight
# gradients over at most MAX_SPLITS ranges of at least MIN_SPLIT_ROWS tokens, each range a multiple
# of WGRAD_ROWS tokens and walked WGRAD_ROWS at a time by WGRAD_WARPS warps.
SUM_ROWS = 16
MAX_SPLITS = 32
MIN_SPLIT_ROWS = 256
WGRAD_ROWS = 32
WGRAD_WARPS = 8


def gate_flags(training: bool, noisy: bool, noise_given: bool, k: int, t: int) -> dict:
    """The gate's launch constexprs: NOISY (noise is added: training with noisy gating),
    NOISE_MODE (none / given / Philox) and LOAD_P (the load is Σ P(x) rather than the routing
    counts: noisy and k < t)."""
    noisy = bool(training and noisy)
    mode = (NOISE_GIVEN if noise_given else NOISE_PHILOX) if noisy else NOISE_NONE
    return dict(NOISY=noisy, NOISE_MODE=mode, LOAD_P=noisy and k < t)


__all__ = ["NOISE_EPS", "CV_EPS", "AUX_LOSS_WEIGHT", "DEFAULT_SHARED", "BLOCK_T", "NOISE_NONE", "NOISE_GIVEN",
           "NOISE_PHILOX", "SUM_ROWS", "MAX_SPLITS", "MIN_SPLIT_ROWS", "WGRAD_ROWS", "WGRAD_WARPS", "gate_flags"]
