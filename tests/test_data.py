"""Tests for mctool.data.datasets: loaders on tiny fixtures in the exact shipped formats, and ZCA maths."""

from __future__ import annotations

import dataclasses
import gzip
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mctool.data import datasets as data
from mctool.data.datasets import (
    DATASETS,
    Dataset,
    Preprocessing,
    default_data_dir,
    fit_preprocessing,
    load_dataset,
)
from mctool.core.errors import ArtifactError, DatasetNotFound, UsageError

FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _assert_one_line_not_found(err: pytest.ExceptionInfo, *needles: str) -> None:
    msg = str(err.value)
    assert "\n" not in msg
    assert "--data-dir" in msg and "MCTOOL_DATA" in msg
    for needle in needles:
        assert needle in msg, (needle, msg)


# ---------------------------------------------------------------------------------------------
# CIFAR fixtures: python pickles as torchvision extracts them (bytes keys, uint8 [N, 3072])


def _write_pickle(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def make_cifar10(root: Path, per_batch: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Write cifar-10-batches-py with `per_batch` images per file; return the arrays written."""
    folder = root / "cifar-10-batches-py"
    rng = _rng(1)
    xs, ys = [], []
    for i in range(1, 6):
        x = rng.integers(0, 256, (per_batch, 3, 32, 32), dtype=np.uint8)
        y = [(i + j) % 10 for j in range(per_batch)]
        _write_pickle(
            folder / f"data_batch_{i}",
            {b"batch_label": b"training batch", b"labels": y, b"data": x.reshape(per_batch, -1),
             b"filenames": [b"f.png"] * per_batch},
        )  # fmt: skip
        xs.append(x)
        ys += y
    tx = rng.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)
    ty = [9, 8, 7, 6]
    _write_pickle(folder / "test_batch", {b"labels": ty, b"data": tx.reshape(4, -1)})
    names = [n.encode() for n in "airplane automobile bird cat deer dog frog horse ship truck".split()]
    _write_pickle(folder / "batches.meta", {b"label_names": names, b"num_vis": 3072})
    return np.concatenate(xs), np.asarray(ys), tx, np.asarray(ty)


def make_cifar100(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """Write cifar-100-python/{train,test,meta} (meta with str keys, as the spec allows)."""
    folder = root / "cifar-100-python"
    rng = _rng(2)
    x = rng.integers(0, 256, (5, 3, 32, 32), dtype=np.uint8)
    y = [99, 0, 42, 7, 7]
    _write_pickle(folder / "train", {b"fine_labels": y, b"coarse_labels": [0] * 5, b"data": x.reshape(5, -1)})
    test = {b"fine_labels": [1, 2], b"coarse_labels": [0, 0], b"data": x[:2].reshape(2, -1)}
    _write_pickle(folder / "test", test)
    meta = {"fine_label_names": [f"c{i}" for i in range(100)], "coarse_label_names": []}
    _write_pickle(folder / "meta", meta)
    return x, np.asarray(y)


def test_cifar10_reads_batches_in_order(tmp_path: Path) -> None:
    x, y, tx, ty = make_cifar10(tmp_path)
    ds = load_dataset("cifar10", tmp_path, download=False)
    assert ds.name == "cifar10"
    assert ds.train_images.dtype == torch.uint8 and ds.train_images.shape == (15, 3, 32, 32)
    assert ds.train_labels.dtype == torch.int64
    assert np.array_equal(ds.train_images.numpy(), x) and np.array_equal(ds.train_labels.numpy(), y)
    assert np.array_equal(ds.test_images.numpy(), tx) and ds.test_labels.tolist() == ty.tolist()
    assert ds.class_names[0] == "airplane" and ds.class_names[-1] == "truck"
    assert (ds.num_classes, ds.channels, ds.height, ds.width) == (10, 3, 32, 32)
    assert ds.mean == data.CIFAR_MEAN and ds.std == data.CIFAR_STD and ds.flip


def test_cifar_also_found_when_data_dir_is_the_folder(tmp_path: Path) -> None:
    make_cifar10(tmp_path)
    ds = load_dataset("CIFAR10", tmp_path / "cifar-10-batches-py")  # alias + the folder itself
    assert ds.name == "cifar10" and len(ds.train_images) == 15


def test_cifar100_fine_labels_and_cifar10_stats(tmp_path: Path) -> None:
    x, y = make_cifar100(tmp_path)
    ds = load_dataset("cifar100", tmp_path)
    assert ds.num_classes == 100 and ds.class_names[42] == "c42"
    assert np.array_equal(ds.train_images.numpy(), x) and np.array_equal(ds.train_labels.numpy(), y)
    assert ds.test_images.shape == (2, 3, 32, 32)
    assert ds.mean == data.CIFAR_MEAN and ds.std == data.CIFAR_STD  # the reference reuses CIFAR-10's


def test_cifar_missing_is_one_line_with_url_and_path(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFound) as err:
        load_dataset("cifar10", tmp_path, download=False)
    _assert_one_line_not_found(
        err, "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", str(tmp_path / "cifar-10-batches-py")
    )
    with pytest.raises(DatasetNotFound) as err:
        load_dataset("cifar100", tmp_path)
    _assert_one_line_not_found(err, "cifar-100-python.tar.gz", str(tmp_path / "cifar-100-python"))


def test_cifar_failed_download_is_dataset_not_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets as tvd

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("network is unreachable\n(errno 101)")

    monkeypatch.setattr(tvd, "CIFAR10", offline)  # never touch the network in tests
    with pytest.raises(DatasetNotFound) as err:
        load_dataset("cifar10", tmp_path, download=True)
    _assert_one_line_not_found(err, "network is unreachable", "cifar-10-python.tar.gz")


def test_cifar_garbage_pickle_is_usage_error(tmp_path: Path) -> None:
    make_cifar10(tmp_path)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(b"not a pickle at all")
    with pytest.raises(UsageError, match="data_batch_3"):
        load_dataset("cifar10", tmp_path)


def test_cifar_pickle_with_code_is_refused(tmp_path: Path) -> None:
    make_cifar10(tmp_path)
    # A pickle that would call os.system when loaded with plain pickle.
    evil = b"cos\nsystem\n(S'echo pwned'\ntR."
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(evil)
    with pytest.raises(UsageError, match="test_batch"):
        load_dataset("cifar10", tmp_path)


# ---------------------------------------------------------------------------------------------
# Tiny ImageNet fixture: stock tiny-imagenet-200 layout, JPEGs, one greyscale


TINY_WNIDS = ["n02", "n01", "n03"]  # deliberately unsorted on creation


def _save_jpeg(path: Path, rng: np.random.Generator, grey: bool = False, size: int = 64) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if grey:
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), "L").save(path)
    else:
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB").save(path)


def make_tiny(root: Path) -> Path:
    """A miniature tiny-imagenet-200: 3 wnids x 2 train images, 4 flat val images."""
    tiny = root / "tiny-imagenet-200"
    rng = _rng(3)
    for wnid in TINY_WNIDS:
        for j in range(2):
            grey = wnid == "n03" and j == 1
            _save_jpeg(tiny / "train" / wnid / "images" / f"{wnid}_{j}.JPEG", rng, grey=grey)
        (tiny / "train" / wnid / f"{wnid}_boxes.txt").write_text("ignored\n")
    val = [("val_0.JPEG", "n03"), ("val_1.JPEG", "n01"), ("val_2.JPEG", "n03"), ("val_3.JPEG", "n02")]
    for name, _ in val:
        _save_jpeg(tiny / "val" / "images" / name, rng, grey=name == "val_1.JPEG")
    (tiny / "val" / "val_annotations.txt").write_text("".join(f"{n}\t{w}\t0\t0\t63\t63\n" for n, w in val))
    (tiny / "words.txt").write_text("n01\tgoldfish, Carassius auratus\nn02\tcrane\nn03\tcrane\nn04\tunused\n")
    (tiny / "wnids.txt").write_text("\n".join(TINY_WNIDS) + "\n")
    return tiny


def _pil_rgb_chw(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).transpose(2, 0, 1)


def test_tiny_stock_layout(tmp_path: Path) -> None:
    tiny = make_tiny(tmp_path)
    ds = load_dataset("tinyimagenet", tmp_path)
    assert ds.name == "tinyimagenet"
    assert ds.train_images.shape == (6, 3, 64, 64) and ds.train_images.dtype == torch.uint8
    assert ds.train_labels.tolist() == [0, 0, 1, 1, 2, 2]  # sorted wnids: n01, n02, n03
    # Validation sorted by (class, file name), whatever the annotation order.
    assert ds.test_labels.tolist() == [0, 1, 2, 2]
    # val_1 is greyscale: expanded to RGB as PIL's convert("RGB") does.
    assert np.array_equal(ds.test_images[0].numpy(), _pil_rgb_chw(tiny / "val/images/val_1.JPEG"))
    assert np.array_equal(ds.test_images[2].numpy(), _pil_rgb_chw(tiny / "val/images/val_0.JPEG"))
    assert np.array_equal(ds.train_images[5].numpy(), _pil_rgb_chw(tiny / "train/n03/images/n03_1.JPEG"))
    assert ds.class_names == ["goldfish", "crane (n02)", "crane (n03)"]
    assert ds.mean == data.IMAGENET_MEAN and ds.std == data.IMAGENET_STD


def _reorganise(tiny: Path, nested_under_images: bool) -> None:
    """Move val images into val/images/<wnid>/ or val/<wnid>/images/ (the two non-stock layouts)."""
    rows = [line.split("\t") for line in (tiny / "val/val_annotations.txt").read_text().splitlines()]
    staging = tiny / "staging"
    shutil.move(tiny / "val" / "images", staging)
    for name, wnid, *_ in rows:
        dest = tiny / "val" / ("images/" + wnid if nested_under_images else wnid + "/images") / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(staging / name, dest)
    staging.rmdir()
    (tiny / "val/val_annotations.txt").unlink()


@pytest.mark.parametrize("nested_under_images", [True, False])
def test_tiny_reorganised_layouts_give_the_same_tensors(tmp_path: Path, nested_under_images: bool) -> None:
    tiny = make_tiny(tmp_path / "a")
    stock = load_dataset("tinyimagenet", tmp_path / "a")
    _reorganise(tiny, nested_under_images)
    other = load_dataset("tinyimagenet", tiny)  # also: data_dir is the tiny-imagenet-200 folder itself
    assert torch.equal(stock.test_images, other.test_images)
    assert torch.equal(stock.test_labels, other.test_labels)
    assert torch.equal(stock.train_images, other.train_images)


def test_tiny_decodes_once_then_uses_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = make_tiny(tmp_path)
    first = load_dataset("tiny", tmp_path)
    assert (tiny / ".mctool-cache-v1.pt").is_file()

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded although the cache is valid")

    monkeypatch.setattr(data, "_decode_images", no_decoding)
    again = load_dataset("tinyimagenet", tmp_path)
    assert torch.equal(first.train_images, again.train_images)
    assert torch.equal(first.test_images, again.test_images)
    assert first.fingerprint() == again.fingerprint()

    # Replacing an image changes the listing (size), so the cache must be rebuilt.
    path = tiny / "train/n01/images/n01_0.JPEG"
    with Image.open(path) as im:
        im.load()
    im.save(path, quality=30)
    with pytest.raises(AssertionError, match="decoded"):
        load_dataset("tinyimagenet", tmp_path)


def test_tiny_wrong_image_size_names_the_file(tmp_path: Path) -> None:
    tiny = make_tiny(tmp_path)
    _save_jpeg(tiny / "train/n02/images/n02_1.JPEG", _rng(4), size=32)
    with pytest.raises(UsageError, match="n02_1.JPEG"):
        load_dataset("tinyimagenet", tmp_path)


def test_tiny_unannotated_val_image_is_usage_error(tmp_path: Path) -> None:
    tiny = make_tiny(tmp_path)
    _save_jpeg(tiny / "val/images/val_9.JPEG", _rng(5))
    with pytest.raises(UsageError, match="val_9.JPEG"):
        load_dataset("tinyimagenet", tmp_path)


def test_tiny_missing_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFound) as err:
        load_dataset("tinyimagenet", tmp_path, download=False)
    _assert_one_line_not_found(err, "tiny-imagenet-200.zip", str(tmp_path / "tiny-imagenet-200"))


# ---------------------------------------------------------------------------------------------
# IDX fixtures (MNIST / Fashion-MNIST)


def _idx_bytes(array: np.ndarray) -> bytes:
    return bytes((0, 0, 0x08, array.ndim)) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def make_idx(folder: Path, gz: bool, seed: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Write the four IDX files (5 train, 3 test images of 28x28); return train images and labels."""
    rng = _rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.array([3, 1, 4, 1, 5], dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.array([9, 2, 6], dtype=np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        raw = _idx_bytes(array)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / name).write_bytes(raw)
    return arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"]


@pytest.fixture
def no_system_dirs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hide /usr/share/datasets so that the data dir alone decides."""
    monkeypatch.setattr(data, "SYSTEM_IDX_DIRS", {"fashion-mnist": (), "mnist": ()})


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_plain_and_gzipped(tmp_path: Path, gz: bool) -> None:
    x, y = make_idx(tmp_path / "mnist", gz)
    ds = load_dataset("mnist", tmp_path)
    assert ds.train_images.shape == (5, 1, 28, 28) and ds.train_images.dtype == torch.uint8
    assert np.array_equal(ds.train_images[:, 0].numpy(), x) and ds.train_labels.tolist() == y.tolist()
    assert ds.train_labels.dtype == torch.int64 and ds.test_labels.tolist() == [9, 2, 6]
    assert ds.class_names == [str(i) for i in range(10)]
    assert ds.mean == (0.1307,) and ds.std == (0.3081,) and not ds.flip


def test_fashion_search_order(tmp_path: Path, no_system_dirs: None) -> None:
    x_tv, _ = make_idx(tmp_path / "FashionMNIST" / "raw", gz=True, seed=7)  # torchvision layout
    ds = load_dataset("fashion-mnist", tmp_path)
    assert np.array_equal(ds.train_images[:, 0].numpy(), x_tv)
    x_own, _ = make_idx(tmp_path / "fashion-mnist", gz=False, seed=8)  # takes precedence
    ds = load_dataset("fashion_mnist", tmp_path)
    assert ds.name == "fashion-mnist" and np.array_equal(ds.train_images[:, 0].numpy(), x_own)
    assert ds.class_names[0] == "T-shirt/top" and ds.flip
    assert ds.mean == (0.2861,) and ds.std == (0.3530,)


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda raw: b"\x00\x00\x08\x02" + raw[4:],  # wrong number of dimensions
        lambda raw: raw[:-10],  # truncated data
        lambda raw: gzip.compress(raw)[:40],  # truncated gzip stream
        lambda raw: b"garbage",
    ],
)
def test_garbage_idx_is_usage_error_naming_the_file(tmp_path: Path, corrupt) -> None:
    make_idx(tmp_path / "mnist", gz=False)
    path = tmp_path / "mnist" / "train-images-idx3-ubyte"
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(UsageError, match="train-images-idx3-ubyte"):
        load_dataset("mnist", tmp_path)


def test_idx_label_out_of_range_is_usage_error(tmp_path: Path) -> None:
    make_idx(tmp_path / "mnist", gz=False)
    labels = _idx_bytes(np.array([1, 2, 10], dtype=np.uint8))
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte").write_bytes(labels)
    with pytest.raises(UsageError, match="t10k-labels"):
        load_dataset("mnist", tmp_path)


def test_idx_missing_is_one_line(tmp_path: Path, no_system_dirs: None) -> None:
    with pytest.raises(DatasetNotFound) as err:
        load_dataset("fashion-mnist", tmp_path)
    _assert_one_line_not_found(err, "apt-get install dataset-fashion-mnist", str(tmp_path / "fashion-mnist"))
    with pytest.raises(DatasetNotFound) as err:
        load_dataset("mnist", tmp_path)
    _assert_one_line_not_found(err, "train-images-idx3-ubyte", str(tmp_path / "mnist"))


@pytest.mark.skipif(not FASHION_SYSTEM_DIR.is_dir(), reason="package dataset-fashion-mnist not installed")
def test_real_fashion_mnist_from_debian_package(tmp_path: Path) -> None:
    ds = load_dataset("fashion-mnist", tmp_path)  # empty data dir: falls back to /usr/share/datasets
    assert ds.train_images.shape == (60000, 1, 28, 28) and ds.test_images.shape == (10000, 1, 28, 28)
    assert ds.num_classes == 10
    assert torch.bincount(ds.train_labels).tolist() == [6000] * 10
    assert torch.bincount(ds.test_labels).tolist() == [1000] * 10
    # The hard-coded statistics are those of the real training split.
    pixels = ds.train_images.double() / 255
    assert pixels.mean().item() == pytest.approx(ds.mean[0], abs=1e-3)
    assert pixels.std().item() == pytest.approx(ds.std[0], abs=1e-3)


# ---------------------------------------------------------------------------------------------
# folder:PATH


def _save_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_folder(root: Path, grey: bool = False) -> dict[str, np.ndarray]:
    """train/{dog,cat}, test/{cat,dog}: 8x6 PNG images (lossless, so pixels compare exactly)."""
    rng = _rng(10)
    shape = (6, 8) if grey else (6, 8, 3)
    written = {}
    for split, counts in (("train", {"dog": 2, "cat": 3}), ("test", {"cat": 1, "dog": 1})):
        for cls, n in counts.items():
            for j in range(n):
                rel = f"{split}/{cls}/img{j}.png"
                written[rel] = rng.integers(0, 256, shape, dtype=np.uint8)
                _save_png(root / rel, written[rel])
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    return written


def test_folder_rgb(tmp_path: Path) -> None:
    written = make_folder(tmp_path / "pets")
    ds = load_dataset(f"folder:{tmp_path / 'pets'}")
    assert ds.name == f"folder:{(tmp_path / 'pets').resolve()}"
    assert ds.class_names == ["cat", "dog"]
    assert ds.train_images.shape == (5, 3, 6, 8) and ds.test_images.shape == (2, 3, 6, 8)
    assert ds.train_labels.tolist() == [0, 0, 0, 1, 1] and ds.test_labels.tolist() == [0, 1]
    assert np.array_equal(ds.train_images[3].numpy(), written["train/dog/img0.png"].transpose(2, 0, 1))
    order = [f"train/{c}/img{j}.png" for c, n in (("cat", 3), ("dog", 2)) for j in range(n)]
    train = np.stack([written[rel] for rel in order])
    assert np.allclose(ds.mean, (train / 255).mean(axis=(0, 1, 2)), atol=1e-9)
    assert np.allclose(ds.std, (train / 255).std(axis=(0, 1, 2)), atol=1e-9)
    assert ds.flip


def test_folder_all_grey_is_one_channel_and_val_is_accepted(tmp_path: Path) -> None:
    written = make_folder(tmp_path / "digits", grey=True)
    (tmp_path / "digits" / "test").rename(tmp_path / "digits" / "val")
    ds = load_dataset(f"folder:{tmp_path / 'digits'}")
    assert ds.channels == 1 and ds.test_images.shape == (2, 1, 6, 8) and len(ds.mean) == 1
    assert np.array_equal(ds.test_images[1, 0].numpy(), written["test/dog/img0.png"])


def test_folder_mixed_sizes_names_the_file(tmp_path: Path) -> None:
    make_folder(tmp_path / "pets")
    _save_png(tmp_path / "pets/test/dog/img0.png", np.zeros((7, 8, 3), dtype=np.uint8))
    with pytest.raises(UsageError, match="img0.png"):
        load_dataset(f"folder:{tmp_path / 'pets'}")


def test_folder_class_sets_must_match(tmp_path: Path) -> None:
    make_folder(tmp_path / "pets")
    _save_png(tmp_path / "pets/test/fox/a.png", np.zeros((6, 8, 3), dtype=np.uint8))
    with pytest.raises(UsageError, match="fox"):
        load_dataset(f"folder:{tmp_path / 'pets'}")


def test_folder_missing_is_dataset_not_found(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFound, match="train/"):
        load_dataset(f"folder:{tmp_path / 'nothing'}")


# ---------------------------------------------------------------------------------------------
# Registry, defaults, Dataset


def test_unknown_name_lists_valid_names(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as err:
        load_dataset("imagenet", tmp_path)
    assert all(name in str(err.value) for name in (*DATASETS, "folder:PATH"))


def test_default_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MCTOOL_DATA", str(tmp_path))
    assert default_data_dir() == tmp_path
    monkeypatch.delenv("MCTOOL_DATA")
    assert default_data_dir() == Path.home() / ".cache" / "mctool" / "data"


def _toy_dataset(n: int = 50, shape: tuple[int, int, int] = (1, 4, 4), seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    c = shape[0]
    return Dataset(
        name="toy",
        train_images=torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=g),
        train_labels=torch.arange(n) % 2,
        test_images=torch.randint(0, 256, (7, *shape), dtype=torch.uint8, generator=g),
        test_labels=torch.arange(7) % 2,
        class_names=["a", "b"],
        mean=(0.5,) * c,
        std=(0.25,) * c,
        flip=True,
    )


def test_fingerprint_tracks_train_split() -> None:
    a, b = _toy_dataset(seed=0), _toy_dataset(seed=0)
    fp = a.fingerprint()
    assert fp == b.fingerprint() and len(fp) == 16 and int(fp, 16) >= 0
    relabelled = dataclasses.replace(a, train_labels=a.train_labels.flip(0))  # memo must not carry over
    assert relabelled.fingerprint() != fp
    assert _toy_dataset(seed=1).fingerprint() != fp


# ---------------------------------------------------------------------------------------------
# Preprocessing


def _zca_reference(train: np.ndarray, x: np.ndarray, eps: float) -> np.ndarray:
    """ZCA computed independently in float64: T = U diag(1/sqrt(S + eps)) U^T, cov over N - 1."""
    xt = train.reshape(len(train), -1) / 255.0
    mu = xt.mean(axis=0)
    cov = (xt - mu).T @ (xt - mu) / (len(xt) - 1)
    s, u = np.linalg.eigh(cov)
    t = u @ np.diag(1.0 / np.sqrt(s + eps)) @ u.T
    return ((x.reshape(len(x), -1) / 255.0 - mu) @ t).reshape(x.shape)


def test_zca_matches_the_formula_and_inverts() -> None:
    ds = _toy_dataset()
    pre = fit_preprocessing(ds, zca=True, eps=0.1)
    assert pre.kind == "zca" and pre.zca_eps == 0.1
    assert pre.mean.shape == (16,) and pre.transform.shape == (16, 16) and pre.transform_inv.shape == (16, 16)
    assert pre.mean.dtype == torch.float32
    for images in (ds.train_images, ds.test_images):
        out = pre.apply(images)
        assert out.dtype == torch.float32 and out.shape == images.shape
        expected = _zca_reference(ds.train_images.numpy(), images.numpy(), 0.1)
        assert np.allclose(out.numpy(), expected, atol=1e-5)
        back = pre.invert(out)
        assert torch.allclose(back, images.float() / 255, atol=1e-5)
    # Chunking must not change the result.
    assert torch.allclose(pre.apply(ds.train_images, batch=7), pre.apply(ds.train_images), atol=1e-6)


def test_zca_whitens_when_eps_is_small() -> None:
    ds = _toy_dataset(n=400)
    out = fit_preprocessing(ds, zca=True, eps=1e-6).apply(ds.train_images).reshape(400, -1).double()
    cov = torch.cov(out.T)
    assert torch.allclose(cov, torch.eye(16, dtype=torch.float64), atol=1e-3)


def test_zca_cache_is_written_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = _toy_dataset()
    first = fit_preprocessing(ds, zca=True, eps=0.1, cache_dir=tmp_path)
    path = tmp_path / f"zca-{ds.fingerprint()}-eps0.1.pt"
    assert path.is_file()

    def no_fit(*args: object, **kwargs: object) -> None:
        raise AssertionError("refitted although the cache is valid")

    monkeypatch.setattr(data, "_fit_zca", no_fit)
    again = fit_preprocessing(ds, zca=True, eps=0.1, cache_dir=tmp_path)
    assert torch.equal(first.transform, again.transform) and torch.equal(first.mean, again.mean)
    with pytest.raises(AssertionError, match="refitted"):  # another eps is another cache entry
        fit_preprocessing(ds, zca=True, eps=0.2, cache_dir=tmp_path)
    path.write_bytes(b"torn file")
    with pytest.raises(AssertionError, match="refitted"):  # a corrupt cache is refitted, not trusted
        fit_preprocessing(ds, zca=True, eps=0.1, cache_dir=tmp_path)


def test_normalize_apply_and_invert() -> None:
    ds = _toy_dataset(shape=(3, 2, 2))
    pre = fit_preprocessing(ds, zca=False)
    assert pre.kind == "normalize" and pre.transform is None
    out = pre.apply(ds.train_images, batch=16)
    assert torch.allclose(out, (ds.train_images.float() / 255 - 0.5) / 0.25)
    assert torch.allclose(pre.invert(out), ds.train_images.float() / 255, atol=1e-6)
    assert pre.invert(torch.full((1, 3, 2, 2), 100.0)).max() == 1.0  # clamped for viewing


def test_state_round_trip_including_numpy_and_bytes() -> None:
    ds = _toy_dataset()
    for pre in (fit_preprocessing(ds, zca=True), fit_preprocessing(ds, zca=False)):
        state = pre.to_state()
        assert all(isinstance(v, (torch.Tensor, float, str)) for v in state.values())
        back = Preprocessing.from_state(state)
        assert torch.equal(back.apply(ds.test_images), pre.apply(ds.test_images))
        # As read back from HDF5: numpy arrays and a bytes kind.
        as_h5 = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
        as_h5["kind"] = state["kind"].encode()  # type: ignore[union-attr]
        assert torch.equal(Preprocessing.from_state(as_h5).apply(ds.test_images), pre.apply(ds.test_images))
    with pytest.raises(ArtifactError):
        Preprocessing.from_state({"kind": "zca", "mean": torch.zeros(16)})
    with pytest.raises(ArtifactError):
        Preprocessing.from_state({"kind": "pca"})


def test_zca_fit_falls_back_to_the_cpu_when_the_device_runs_out_of_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    from kornia.enhance import ZCAWhitening

    ds = _toy_dataset()
    expected = data._fit_zca(ds, 0.1, "cpu")
    real_fit = ZCAWhitening.fit

    def fit(self: ZCAWhitening, x: torch.Tensor) -> ZCAWhitening:
        if x.device.type != "cpu":  # stands in for a GPU too small for the whole split
            raise torch.cuda.OutOfMemoryError("out of memory")
        return real_fit(self, x)

    monkeypatch.setattr(ZCAWhitening, "fit", fit)
    got = data._fit_zca(ds, 0.1, "meta")
    assert torch.equal(got.transform, expected.transform) and torch.equal(got.mean, expected.mean)
