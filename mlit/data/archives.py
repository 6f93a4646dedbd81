"""Official data-set files: md5 checks, download, and readers of the published formats.

Every reader returns numpy arrays ``images`` uint8 (N, C, H, W) and ``labels`` int64 (N,).
Any failure (missing file, wrong md5, truncated or corrupt content) raises :class:`DataError`
naming the file; errors from pickle/scipy/tarfile/PIL are chained, never leaked.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import pickle
import tarfile
import urllib.request
import zlib
from pathlib import Path

import numpy as np

from ..atomic import atomic_write

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct


class DataError(Exception):
    """A data-set file is missing, corrupt or not the expected one (the message says how to fix it)."""


def md5_bytes(data: bytes) -> str:
    """Hex md5 of a bytes object."""
    return hashlib.md5(data).hexdigest()


def md5_file(path: Path) -> str:
    """Hex md5 of a file, read in 1 MiB chunks."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def md5_mismatch(path: Path, actual: str, expected: tuple[str, ...], url: str) -> DataError:
    """The DataError for a file whose md5 is none of the official ones."""
    size = path.stat().st_size if path.is_file() else "?"
    return DataError(
        f"{path}: md5 {actual} ({size} bytes) is not the official md5 {' or '.join(expected)}. "
        f"The file is truncated, corrupt or not the official one: delete it and download it again "
        f"from {url} (or use download=True / --download where that host is reachable). "
        f"To read a subset or an unofficial copy on purpose, pass verify=False (--no-verify)."
    )


def check_md5(path: Path, expected: tuple[str, ...], url: str) -> None:
    """Raise DataError unless the md5 of the file at ``path`` is one of ``expected``."""
    actual = md5_file(path)
    if actual not in expected:
        raise md5_mismatch(path, actual, expected, url)


def download(url: str, dest: Path, expected_md5: tuple[str, ...]) -> Path:
    """Fetch ``url`` to ``dest`` atomically (temp file + os.replace) after an md5 check."""

    def fetch(out) -> None:
        digest = hashlib.md5()
        with urllib.request.urlopen(url, timeout=60) as response:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                out.write(chunk)
                digest.update(chunk)
        if digest.hexdigest() not in expected_md5:
            raise DataError(
                f"download of {url} gave md5 {digest.hexdigest()}, expected {' or '.join(expected_md5)}; "
                f"nothing was written to {dest}. Try again, or fetch the file by hand and pass --data-dir."
            )

    try:
        return atomic_write(dest, fetch)
    except OSError as err:  # urllib.error.URLError is an OSError
        raise DataError(
            f"cannot download {url} to {dest}: {err}. Without a network, fetch the file elsewhere "
            f"and pass --data-dir DIR (or set MLIT_DATA_DIR) to the folder holding it."
        ) from err


class _NumpyUnpickler(pickle.Unpickler):
    """Unpickler that only builds numpy arrays and plain containers (the CIFAR pickles need no more)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # bytes in protocol-2 pickles written by Python 3
    }

    def find_class(self, module: str, name: str):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"unexpected global {module}.{name} in a CIFAR pickle") from None


def _cifar_batch(data: bytes, where: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Decode one CIFAR pickle (keys ``data`` (N, 3072) uint8 and ``label_key``) to (N,3,32,32), (N,)."""
    try:
        batch = _NumpyUnpickler(io.BytesIO(data), encoding="latin1").load()
        images = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except Exception as err:  # pickle/numpy raise many types on corrupt input
        raise DataError(f"{where}: not a readable CIFAR python batch ({type(err).__name__}: {err})") from err
    if len(images) != len(labels):
        raise DataError(f"{where}: {len(images)} images but {len(labels)} labels")
    return images, labels


def read_cifar(
    source: Path,
    folder: str,
    members: tuple[str, ...],
    label_key: str,
    member_md5: dict[str, str] | None,
    url: str,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read CIFAR batches ``members`` from a tar.gz archive or an extracted folder.

    ``source`` is the archive (members under ``folder/``) or the extracted folder itself.
    ``member_md5`` (extracted folders only): official md5 per member, checked when given;
    ``url`` is named in error messages.
    Absent members are skipped; at least one must be present.
    Returns images uint8 (N, 3, 32, 32), labels int64 (N,), and the names of the absent members.
    """
    blobs: dict[str, bytes] = {}
    if source.is_dir():
        for member in members:
            path = source / member
            if path.is_file():
                blobs[member] = path.read_bytes()
                if member_md5 is not None and md5_bytes(blobs[member]) != member_md5[member]:
                    raise md5_mismatch(path, md5_bytes(blobs[member]), (member_md5[member],), url)
    else:
        wanted = {f"{folder}/{m}": m for m in members}
        try:
            with tarfile.open(source, "r:*") as tar:
                for info in tar:
                    if info.name in wanted and info.isfile():
                        blobs[wanted[info.name]] = tar.extractfile(info).read()
        except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
            raise DataError(
                f"{source}: cannot read this tar archive ({type(err).__name__}: {err}); it is truncated or "
                f"corrupt. Delete it and download it again."
            ) from err
    missing = [m for m in members if m not in blobs]
    if not blobs:
        raise DataError(
            f"{source}: none of the batches {', '.join(members)} found "
            f"(expected {'files' if source.is_dir() else f'members {folder}/...'} with these names)"
        )
    parts = [_cifar_batch(blobs[m], f"{source}:{m}", label_key) for m in members if m in blobs]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), missing


def _loadmat(path: Path) -> dict:
    import scipy.io

    try:
        return scipy.io.loadmat(path)
    except Exception as err:  # scipy raises ValueError/MatReadError/TypeError/... on corrupt input
        raise DataError(f"{path}: not a readable MATLAB .mat file ({type(err).__name__}: {err})") from err


def _mat_field(mat: dict, key: str, path: Path) -> np.ndarray:
    if key not in mat:
        raise DataError(f"{path}: no variable {key!r} (has {sorted(k for k in mat if not k.startswith('__'))})")
    return mat[key]


def read_svhn(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """SVHN ``*_32x32.mat``: ``X`` (32, 32, 3, N) uint8, ``y`` (N, 1) in 1..10 with 10 = digit 0.

    Returns images uint8 (N, 3, 32, 32) and labels int64 (N,) in 0..9 (10 mapped to 0).
    """
    mat = _loadmat(path)
    x, y = _mat_field(mat, "X", path), _mat_field(mat, "y", path).reshape(-1)
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != len(y):
        raise DataError(f"{path}: X has shape {x.shape}, y {len(y)} entries; expected (32, 32, 3, N) and N")
    if len(y) and (y.min() < 1 or y.max() > 10):
        raise DataError(f"{path}: labels span {y.min()}..{y.max()}, expected 1..10")
    images = np.ascontiguousarray(x.transpose(3, 2, 0, 1), dtype=np.uint8)
    return images, (y.astype(np.int64) % 10)


def read_flowers(
    images_tgz: Path, labels_mat: Path, setid_mat: Path, split_key: str, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Flowers102: ``jpg/image_%05d.jpg`` in ``102flowers.tgz``; ``labels`` (1..102) and 1-based split ids.

    Each JPEG is decoded with PIL in draft mode (DCT-domain downscale to no less than 2*size px),
    converted to RGB and resized to size x size with PIL bilinear (antialiased; aspect not kept).
    Returns images uint8 (N, 3, size, size) in split-id order and labels int64 (N,) in 0..101.
    """
    from PIL import Image

    labels = _mat_field(_loadmat(labels_mat), "labels", labels_mat).reshape(-1).astype(np.int64)
    ids = _mat_field(_loadmat(setid_mat), split_key, setid_mat).reshape(-1).astype(np.int64)
    if len(ids) and (ids.min() < 1 or ids.max() > len(labels)):
        raise DataError(f"{setid_mat}: {split_key} ids span {ids.min()}..{ids.max()}, labels has {len(labels)}")
    position = {f"jpg/image_{i:05d}.jpg": k for k, i in enumerate(ids)}
    images = np.zeros((len(ids), size, size, 3), dtype=np.uint8)
    found = np.zeros(len(ids), dtype=bool)
    try:
        with tarfile.open(images_tgz, "r:*") as tar:
            for info in tar:
                k = position.get(info.name)
                if k is None or not info.isfile():
                    continue
                with Image.open(io.BytesIO(tar.extractfile(info).read())) as im:
                    im.draft("RGB", (2 * size, 2 * size))
                    im = im.convert("RGB").resize((size, size), Image.BILINEAR)
                images[k] = np.asarray(im)
                found[k] = True
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:  # PIL's decode errors are OSErrors
        raise DataError(
            f"{images_tgz}: cannot read the Flowers102 image archive ({type(err).__name__}: {err}); "
            f"it is truncated or corrupt. Delete it and download it again."
        ) from err
    if not found.all():
        first = int(ids[~found][0])
        raise DataError(f"{images_tgz}: {int((~found).sum())} images of split {split_key!r} missing, e.g. "
                        f"jpg/image_{first:05d}.jpg")
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2)), labels[ids - 1] - 1


def read_idx_gz(path: Path, expected_md5: tuple[str, ...] | None, url: str) -> np.ndarray:
    """A gzip'd idx file (MNIST format) as a uint8 array of the shape in its header.

    ``expected_md5``: accepted md5s of either the .gz file or its decompressed content
    (Debian re-compresses the .gz files); None skips the check.
    """
    raw = path.read_bytes()
    try:
        data = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: not a complete gzip file ({type(err).__name__}: {err}); "
                        f"delete it and fetch it again") from err
    if expected_md5 is not None and md5_bytes(raw) not in expected_md5 and md5_bytes(data) not in expected_md5:
        raise md5_mismatch(path, md5_bytes(raw), expected_md5, url)
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte idx file (header {data[:4].hex()})")
    ndim = data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(data) != offset + int(np.prod(dims)):
        raise DataError(f"{path}: header says shape {dims} but holds {len(data) - offset} bytes of data")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)
