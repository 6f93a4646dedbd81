"""Atomic file writes: a temporary file beside the target, fsync, then os.replace.

A reader sees the old file or the new one, never half of one. Several processes may write the same
target at once (the ranks of a torchrun job filling one data cache): each writes its own temporary
file and the last rename wins. A writer holds an exclusive ``flock`` on its temporary file until
the rename, so a temporary file nobody holds is one left by a writer that was killed (kill -9, power
loss); such files are named ``.<target>.<random>.tmp`` and the next write of the same target
removes them first.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Temporary files of atomic writes of ``path``: interrupted ones and, until they finish, live ones."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    return sorted(path.parent.glob(f".{path.name}.*.tmp"))


def _remove_if_abandoned(temporary: Path) -> None:
    """Unlink ``temporary`` unless a live writer holds its lock (or it is gone already)."""
    try:
        fd = os.open(temporary, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # a writer is still at work on it
        try:  # still the same file under that name (not renamed onto the target meanwhile)?
            same = os.stat(temporary).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return
        if same:
            temporary.unlink(missing_ok=True)
    finally:
        os.close(fd)


def _locked_temporary(path: Path) -> tuple[int, str]:
    """A new temporary file beside ``path``, open and exclusively locked: (fd, name)."""
    while True:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.fstat(fd).st_nlink:
            return fd, tmp
        os.close(fd)  # another writer took it for abandoned between mkstemp and flock: a new one


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None]) -> Path:
    """Write via ``write(binary file object)`` into a temporary file beside ``path``, fsync,
    os.replace. If ``write`` raises, nothing changes and the exception propagates."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for leftover in stale_temporaries(path):
        _remove_if_abandoned(leftover)
    fd, tmp = _locked_temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:  # closing it releases the lock, after the rename
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
