"""The kernel families: name → descriptor (:class:`mlit_kernels.common.family.Family`), one folder
``mlit_kernels/<name>/`` each. Clearance, the meter, ``mlit doctor``, the GPU report and the
parametrised tests read this list. Adding a family is one folder and one name here.

Triton-free: reading a descriptor defines no kernel.
"""

from __future__ import annotations

import functools
import importlib

from .common.family import Family

#: The families, in the order a training step meets them.
NAMES = ("augment", "patch_embed", "attention", "dense", "dispatch", "norm_linear", "loss", "mae_tokens", "mae_loss")


_FAMILIES: dict[str, Family] = {name: importlib.import_module(f"{__package__}.{name}.family").FAMILY for name in NAMES}


def family(name: str) -> Family:
    """The descriptor of family ``name``."""
    if name not in _FAMILIES:
        raise ValueError(f"family must be one of {NAMES}, got {name!r}")
    return _FAMILIES[name]


def families() -> tuple[Family, ...]:
    """Every family's descriptor, in :data:`NAMES`' order."""
    return tuple(_FAMILIES.values())


@functools.lru_cache(maxsize=1)
def kernel_flops() -> dict:
    """Every launched Triton kernel's name → its FLOP model (None: no matmul work), over all families
    (a kernel shared by two families has one model)."""
    models: dict = {}
    for fam in families():
        for kernel, model in fam.kernels.items():
            if kernel in models and models[kernel] is not model:
                raise ValueError(f"kernel {kernel} has two FLOP models (family {fam.name} and another)")
            models[kernel] = model
    return models


__all__ = ["NAMES", "family", "families", "kernel_flops"]
