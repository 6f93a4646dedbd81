"""Atomic file writes: a temporary file beside the target, fsync, then os.replace.

A reader sees the old file or the new one, never half of one. A temporary file left behind by a
writer that was killed (kill -9, power loss) is named ``.<target>.<random>.tmp``; the next write
of the same target removes such leftovers first.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Temporary files of earlier, interrupted atomic writes of ``path``."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    return sorted(path.parent.glob(f".{path.name}.*.tmp"))


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None]) -> Path:
    """Write via ``write(binary file object)`` into a temporary file beside ``path``, fsync,
    os.replace. If ``write`` raises, nothing changes and the exception propagates."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for leftover in stale_temporaries(path):
        leftover.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path
