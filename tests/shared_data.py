"""Data for the tests: the project's real subsets when they are here, else small files that the
tests write in the same official formats, so that a user's clone runs every data test too.

* ``CIFAR10_MINI``: the real 1,017 / 1,000-image CIFAR-10 subset (``shared/data/cifar10-mini``
  beside the checkout, or ``$MLIT_TEST_DATA``), or None. ``needs_cifar10_mini`` skips without it
  (for tests that check that very subset).
* ``CIFAR10_ARCHIVE``: that subset, or else a generated ``cifar-10-python.tar.gz`` in the official
  pickle format (``data_batch_1`` and ``test_batch`` only; read it with ``--no-verify``). Never None.
* ``fashion_mnist()``: (folder, verify) — Debian's full Fashion-MNIST (verified), or else four
  generated idx ``.gz`` files with the official names (``verify=False``).

Generated images are learnable: each class has its own colour and stripe pattern, plus noise.
Set ``MLIT_TEST_GENERATED=1`` to use generated files even where the real ones exist (what a
user's clone sees). They are written once per test process into a temporary folder.
"""

from __future__ import annotations

import atexit
import gzip
import io
import os
import pickle
import shutil
import struct
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest

_FORCE_GENERATED = os.environ.get("MLIT_TEST_GENERATED") == "1"
_CANDIDATES = [
    Path(os.environ["MLIT_TEST_DATA"]) if os.environ.get("MLIT_TEST_DATA") else None,
    Path(__file__).resolve().parents[2] / "shared" / "data",
    Path(__file__).resolve().parents[2] / "shared" / "data",
]
SHARED_DATA = None if _FORCE_GENERATED else next((d for d in _CANDIDATES if d is not None and d.is_dir()), None)

# The 1,017 / 1,000-image CIFAR-10 subset in the official pickle format (read with verify=False).
CIFAR10_MINI = None if _FORCE_GENERATED else next(
    (p for d in _CANDIDATES if d is not None for p in [d / "cifar10-mini" / "cifar-10-python-mini.tar.gz"] if p.is_file()),
    None,
)
needs_cifar10_mini = pytest.mark.skipif(
    CIFAR10_MINI is None, reason="shared/data/cifar10-mini not found beside the checkout (set MLIT_TEST_DATA)"
)
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz")
HAS_DEBIAN_FASHION_MNIST = not _FORCE_GENERATED and all((DEBIAN_FASHION_MNIST / f).is_file() for f in FASHION_FILES)

_generated: dict[str, object] = {}


def _scratch() -> Path:
    """One temporary folder per test process for generated files, removed at exit."""
    if "dir" not in _generated:
        path = Path(tempfile.mkdtemp(prefix="mlit-test-data-"))
        atexit.register(shutil.rmtree, path, ignore_errors=True)
        _generated["dir"] = path
    return _generated["dir"]


def synthetic_images(n: int, num_classes: int, size: int, channels: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n learnable uint8 images (n, channels, size, size) and int64 labels (n,) in 0..num_classes-1.

    Class c: a colour (grey level) and a stripe pattern of its own orientation and frequency; each
    image adds a random phase, a brightness shift and pixel noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    proto = np.random.default_rng(1234)  # the same classes in every split
    colours = proto.uniform(40, 215, (num_classes, channels))
    angles = proto.uniform(0, np.pi, num_classes)
    freqs = proto.uniform(0.25, 0.9, num_classes)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    images = np.empty((n, channels, size, size), dtype=np.uint8)
    for i, c in enumerate(labels):
        wave = np.sin(freqs[c] * (np.cos(angles[c]) * xx + np.sin(angles[c]) * yy) + rng.uniform(0, 2 * np.pi))
        img = colours[c][:, None, None] + 45 * wave[None] + rng.normal(0, 20, (channels, size, size))
        images[i] = np.clip(img + rng.normal(0, 15), 0, 255).astype(np.uint8)
    return images, labels.astype(np.int64)


def write_cifar10(folder: Path, n_train: int = 1000, n_test: int = 500) -> Path:
    """``folder/cifar-10-python.tar.gz`` as the official archive lays it out (python pickles,
    protocol 2, keys batch_label / labels / data / filenames; data uint8 (N, 3072) channel-major),
    holding ``batches.meta``, ``data_batch_1`` and ``test_batch`` only."""
    archive = folder / "cifar-10-python.tar.gz"
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    members = {"batches.meta": {"num_cases_per_batch": 10000, "label_names": names, "num_vis": 3072}}
    for member, n, seed in (("data_batch_1", n_train, 1), ("test_batch", n_test, 2)):
        images, labels = synthetic_images(n, 10, 32, 3, seed)
        members[member] = {"batch_label": f"generated {member}", "labels": labels.tolist(),
                           "data": images.reshape(n, 3072), "filenames": [f"gen_{i:05d}.png" for i in range(n)]}
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
        for member, content in members.items():
            data = pickle.dumps(content, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{member}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return archive


def idx_bytes(array: np.ndarray) -> bytes:
    """An unsigned-byte idx file (MNIST format): magic 0x0000080N, big-endian dims, the data."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_fashion_mnist(folder: Path, n_train: int = 1000, n_test: int = 500) -> Path:
    """The four Fashion-MNIST idx ``.gz`` files (official names) with generated 28×28 grey images."""
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", n_train, 3), ("t10k", n_test, 4)):
        images, labels = synthetic_images(n, 10, 28, 1, seed)
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images[:, 0]), 1))
        (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels.astype(np.uint8)), 1))
    return folder


def fashion_mnist() -> tuple[Path, bool]:
    """(folder, verify): Debian's Fashion-MNIST with md5 checks, or generated files without."""
    if HAS_DEBIAN_FASHION_MNIST:
        return DEBIAN_FASHION_MNIST, True
    if "fashion" not in _generated:
        _generated["fashion"] = write_fashion_mnist(_scratch() / "fashion_mnist")
    return _generated["fashion"], False


def __getattr__(name: str):
    if name == "CIFAR10_ARCHIVE":  # generated on first import of the name, when the real subset is absent
        if CIFAR10_MINI is not None:
            return CIFAR10_MINI
        if "cifar10" not in _generated:
            _generated["cifar10"] = write_cifar10(_scratch() / "cifar10")
        return _generated["cifar10"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
