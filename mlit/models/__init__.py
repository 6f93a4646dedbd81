"""The paper's models: GQA attention, MoE transformer layers, the mLiT encoder and classifier,
and the mmLiT masked auto-encoder."""

from mlit_kernels.patch_embed import patchify

from .attention import GroupedQueryAttention
from .classifier import MLiTClassifier
from .encoder import MLiTEncoder
from .mae import MAEOutput, MMLiT, random_masking
from .transformer import MoETransformer, MoETransformerLayer

__all__ = [
    "GroupedQueryAttention",
    "MAEOutput",
    "MLiTClassifier",
    "MLiTEncoder",
    "MMLiT",
    "MoETransformer",
    "MoETransformerLayer",
    "patchify",
    "random_masking",
]
