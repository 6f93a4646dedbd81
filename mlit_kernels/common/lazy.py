"""Names a package exports from modules that define Triton kernels, imported on first use.

Triton decides at kernel-definition time whether to compile or interpret, so ``TRITON_INTERPRET=1``
(CPU runs) only has to be set before the first use of a kernel, not before the package is imported;
and reading a family's descriptor (``mlit_kernels.<family>.family``, which imports the package)
defines no kernel.
"""

from __future__ import annotations

import importlib
from typing import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` for ``package``: name → the attribute of the same name of the module
    ``exports[name]`` (relative to the package), imported when first asked for — or that module
    itself when it is the submodule ``name``."""

    def __getattr__(name: str):
        if name in exports:
            module = importlib.import_module(exports[name], package)
            return module if module.__name__ == f"{package}.{name}" else getattr(module, name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__


__all__ = ["lazy_exports"]
