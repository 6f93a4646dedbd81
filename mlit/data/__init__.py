"""Data sets (official archives -> cached uint8 tensors) and batched on-device augmentation."""

from .archives import DataError
from .augment import GPUAugment
from .datasets import DATASETS, ImageSet, load_split

__all__ = ["DATASETS", "DataError", "GPUAugment", "ImageSet", "load_split"]
