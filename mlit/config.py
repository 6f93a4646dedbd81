"""Model configurations: the paper's encoders S, XS, XXS (Table 1) and the MAE decoder (Table 2)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mlit_kernels.common.settings import DEFAULT_SHARED


@dataclass(frozen=True)
class TransformerConfig:
    """A stack of MoE transformer layers: GQA attention + SharedSwiGLUMoE, pre-norm.

    hidden_first → hidden_last shrink linearly with depth (Eq. 15); the expert count grows in
    stages: ``experts_per_stage[s]`` experts in the s-th of ``len(experts_per_stage)`` equal runs
    of layers.
    """

    name: str
    embed_dim: int
    depth: int
    hidden_first: int
    hidden_last: int
    num_heads: int
    num_groups: int
    experts_per_stage: tuple[int, ...] = (3, 4, 5)
    top_k: int = 2
    dropout: float = 0.1
    shared: tuple[str, ...] = DEFAULT_SHARED

    def __post_init__(self):
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim={self.embed_dim} must be divisible by num_heads={self.num_heads}")
        if self.num_heads % self.num_groups:
            raise ValueError(f"num_heads={self.num_heads} must be divisible by num_groups={self.num_groups}")
        if self.depth % len(self.experts_per_stage):
            raise ValueError(f"depth={self.depth} must split into {len(self.experts_per_stage)} equal stages")
        if self.top_k > min(self.experts_per_stage):
            raise ValueError(f"top_k={self.top_k} exceeds the smallest expert count {min(self.experts_per_stage)}")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    def hidden_dim(self, i: int) -> int:
        """Eq. 15: d_h(i) = floor(((L−1) − i)/(L−1) · (d_first − d_last)) + d_last, i from 0."""
        if self.depth == 1:
            return self.hidden_first
        span = self.hidden_first - self.hidden_last
        return ((self.depth - 1 - i) * span) // (self.depth - 1) + self.hidden_last

    def num_experts(self, i: int) -> int:
        """Experts of layer i (from 0): the count of the stage the layer falls in."""
        return self.experts_per_stage[i // (self.depth // len(self.experts_per_stage))]

    def replace(self, **changes) -> "TransformerConfig":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class ImageConfig:
    """36×36 inputs cut into 3×3 patches: 144 patches of 27 values, plus one dummy patch."""

    image_size: int = 36
    patch_size: int = 3
    in_chans: int = 3

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.in_chans


ENCODERS = {
    "S": TransformerConfig("S", embed_dim=144, depth=15, hidden_first=144, hidden_last=72, num_heads=8, num_groups=4),
    "XS": TransformerConfig("XS", embed_dim=128, depth=12, hidden_first=96, hidden_last=32, num_heads=8, num_groups=4),
    "XXS": TransformerConfig("XXS", embed_dim=108, depth=9, hidden_first=81, hidden_last=27, num_heads=6, num_groups=3),
}

DECODER = TransformerConfig(
    "decoder", embed_dim=108, depth=4, hidden_first=72, hidden_last=72, num_heads=6, num_groups=3, experts_per_stage=(3,)
)

# The paper's parameter counts (Tables 1, 2, 7, 8), in millions.
PAPER_PARAMS = {
    "S": {"encoder": 2.36, "head100": 2.38},
    "XS": {"encoder": 1.21, "head100": 1.22},
    "XXS": {"encoder": 0.66, "head100": 0.67},
    "decoder": 0.34,
}


def encoder_config(name: str) -> TransformerConfig:
    """The preset S, XS or XXS (case-insensitive)."""
    try:
        return ENCODERS[name.upper()]
    except KeyError:
        raise ValueError(f"unknown model size {name!r}; choose one of {sorted(ENCODERS)}") from None
