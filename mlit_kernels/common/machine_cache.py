"""The per-machine cache of what this machine's GPU has shown: clearance verdicts and the launch
configurations tuned with them (one JSON file; Triton-free).

Location: ``$MLIT_CACHE_DIR/clearance.json``, else ``$XDG_CACHE_HOME/mlit/clearance.json``, else
``~/.cache/mlit/clearance.json``. Every write is a read-modify-write under an exclusive lock on a
file beside it, then an atomic replace, so processes that clear at once (the ranks of a torchrun
job) lose nothing and a reader never sees half a file. Reads are cached by the file's mtime.

    {"format": 1,
     "verdicts": [{"family", "source_hash", "triton", "capability", "cleared", "cause", ...}, ...],
     "tuned": {"<capability>|<triton>": {"<tuner>": {"<key>": "<configuration>"}}}}
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import importlib.metadata
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

import torch

ENV = "MLIT_CACHE_DIR"
FORMAT = 1
_EMPTY = {"format": FORMAT, "verdicts": [], "tuned": {}}
_read: dict[str, tuple[float, dict]] = {}  # path -> (mtime, contents)


def path() -> Path:
    """The cache file of this machine (see the module docstring)."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV]) / "clearance.json"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mlit" / "clearance.json"


def read() -> dict:
    """The cache's contents (empty when there is no file, or one of another format or unreadable)."""
    file = path()
    try:
        mtime = file.stat().st_mtime_ns
    except FileNotFoundError:
        return json.loads(json.dumps(_EMPTY))
    cached = _read.get(str(file))
    if cached is not None and cached[0] == mtime:
        return cached[1]
    try:
        contents = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        contents = None
    if not isinstance(contents, dict) or contents.get("format") != FORMAT:
        contents = json.loads(json.dumps(_EMPTY))
    _read[str(file)] = (mtime, contents)
    return contents


@functools.lru_cache(maxsize=None)
def triton_version() -> str:
    """The installed Triton's version (read without importing Triton)."""
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return "none"


def capability(device: torch.device | str) -> str:
    """"major.minor" of a CUDA device's compute capability ("none" without CUDA); "interpreter" for
    any other device (kernels there run through Triton's CPU interpreter)."""
    device = torch.device(device)
    if device.type != "cuda":
        return "interpreter"
    if not torch.cuda.is_available():
        return "none"  # a CUDA device named where there is none: nothing is cleared for it
    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}.{minor}"


def machine_key(device: torch.device | str) -> str:
    """"<capability>|<triton version>": what the tuned configurations of a device are kept under."""
    return f"{capability(device)}|{triton_version()}"


def tuned(tuner: str, key: str, device: torch.device | str) -> str | None:
    """The configuration (its repr) kept for ``tuner`` at ``key`` (a repr) on this kind of device,
    or None."""
    return read()["tuned"].get(machine_key(device), {}).get(tuner, {}).get(key)


@contextlib.contextmanager
def update() -> Iterator[dict]:
    """``with update() as contents:`` change contents in place; written atomically on exit, under
    an exclusive lock held from the read to the replace."""
    file = path()
    file.parent.mkdir(parents=True, exist_ok=True)
    with open(file.with_suffix(".lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            _read.pop(str(file), None)
            contents = json.loads(json.dumps(read()))  # a private copy
            yield contents
            fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=".clearance-", suffix=".json")
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(contents, out, indent=1, sort_keys=True)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, file)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


__all__ = ["ENV", "FORMAT", "path", "read", "update", "triton_version", "capability", "machine_key", "tuned"]
