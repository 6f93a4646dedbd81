"""Data sets: real cifar10-mini and Fashion-MNIST, tiny files in the published formats, bad input."""

import dataclasses
import gzip
import hashlib
import io
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mlit.data import DATASETS, DataError, load_split
from mlit.data import datasets as D
from mlit.data.archives import read_idx_gz

from shared_data import CIFAR10_MINI as MINI
from shared_data import needs_cifar10_mini as needs_mini
from shared_data import CIFAR10_ARCHIVE as ARCHIVE
from shared_data import write_cifar10, write_fashion_mnist
FASHION = D.DEBIAN_FASHION_MNIST
needs_fashion = pytest.mark.skipif(
    not (FASHION / "train-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST absent: apt-get install dataset-fashion-mnist",
)
MINI_TRAIN_COUNTS = [103, 113, 102, 94, 103, 86, 109, 102, 101, 104]


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("MLIT_DATA_DIR", raising=False)
    monkeypatch.delenv("MLIT_CACHE_DIR", raising=False)


def _raw_cifar(archive: Path, member: str) -> dict:
    with tarfile.open(archive) as tar:
        return pickle.load(tar.extractfile(f"cifar-10-batches-py/{member}"), encoding="latin1")


def _check_imageset(ds, n, size, classes):
    assert ds.images.shape == (n, 3, size, size) and ds.images.dtype == torch.uint8
    assert ds.images.is_contiguous() and ds.images.device.type == "cpu"
    assert ds.labels.shape == (n,) and ds.labels.dtype == torch.int64
    assert ds.num_classes == classes and len(ds) == n
    assert 0 <= ds.labels.min() and ds.labels.max() < classes


# --- cifar10: the real mini subset (needs_mini), else the official format written by the tests ---


@needs_mini
def test_cifar10_mini_archive(tmp_path):
    with pytest.warns(UserWarning, match="data_batch_2, data_batch_3, data_batch_4, data_batch_5 are missing"):
        train = load_split("cifar10", "train", data_dir=MINI, cache_dir=tmp_path, verify=False)
    _check_imageset(train, 1017, 32, 10)
    assert torch.bincount(train.labels, minlength=10).tolist() == MINI_TRAIN_COUNTS
    raw = _raw_cifar(MINI, "data_batch_1")
    assert torch.equal(train.images[0], torch.from_numpy(raw["data"][0].reshape(3, 32, 32)))
    assert torch.equal(train.images[-1], torch.from_numpy(raw["data"][-1].reshape(3, 32, 32)))
    assert train.labels.tolist() == raw["labels"]

    test = load_split("cifar10", "test", data_dir=MINI, cache_dir=tmp_path, verify=False)
    _check_imageset(test, 1000, 32, 10)
    raw = _raw_cifar(MINI, "test_batch")
    assert torch.equal(test.images[0], torch.from_numpy(raw["data"][0].reshape(3, 32, 32)))
    assert test.labels.tolist() == raw["labels"]


def test_cifar10_extracted_folder_equals_archive(tmp_path):
    with tarfile.open(ARCHIVE) as tar:
        tar.extractall(tmp_path / "data", filter="data")
    ref = load_split("cifar10", "test", data_dir=ARCHIVE, cache_dir=tmp_path / "c1", verify=False)
    for data_dir in (tmp_path / "data", tmp_path / "data" / "cifar-10-batches-py"):  # parent or the folder itself
        ds = load_split("cifar10", "test", data_dir=data_dir, cache_dir=tmp_path / "c2", verify=False)
        assert torch.equal(ds.images, ref.images) and torch.equal(ds.labels, ref.labels)


@needs_mini
def test_cifar10_mini_verify_names_file_and_md5(tmp_path):
    with pytest.raises(DataError, match="c58f30108f718f92721af3b95e74349a") as err:
        load_split("cifar10", "train", data_dir=MINI, cache_dir=tmp_path)
    assert str(MINI) in str(err.value) and "--no-verify" in str(err.value)
    with tarfile.open(MINI) as tar:
        tar.extractall(tmp_path / "data", filter="data")
    with pytest.raises(DataError, match="data_batch_1: md5 .* official md5 c99cafc152244af753f735de768cd75f"):
        load_split("cifar10", "train", data_dir=tmp_path / "data", cache_dir=tmp_path)
    assert not list(tmp_path.glob("*.pt"))


def test_cache_is_reused_and_keyed_apart(tmp_path, monkeypatch):
    first = load_split("cifar10", "test", data_dir=ARCHIVE, cache_dir=tmp_path, verify=False)
    (cache,) = tmp_path.glob("cifar10-test-*.pt")
    assert "unverified" in cache.name and not list(tmp_path.glob(".*"))  # no temp file left behind
    official = D._cache_path(tmp_path, DATASETS["cifar10"], "test", True,
                             "|".join(DATASETS["cifar10"].split_files["test"][0].md5))
    assert official != cache and "official" in official.name

    monkeypatch.setattr(D.CifarInfo, "decode", lambda *a: pytest.fail("decoded again despite the cache"))
    again = load_split("cifar10", "test", data_dir=ARCHIVE, cache_dir=tmp_path, verify=False)
    assert torch.equal(again.images, first.images)


@needs_mini
def test_verified_read_and_cache(tmp_path, monkeypatch):
    """With the mini archive's md5 declared official: verified reads, official cache used without sources."""
    mini = dataclasses.replace(DATASETS["cifar10"], split_files={
        s: (D.OfficialFile("cifar-10-python.tar.gz", (D.md5_file(MINI),), "URL"),) for s in ("train", "test")})
    monkeypatch.setitem(DATASETS, "cifar10", mini)
    with pytest.raises(DataError, match="data_batch_2, .* official cifar10 train split are missing.*--no-verify"):
        load_split("cifar10", "train", data_dir=MINI, cache_dir=tmp_path)
    test = load_split("cifar10", "test", data_dir=MINI, cache_dir=tmp_path)
    assert len(test) == 1000 and len(list(tmp_path.glob("cifar10-test-official-*.pt"))) == 1
    monkeypatch.setattr(D.CifarInfo, "locate", lambda *a: pytest.fail("looked for sources despite the cache"))
    assert torch.equal(load_split("cifar10", "test", cache_dir=tmp_path).images, test.images)


def test_damaged_cache_is_rebuilt(tmp_path):
    first = load_split("cifar10", "test", data_dir=ARCHIVE, cache_dir=tmp_path, verify=False)
    (cache,) = tmp_path.glob("*.pt")
    cache.write_bytes(cache.read_bytes()[:1000])  # e.g. a copy cut short
    with pytest.warns(UserWarning, match="ignoring unreadable cache"):
        again = load_split("cifar10", "test", data_dir=ARCHIVE, cache_dir=tmp_path, verify=False)
    assert torch.equal(again.images, first.images)


def test_crash_while_writing_cache_leaves_nothing(tmp_path, monkeypatch):
    def crash(obj, f):
        f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(D.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        load_split("cifar10", "test", data_dir=ARCHIVE, cache_dir=tmp_path, verify=False)
    assert list(tmp_path.iterdir()) == []


def test_env_vars_give_data_and_cache_dirs(tmp_path, monkeypatch):
    shutil.copy(ARCHIVE, tmp_path / "cifar-10-python.tar.gz")  # official file name, unofficial content
    monkeypatch.setenv("MLIT_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("MLIT_CACHE_DIR", str(tmp_path / "cache"))
    assert len(load_split("cifar10", "test", verify=False)) == len(
        load_split("cifar10", "test", data_dir=ARCHIVE, cache_dir=tmp_path / "direct", verify=False))
    assert len(list((tmp_path / "cache").glob("cifar10-test-unverified-*.pt"))) == 1


# --- tiny files in the published formats ------------------------------------------------------


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_cifar100_format(tmp_path):
    rng = np.random.default_rng(0)
    data = {s: rng.integers(0, 256, (n, 3072), dtype=np.uint8) for s, n in (("train", 7), ("test", 5))}
    fine = {s: rng.integers(0, 100, len(d)).tolist() for s, d in data.items()}
    with tarfile.open(tmp_path / "cifar-100-python.tar.gz", "w:gz") as tar:
        for s in data:
            batch = {"filenames": [f"x{i}.png" for i in range(len(data[s]))], "batch_label": f"{s} batch",
                     "fine_labels": fine[s], "coarse_labels": [f // 5 for f in fine[s]], "data": data[s]}
            _add(tar, f"cifar-100-python/{s}", pickle.dumps(batch, protocol=2))
        _add(tar, "cifar-100-python/meta", pickle.dumps({"fine_label_names": [], "coarse_label_names": []}))
    for split in ("train", "test"):
        ds = load_split("cifar100", split, data_dir=tmp_path, cache_dir=tmp_path / "cache", verify=False)
        _check_imageset(ds, len(data[split]), 32, 100)
        assert ds.labels.tolist() == fine[split]
        assert torch.equal(ds.images, torch.from_numpy(data[split]).view(-1, 3, 32, 32))
    with pytest.raises(DataError, match="eb9058c3a382ffc7106e4002c42a8d85") as err:
        load_split("cifar100", "train", data_dir=tmp_path, cache_dir=tmp_path / "cache")
    assert str(tmp_path / "cifar-100-python.tar.gz") in str(err.value)


def _svhn_mat(path: Path, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    import scipy.io

    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    y = rng.integers(1, 11, (n, 1)).astype(np.uint8)
    y[0] = 10  # the digit 0
    scipy.io.savemat(path, {"X": x, "y": y})
    return x, y


def test_svhn_format(tmp_path):
    x, y = _svhn_mat(tmp_path / "train_32x32.mat", 9, 0)
    ds = load_split("svhn", "train", data_dir=tmp_path, cache_dir=tmp_path / "cache", verify=False)
    _check_imageset(ds, 9, 32, 10)
    assert ds.labels[0] == 0 and ds.labels.tolist() == (y[:, 0] % 10).tolist()
    assert ds.images[4, 2, 7, 11] == x[7, 11, 2, 4]  # X[h, w, c, n] -> images[n, c, h, w]
    assert torch.equal(ds.images, torch.from_numpy(x).permute(3, 2, 0, 1))
    with pytest.raises(DataError, match="e26dedcc434d2e4c54c9b2d4a06d8373") as err:
        load_split("svhn", "train", data_dir=tmp_path, cache_dir=tmp_path / "cache")
    assert str(tmp_path / "train_32x32.mat") in str(err.value)


def test_flowers102_format(tmp_path):
    import scipy.io
    from PIL import Image

    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (250, 250, 0), (0, 250, 250), (120, 120, 120)]
    labels = np.array([[5, 1, 102, 7, 7, 3]], dtype=np.uint8)
    with tarfile.open(tmp_path / "102flowers.tgz", "w:gz") as tar:
        for i, colour in enumerate(colours, start=1):
            buf = io.BytesIO()
            Image.new("RGB", (60 + 10 * i, 50), colour).save(buf, format="JPEG", quality=95)
            _add(tar, f"jpg/image_{i:05d}.jpg", buf.getvalue())
    scipy.io.savemat(tmp_path / "imagelabels.mat", {"labels": labels})
    split_ids = {"train": [2, 4], "val": [1, 6], "test": [5, 3]}
    scipy.io.savemat(tmp_path / "setid.mat", {"trnid": np.array([split_ids["train"]], np.uint16),
                                              "valid": np.array([split_ids["val"]], np.uint16),
                                              "tstid": np.array([split_ids["test"]], np.uint16)})
    for split, ids in split_ids.items():
        ds = load_split("flowers102", split, data_dir=tmp_path, cache_dir=tmp_path / "cache", verify=False)
        _check_imageset(ds, 2, 36, 102)
        assert ds.labels.tolist() == [labels[0, i - 1] - 1 for i in ids]
        expected = torch.tensor([colours[i - 1] for i in ids], dtype=torch.float32)
        assert (ds.images.float().mean((2, 3)) - expected).abs().max() < 4  # solid colours survive JPEG
    with pytest.raises(DataError, match="52808999861908f626f3c1f4e79d11fa") as err:
        load_split("flowers102", "val", data_dir=tmp_path, cache_dir=tmp_path / "cache")
    assert str(tmp_path / "102flowers.tgz") in str(err.value)


def _idx_gz(path: Path, array: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.tobytes()))
    return header + array.tobytes()


def test_idx_reader_checks(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = _idx_gz(tmp_path / "a.gz", array)
    assert np.array_equal(read_idx_gz(tmp_path / "a.gz", None, "URL"), array)
    gz_md5 = D.md5_file(tmp_path / "a.gz")  # the .gz md5 or the decompressed md5 are both accepted
    assert np.array_equal(read_idx_gz(tmp_path / "a.gz", (gz_md5,), "URL"), array)
    assert np.array_equal(read_idx_gz(tmp_path / "a.gz", (hashlib.md5(raw).hexdigest(),), "URL"), array)
    with pytest.raises(DataError, match=r"a.gz: md5 .* official md5 0123"):
        read_idx_gz(tmp_path / "a.gz", ("0123",), "URL")
    (tmp_path / "b.gz").write_bytes((tmp_path / "a.gz").read_bytes()[:-9])
    with pytest.raises(DataError, match="b.gz: not a complete gzip file"):
        read_idx_gz(tmp_path / "b.gz", None, "URL")
    (tmp_path / "c.gz").write_bytes(gzip.compress(raw[:-3]))
    with pytest.raises(DataError, match=r"c.gz: header says shape \(2, 3, 4\)"):
        read_idx_gz(tmp_path / "c.gz", None, "URL")


# --- real data: Fashion-MNIST (Debian package) ------------------------------------------------


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    """Both splits, found in Debian's folder without a data dir, decoded once into a tmp cache."""
    cache = tmp_path_factory.mktemp("fashion-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLIT_DATA_DIR", raising=False)
        return {s: load_split("fashion_mnist", s, cache_dir=cache) for s in ("train", "test")}, cache


@needs_fashion
def test_fashion_mnist(fashion):
    splits, cache = fashion
    for split, n in (("train", 60000), ("test", 10000)):
        ds = splits[split]
        _check_imageset(ds, n, 28, 10)
        assert torch.bincount(ds.labels).tolist() == [n // 10] * 10
        prefix = "train" if split == "train" else "t10k"
        with gzip.open(FASHION / f"{prefix}-images-idx3-ubyte.gz") as f:
            first = np.frombuffer(f.read(16 + 784)[16:], np.uint8).reshape(28, 28).copy()
        with gzip.open(FASHION / f"{prefix}-labels-idx1-ubyte.gz") as f:
            assert ds.labels[:20].tolist() == list(f.read(8 + 20)[8:])
        assert torch.equal(ds.images[0], torch.from_numpy(first).expand(3, 28, 28))
    assert sorted(p.name.split("-")[2] for p in cache.glob("*.pt")) == ["official", "official"]


@needs_fashion
def test_fashion_mnist_wrong_md5(tmp_path):
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(FASHION / name, tmp_path / name)
    labels = tmp_path / "t10k-labels-idx1-ubyte.gz"
    content = bytearray(gzip.decompress(labels.read_bytes()))
    content[100] = (content[100] + 1) % 10  # one label changed
    labels.write_bytes(gzip.compress(bytes(content)))
    expected = "t10k-labels-idx1-ubyte.gz: md5 .* bb300cfdad3c16e7a12a480ee83cd310 or 15d484375f8d13e6eb1aabb0c3f46965"
    with pytest.raises(DataError, match=expected):
        load_split("fashion_mnist", "test", data_dir=tmp_path, cache_dir=tmp_path / "cache")
    unverified = load_split("fashion_mnist", "test", data_dir=tmp_path, cache_dir=tmp_path / "cache", verify=False)
    assert len(unverified) == 10000 and unverified.labels[100 - 8] == content[100]  # idx header: 8 bytes


# --- bad input --------------------------------------------------------------------------------


def test_unknown_name_or_split(tmp_path):
    with pytest.raises(ValueError, match="unknown data set 'imagenet'; choose one of cifar10, cifar100, svhn"):
        load_split("imagenet", "train", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="cifar10 has no split 'val'; choose one of train, test"):
        load_split("cifar10", "val", cache_dir=tmp_path)


def test_missing_data_dir_and_files(tmp_path):
    with pytest.raises(DataError, match=f"data dir {tmp_path / 'nope'} does not exist"):
        load_split("cifar10", "train", data_dir=tmp_path / "nope", cache_dir=tmp_path)
    with pytest.raises(DataError, match="cifar10 train: cannot find cifar-10-python.tar.gz") as err:
        load_split("cifar10", "train", data_dir=tmp_path, cache_dir=tmp_path / "cache")
    message = str(err.value)
    assert str(tmp_path) in message and "MLIT_DATA_DIR" in message and "--data-dir" in message
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in message and "download=True" in message


def test_truncated_archive(tmp_path):
    broken = tmp_path / "cifar-10-python.tar.gz"
    broken.write_bytes(ARCHIVE.read_bytes()[: ARCHIVE.stat().st_size // 2])
    with pytest.raises(DataError, match="truncated or corrupt") as err:
        load_split("cifar10", "test", data_dir=tmp_path, cache_dir=tmp_path / "cache", verify=False)
    assert str(broken) in str(err.value) and err.value.__cause__ is not None
    with pytest.raises(DataError, match=f"{broken}: md5 .* \\({broken.stat().st_size} bytes\\)"):
        load_split("cifar10", "test", data_dir=tmp_path, cache_dir=tmp_path / "cache")


def test_corrupt_mat_file(tmp_path):
    (tmp_path / "test_32x32.mat").write_bytes(b"MATLAB 5.0 MAT-file" + bytes(200))
    with pytest.raises(DataError, match="test_32x32.mat: not a readable MATLAB .mat file"):
        load_split("svhn", "test", data_dir=tmp_path, cache_dir=tmp_path / "cache", verify=False)


# --- download ---------------------------------------------------------------------------------


def _file_url_svhn(tmp_path: Path, md5: str | None = None) -> D.SvhnInfo:
    _svhn_mat(tmp_path / "served.mat", 4, 1)
    md5 = md5 or D.md5_file(tmp_path / "served.mat")
    return D.SvhnInfo("svhn", 10, 32, {"test": (D.OfficialFile("test_32x32.mat", (md5,),
                                                               (tmp_path / "served.mat").as_uri()),)})


def test_download_from_url(tmp_path, monkeypatch):
    monkeypatch.setitem(DATASETS, "svhn", _file_url_svhn(tmp_path))
    ds = load_split("svhn", "test", cache_dir=tmp_path / "cache", download=True)
    assert len(ds) == 4
    assert (tmp_path / "cache" / "downloads" / "svhn" / "test_32x32.mat").is_file()


def test_download_with_wrong_md5_keeps_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(DATASETS, "svhn", _file_url_svhn(tmp_path, md5="0" * 32))
    with pytest.raises(DataError, match="served.mat gave md5 .*, expected 0000"):
        load_split("svhn", "test", cache_dir=tmp_path / "cache", download=True)
    assert list((tmp_path / "cache" / "downloads" / "svhn").iterdir()) == []


def test_download_unreachable(tmp_path, monkeypatch):
    info = D.SvhnInfo("svhn", 10, 32, {"test": (D.OfficialFile("test_32x32.mat", ("0" * 32,),
                                                               (tmp_path / "absent.mat").as_uri()),)})
    monkeypatch.setitem(DATASETS, "svhn", info)
    with pytest.raises(DataError, match="cannot download .*absent.mat .*--data-dir"):
        load_split("svhn", "test", cache_dir=tmp_path / "cache", download=True)


# --- an explicit data dir is what is read; generated files in the official formats -------------


def _declare_official(monkeypatch, archive: Path) -> None:
    """Make ``archive``'s md5 the official one of cifar10 (both splits), as for a real download."""
    official = dataclasses.replace(DATASETS["cifar10"], split_files={
        s: (D.OfficialFile("cifar-10-python.tar.gz", (D.md5_file(archive),), "URL"),) for s in ("train", "test")})
    monkeypatch.setitem(DATASETS, "cifar10", official)


def test_explicit_data_dir_is_honoured_over_a_verified_cache(tmp_path, monkeypatch):
    good = write_cifar10(tmp_path / "good", n_train=20, n_test=30)
    _declare_official(monkeypatch, good)
    cache = tmp_path / "cache"
    first = load_split("cifar10", "test", data_dir=good, cache_dir=cache)
    assert len(list(cache.glob("cifar10-test-official-*.pt"))) == 1
    # the same files again: the cache is used, not decoded again
    monkeypatch.setattr(D.CifarInfo, "decode", lambda *a: pytest.fail("decoded again despite the cache"))
    assert torch.equal(load_split("cifar10", "test", data_dir=good, cache_dir=cache).images, first.images)
    monkeypatch.undo()
    _declare_official(monkeypatch, good)
    # another copy in an explicit data dir is read (and md5-checked), never replaced by the cache
    other = write_cifar10(tmp_path / "other", n_train=20, n_test=12)
    with pytest.raises(DataError, match=f"{other}: md5"):
        load_split("cifar10", "test", data_dir=other.parent, cache_dir=cache)
    assert len(load_split("cifar10", "test", data_dir=other, cache_dir=cache, verify=False)) == 12
    # a data dir without the files is an error, even with a verified cache at hand
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="cannot find cifar-10-python.tar.gz; looked in .*empty"):
        load_split("cifar10", "test", data_dir=tmp_path / "empty", cache_dir=cache)
    # without a data dir, the verified cache stands for the official files
    assert torch.equal(load_split("cifar10", "test", cache_dir=cache).images, first.images)


def test_generated_files_are_in_the_official_formats(tmp_path):
    archive = write_cifar10(tmp_path / "c", n_train=40, n_test=30)
    with pytest.warns(UserWarning, match="data_batch_2, .* missing"):
        train = load_split("cifar10", "train", data_dir=archive, cache_dir=tmp_path / "cache", verify=False)
    _check_imageset(train, 40, 32, 10)
    raw = _raw_cifar(archive, "test_batch")
    test = load_split("cifar10", "test", data_dir=archive, cache_dir=tmp_path / "cache", verify=False)
    assert torch.equal(test.images[3], torch.from_numpy(raw["data"][3].reshape(3, 32, 32)))
    assert test.labels.tolist() == raw["labels"]
    folder = write_fashion_mnist(tmp_path / "f", n_train=50, n_test=20)
    fm = load_split("fashion_mnist", "test", data_dir=folder, cache_dir=tmp_path / "cache", verify=False)
    _check_imageset(fm, 20, 28, 10)
    assert torch.equal(fm.images[:, 0], fm.images[:, 2])  # grey, replicated
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz: md5 .*--no-verify"):
        load_split("fashion_mnist", "test", data_dir=folder, cache_dir=tmp_path / "cache")
    assert ARCHIVE.is_file()  # the real subset, or a generated archive: never absent


def test_class_names_match_the_classes():
    from mlit.data.datasets import CLASS_NAMES

    for name, info in DATASETS.items():
        assert len(CLASS_NAMES[name]) == info.num_classes == len(set(CLASS_NAMES[name])), name
    if MINI is not None:  # the official batches.meta of the real subset
        with tarfile.open(MINI) as tar:
            meta = pickle.load(tar.extractfile("cifar-10-batches-py/batches.meta"), encoding="latin1")
        assert tuple(meta["label_names"]) == CLASS_NAMES["cifar10"]
