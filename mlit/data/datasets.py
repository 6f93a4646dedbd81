"""The registry of data sets and ``load_split``: find the official files, verify, decode once, cache.

Where files are looked for:
  * with a ``data_dir`` (argument, else ``$MLIT_DATA_DIR``): there only (and in
    ``<cache_dir>/downloads/<name>/`` with ``download=True``) — in it and in its subfolder named
    after the data set (``cifar10``, ``svhn``, ...), by the official file names; for CIFAR also
    the extracted folder (``cifar-10-batches-py`` / ``cifar-100-python``), or ``data_dir`` itself
    when it *is* a CIFAR archive (any file name) or an extracted CIFAR folder;
  * without one: Debian's ``/usr/share/datasets/fashion-mnist`` (Fashion-MNIST only), then
    ``<cache_dir>/downloads/<name>/``, where ``download=True`` stores official downloads.

The decoded split is cached as ``<cache_dir>/<name>-<split>-official-<hash>.pt`` (verified: keyed
by the official md5s) or ``...-unverified-<hash>.pt`` (``verify=False``: keyed by the md5 of the
files actually read), written atomically. Without a data_dir a verified cache is reused without
touching the sources; with one, only if it was decoded from files with the same md5s (an explicit
data_dir is always what is read).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_write
from .archives import DataError, check_md5, md5_file, read_cifar, read_flowers, read_idx_gz, read_svhn
from .archives import download as download_file

_CACHE_VERSION = 1
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@dataclass
class ImageSet:
    """A decoded split: ``images`` uint8 (N, 3, H, W) contiguous CPU, ``labels`` int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    name: str

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class OfficialFile:
    """A published file: its official name, accepted md5s and download URL."""

    name: str
    md5: tuple[str, ...]
    url: str


@dataclass(frozen=True)
class DatasetInfo:
    """A data set: classes, stored image side, splits, and the official files each split reads."""

    name: str
    num_classes: int
    size: int
    split_files: dict[str, tuple[OfficialFile, ...]]

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.split_files)

    def locate(self, split: str, dirs: list[Path]) -> dict[str, Path]:
        """Path of each file of ``split`` found in ``dirs`` (or ``dir/<name>``), keyed by official name."""
        found = {}
        for file in self.split_files[split]:
            for d in dirs:
                hit = next((p for p in (d / file.name, d / self.name / file.name) if p.exists()), None)
                if hit is not None:
                    found[file.name] = hit
                    break
        return found

    def decode(self, paths: dict[str, Path], split: str, verify: bool) -> tuple[np.ndarray, np.ndarray]:
        """Images uint8 (N, C, size, size) and labels int64 (N,) of ``split`` from located ``paths``."""
        raise NotImplementedError

    def _checked(self, paths: dict[str, Path], split: str, verify: bool) -> dict[str, Path]:
        """``paths`` after an md5 check of each file of ``split`` when ``verify``."""
        if verify:
            for file in self.split_files[split]:
                check_md5(paths[file.name], file.md5, file.url)
        return paths


@dataclass(frozen=True)
class CifarInfo(DatasetInfo):
    """CIFAR-10/100 python pickles, read from the tarball or from its extracted folder."""

    folder: str
    members: dict[str, tuple[str, ...]]
    member_md5: dict[str, str]
    label_key: str

    def locate(self, split: str, dirs: list[Path]) -> dict[str, Path]:
        archive = self.split_files[split][0].name
        for d in dirs:
            if d.is_file() or self._is_extracted(d):
                return {archive: d}
            for sub in (d, d / self.name):
                for cand in (sub / archive, sub / self.folder):
                    if cand.is_file() or self._is_extracted(cand):
                        return {archive: cand}
        return {}

    def _is_extracted(self, d: Path) -> bool:
        return d.is_dir() and any((d / m).is_file() for ms in self.members.values() for m in ms)

    def decode(self, paths, split, verify):
        file = self.split_files[split][0]
        source = paths[file.name]
        if verify and source.is_file():
            check_md5(source, file.md5, file.url)
        member_md5 = self.member_md5 if verify else None
        images, labels, missing = read_cifar(
            source, self.folder, self.members[split], self.label_key, member_md5, file.url
        )
        if missing:
            if verify:
                raise DataError(
                    f"{source}: batches {', '.join(missing)} of the official {self.name} {split} split are "
                    f"missing. Extract the official {file.name} again, or pass verify=False (--no-verify) "
                    f"to train on the batches present."
                )
            warnings.warn(f"{source}: {self.name} {split}: batches {', '.join(missing)} are missing; "
                          f"using the {len(labels)} images of the batches present", stacklevel=3)
        return images, labels


@dataclass(frozen=True)
class SvhnInfo(DatasetInfo):
    """SVHN cropped digits, ``train_32x32.mat`` / ``test_32x32.mat`` (no ``extra``)."""

    def decode(self, paths, split, verify):
        (path,) = self._checked(paths, split, verify).values()
        return read_svhn(path)


@dataclass(frozen=True)
class FlowersInfo(DatasetInfo):
    """Oxford Flowers102: ``102flowers.tgz`` + ``imagelabels.mat`` + ``setid.mat``, resized at decode."""

    def decode(self, paths, split, verify):
        paths = self._checked(paths, split, verify)
        key = {"train": "trnid", "val": "valid", "test": "tstid"}[split]
        return read_flowers(paths["102flowers.tgz"], paths["imagelabels.mat"], paths["setid.mat"], key, self.size)


@dataclass(frozen=True)
class FashionInfo(DatasetInfo):
    """Fashion-MNIST idx ``.gz`` files; md5 of either the .gz or its decompressed content is accepted."""

    def decode(self, paths, split, verify):
        images_file, labels_file = self.split_files[split]
        images = read_idx_gz(paths[images_file.name], images_file.md5 if verify else None, images_file.url)
        labels = read_idx_gz(paths[labels_file.name], labels_file.md5 if verify else None, labels_file.url)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"{paths[images_file.name]}: images {images.shape} do not match labels {labels.shape} "
                            f"of {paths[labels_file.name]}")
        return images[:, None], labels.astype(np.int64)


def _cifar(name, classes, archive, md5, folder, members, member_md5, label_key) -> CifarInfo:
    url = f"https://www.cs.toronto.edu/~kriz/{archive}"
    file = (OfficialFile(archive, (md5,), url),)
    return CifarInfo(name, classes, 32, {s: file for s in members}, folder, members, member_md5, label_key)


_SVHN = "http://ufldl.stanford.edu/housenumbers/"
_FLOWERS = "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"
_FASHION = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_FLOWER_FILES = tuple(
    OfficialFile(n, (m,), _FLOWERS + n)
    for n, m in (("102flowers.tgz", "52808999861908f626f3c1f4e79d11fa"),
                 ("imagelabels.mat", "e0620be6f572b9609742df49c70aed4d"),
                 ("setid.mat", "a5357ecc9cb78c4bef273ce3793fc85c"))
)


def _fashion(prefix: str, images_md5: tuple[str, str], labels_md5: tuple[str, str]) -> tuple[OfficialFile, ...]:
    return (OfficialFile(f"{prefix}-images-idx3-ubyte.gz", images_md5, f"{_FASHION}{prefix}-images-idx3-ubyte.gz"),
            OfficialFile(f"{prefix}-labels-idx1-ubyte.gz", labels_md5, f"{_FASHION}{prefix}-labels-idx1-ubyte.gz"))


#: The supported data sets (md5s and URLs are the ones torchvision uses).
DATASETS: dict[str, DatasetInfo] = {
    "cifar10": _cifar(
        "cifar10", 10, "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a", "cifar-10-batches-py",
        {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
        {"data_batch_1": "c99cafc152244af753f735de768cd75f", "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
         "data_batch_3": "54ebc095f3ab1f0389bbae665268c751", "data_batch_4": "634d18415352ddfa80567beed471001a",
         "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb", "test_batch": "40351d587109b95175f43aff81a1287e"},
        "labels",
    ),
    "cifar100": _cifar(
        "cifar100", 100, "cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85", "cifar-100-python",
        {"train": ("train",), "test": ("test",)},
        {"train": "16019d7e3df5f24257cddd939b257f8d", "test": "f0ef6b0ae62326f3e7ffdfab6717acfc"},
        "fine_labels",
    ),
    "svhn": SvhnInfo("svhn", 10, 32, {
        "train": (OfficialFile("train_32x32.mat", ("e26dedcc434d2e4c54c9b2d4a06d8373",), _SVHN + "train_32x32.mat"),),
        "test": (OfficialFile("test_32x32.mat", ("eb5a983be6a315427106f1b164d9cef3",), _SVHN + "test_32x32.mat"),),
    }),
    "flowers102": FlowersInfo("flowers102", 102, 36, {s: _FLOWER_FILES for s in ("train", "val", "test")}),
    "fashion_mnist": FashionInfo("fashion_mnist", 10, 28, {
        "train": _fashion("train", ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
                          ("25c81989df183df01b3e8a0aad5dffbe", "9018921c3c673c538a1fc5bad174d6f9")),
        "test": _fashion("t10k", ("bef4ecab320f06d8554ea6380940ec79", "8181f5470baa50b63fa0f6fddb340f0a"),
                         ("bb300cfdad3c16e7a12a480ee83cd310", "15d484375f8d13e6eb1aabb0c3f46965")),
    }),
}


#: Class names in label order: the official meta files' (CIFAR ``batches.meta`` / ``meta``, the
#: Fashion-MNIST README); SVHN labels are digits; Flowers102's official files carry numbers only.
CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    "cifar100": tuple("""apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus
        butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile
        cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower
        leopard lion lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter
        palm_tree pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket
        rose sea seal shark shrew skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper
        table tank telephone television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf
        woman worm""".split()),
    "svhn": tuple(str(d) for d in range(10)),
    "flowers102": tuple(f"class {i}" for i in range(1, 103)),  # imagelabels.mat's 1-based numbers
    "fashion_mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"),
}


#: Data sets whose images are grey (decoded with one channel, replicated to three when loaded).
GREY_DATASETS = frozenset({"fashion_mnist"})


def _search_dirs(info: DatasetInfo, data_dir: Path | None, downloads: Path, download: bool) -> list[Path]:
    if data_dir is not None:
        return [data_dir, downloads] if download else [data_dir]
    return ([DEBIAN_FASHION_MNIST] if info.name == "fashion_mnist" else []) + [downloads]


def _fingerprint(paths: dict[str, Path]) -> str:
    """md5 of the content actually read (a folder: of every file directly in it)."""
    parts = []
    for name, path in sorted(paths.items()):
        files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
        parts += [f"{name}/{p.name}:{md5_file(p)}" for p in files]
    return "|".join(parts)


def _cache_path(cache_dir: Path, info: DatasetInfo, split: str, verified: bool, identity: str) -> Path:
    material = f"v{_CACHE_VERSION}|{info.name}|{split}|{info.size}|{verified}|{identity}"
    digest = hashlib.sha1(material.encode()).hexdigest()[:16]
    return cache_dir / f"{info.name}-{split}-{'official' if verified else 'unverified'}-{digest}.pt"


def _load_cache(path: Path, fingerprint: str | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached (images, labels), or None when absent, damaged, or (with ``fingerprint``)
    decoded from other files than those."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        images, labels = blob["images"], blob["labels"]
        if images.dtype != torch.uint8 or images.ndim != 4 or labels.dtype != torch.int64 or len(labels) != len(images):
            raise ValueError(f"unexpected content {images.dtype} {tuple(images.shape)}, {labels.dtype}")
    except Exception as err:  # a damaged cache is rebuilt, never trusted
        warnings.warn(f"ignoring unreadable cache {path} ({type(err).__name__}: {err}); decoding again", stacklevel=3)
        return None
    if fingerprint is not None and blob.get("fingerprint") != fingerprint:
        return None
    return images, labels


def _save_cache(path: Path, images: torch.Tensor, labels: torch.Tensor, sources: dict[str, Path],
                fingerprint: str) -> None:
    """torch.save written atomically (temporary file, fsync, os.replace), with the md5s of its sources."""
    blob = {"images": images, "labels": labels, "sources": {k: str(v) for k, v in sources.items()},
            "fingerprint": fingerprint}
    atomic_write(path, lambda f: torch.save(blob, f))


def _missing_error(info: DatasetInfo, split: str, missing: list[OfficialFile], dirs: list[Path]) -> DataError:
    names = ", ".join(f.name for f in missing)
    urls = " ".join(f.url for f in missing)
    return DataError(
        f"{info.name} {split}: cannot find {names}; looked in {', '.join(map(str, dirs))}. "
        f"Pass --data-dir DIR (data_dir=) or set MLIT_DATA_DIR to a folder holding it (or its subfolder "
        f"{info.name}/); download it from {urls}; or use download=True (--download) where that host is reachable."
    )


def _locate(info: DatasetInfo, split: str, data_dir: Path | None, cache_dir: Path, download: bool) -> dict[str, Path]:
    """Paths of the files ``split`` reads, downloading the missing official ones if ``download``."""
    downloads = cache_dir / "downloads" / info.name
    dirs = _search_dirs(info, data_dir, downloads, download)
    paths = info.locate(split, dirs)
    missing = [f for f in info.split_files[split] if f.name not in paths]
    if missing and download:
        for file in missing:
            download_file(file.url, downloads / file.name, file.md5)
        paths = info.locate(split, dirs)
        missing = [f for f in info.split_files[split] if f.name not in paths]
    if missing:
        raise _missing_error(info, split, missing, dirs)
    return paths


def load_split(
    name: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    download: bool = False,
    verify: bool = True,
) -> ImageSet:
    """Load one split of a data set as uint8 images (N, 3, H, W) and int64 labels (N,).

    ``data_dir``: folder with the official files (default ``$MLIT_DATA_DIR``; see the module doc).
    ``cache_dir``: decoded-split cache and downloads (default ``$MLIT_CACHE_DIR``, else ``~/.cache/mlit``).
    ``download``: fetch missing official files (md5-checked) into ``<cache_dir>/downloads/<name>/``.
    ``verify``: check the official md5s; False reads any copy or subset (e.g. cifar10-mini) and caches
    it under its own key. Raises ValueError for an unknown name/split, DataError for file problems.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    info = DATASETS[name]
    if split not in info.splits:
        raise ValueError(f"{name} has no split {split!r}; choose one of {', '.join(info.splits)}")
    data_dir = data_dir if data_dir is not None else os.environ.get("MLIT_DATA_DIR") or None
    data_dir = Path(data_dir).expanduser() if data_dir is not None else None
    if data_dir is not None and not data_dir.exists():
        raise DataError(f"data dir {data_dir} does not exist (from --data-dir / data_dir= or MLIT_DATA_DIR)")
    cache_dir = Path(cache_dir or os.environ.get("MLIT_CACHE_DIR") or "~/.cache/mlit").expanduser()

    cached = paths = fingerprint = None
    if verify:
        official = "|".join(m for f in info.split_files[split] for m in f.md5)
        cache = _cache_path(cache_dir, info, split, True, official)
        if data_dir is None:  # the verified cache stands for the official files wherever they are
            cached = _load_cache(cache)
        else:  # an explicit data_dir is read: the cache counts only if decoded from these very files
            paths = _locate(info, split, data_dir, cache_dir, download)
            fingerprint = _fingerprint(paths)
            cached = _load_cache(cache, fingerprint)
    if cached is None:
        if paths is None:
            paths = _locate(info, split, data_dir, cache_dir, download)
            fingerprint = _fingerprint(paths)
        if not verify:
            cache = _cache_path(cache_dir, info, split, False, fingerprint)
            cached = _load_cache(cache)
        if cached is None:
            images, labels = info.decode(paths, split, verify)
            cached = (torch.from_numpy(np.require(images, requirements=["C", "W"])),
                      torch.from_numpy(np.require(labels, np.int64, ["C", "W"])))
            _save_cache(cache, *cached, paths, fingerprint)
    images, labels = cached
    if images.shape[1] == 1:  # grey (Fashion-MNIST) is cached once, replicated to 3 channels here
        images = images.expand(-1, 3, -1, -1)
    return ImageSet(images.contiguous(), labels.contiguous(), info.num_classes, name)
