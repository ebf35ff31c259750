"""Datasets as uint8 tensors (CIFAR-10/100, Tiny ImageNet, (Fashion-)MNIST, image folders) and
their preprocessing: per-channel normalisation or ZCA whitening (method.md §1).

Every loader reads the dataset exactly as it is shipped (no reorganising on disk) and returns
the whole split as one CPU tensor, because experts and distillation index into it directly.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import pickle
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mctool.core.errors import ArtifactError, DatasetNotFound, UsageError

DATASETS: tuple[str, ...] = ("cifar10", "cifar100", "tinyimagenet", "fashion-mnist", "mnist")

# Names people type from habit (the reference's flags, torchvision's class names).
_ALIASES = {
    "cifar-10": "cifar10",
    "cifar-100": "cifar100",
    "tiny": "tinyimagenet",
    "tiny-imagenet": "tinyimagenet",
    "tiny-imagenet-200": "tinyimagenet",
    "tiny_imagenet": "tinyimagenet",
    "fashionmnist": "fashion-mnist",
    "fashion_mnist": "fashion-mnist",
}

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip

# Searched after the data dir for IDX datasets; a module constant so tests can empty it.
SYSTEM_IDX_DIRS: dict[str, tuple[Path, ...]] = {
    "fashion-mnist": (Path("/usr/share/datasets/fashion-mnist"),),
    "mnist": (),
}

_IMAGE_EXTS = frozenset(
    {".jpeg", ".jpg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)
_GREY_MODES = frozenset({"1", "L", "LA"})
# Larger images are refused from their header, before decoding: far beyond what distillation
# networks take (the ConvNet's activations of one 4096 px colour image at width 128 are 8 GB),
# and a few KB of PNG can declare them.
MAX_IMAGE_PIXELS = 4096 * 4096
# Bytes per decoded pixel value a loaded dataset holds at once: the uint8 images, then their
# float32 copy while preprocessing.
_LOAD_BYTES_PER_VALUE = 5
_TINY_CACHE = ".mctool-cache-v1.pt"
# ZCA is fitted in float64 when the N x D input takes at most this much memory (CIFAR:
# 50000 x 3072 x 8 B = 1.2 GB, about 30 s on 2 cores); above it (Tiny ImageNet: 9.8 GB, twice
# that with kornia's centred copy) in float32, as the reference does. With eps = 0.1 added to
# every eigenvalue, float32 rounding in the covariance is far below anything that matters.
_ZCA_F64_MAX_BYTES = 2 << 30


# --------------------------------------------------------------------------------------------
# The dataset


@dataclass(frozen=True, eq=False)  # eq=False: comparing tensors element-wise has no truth value
class Dataset:
    """A dataset's train and test splits as uint8 [N, C, H, W] CPU tensors, plus metadata."""

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    flip: bool

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            images = getattr(self, f"{split}_images")
            labels = getattr(self, f"{split}_labels")
            if images.dtype != torch.uint8 or images.dim() != 4:
                got = f"{images.dtype} {tuple(images.shape)}"
                raise ValueError(f"{split}_images must be uint8 [N, C, H, W], got {got}")
            if labels.dtype != torch.int64 or labels.shape != images.shape[:1]:
                got = f"{labels.dtype} {tuple(labels.shape)}"
                raise ValueError(f"{split}_labels must be int64 [{images.shape[0]}], got {got}")
        if self.train_images.shape[1:] != self.test_images.shape[1:]:
            raise ValueError("train and test images differ in shape")
        if not len(self.mean) == len(self.std) == self.channels:
            raise ValueError("mean and std need one value per channel")

    @property
    def num_classes(self) -> int:
        """Number of classes (labels are 0 .. num_classes - 1)."""
        return len(self.class_names)

    @property
    def channels(self) -> int:
        """Image channels (3 for RGB, 1 for greyscale)."""
        return int(self.train_images.shape[1])

    @property
    def height(self) -> int:
        """Image height in pixels."""
        return int(self.train_images.shape[2])

    @property
    def width(self) -> int:
        """Image width in pixels."""
        return int(self.train_images.shape[3])

    def fingerprint(self) -> str:
        """Short sha256 hex of the training images and labels (identifies the training split)."""
        cached = self.__dict__.get("_fingerprint")
        if cached is None:
            h = hashlib.sha256(repr(tuple(self.train_images.shape)).encode())
            h.update(self.train_images.contiguous().numpy())
            h.update(self.train_labels.contiguous().numpy())
            cached = h.hexdigest()[:16]
            # Frozen dataclass: memoise through object.__setattr__ (hashing CIFAR takes ~0.2 s).
            object.__setattr__(self, "_fingerprint", cached)
        return cached


def default_data_dir() -> Path:
    """$MCTOOL_DATA if set, else ~/.cache/mctool/data."""
    env = os.environ.get("MCTOOL_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mctool" / "data"


# Training and test split sizes of each named dataset, for estimates made before loading it.
SPLIT_SIZES: dict[str, tuple[int, int]] = {
    "cifar10": (50000, 10000), "cifar100": (50000, 10000), "tinyimagenet": (100000, 10000),
    "fashion-mnist": (60000, 10000), "mnist": (60000, 10000),
}

# Image shape (C, H, W) of each named dataset, known before anything is loaded.
SHAPES: dict[str, tuple[int, int, int]] = {
    "cifar10": (3, 32, 32), "cifar100": (3, 32, 32), "tinyimagenet": (3, 64, 64),
    "fashion-mnist": (1, 28, 28), "mnist": (1, 28, 28),
}

# Number of classes of each named dataset, known before anything is loaded.
CLASSES: dict[str, int] = {"cifar10": 10, "cifar100": 100, "tinyimagenet": 200, "fashion-mnist": 10, "mnist": 10}


def canonical_name(name: str) -> str:
    """The name a dataset is stored under (aliases resolved, folder paths made absolute), checked
    without loading anything: an unknown name is one line before any work starts."""
    key = name.strip()
    if key.lower().startswith("folder:"):
        spec = key[len("folder:"):].strip()
        if not spec:
            raise UsageError("folder: needs a path, e.g. folder:/data/mypets")
        return f"folder:{Path(spec).expanduser().resolve()}"
    canon = _ALIASES.get(key.lower(), key.lower())
    if canon not in DATASETS:
        raise UsageError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}, folder:PATH")
    return canon


def load_dataset(name: str, data_dir: Path | str | None = None, download: bool = False) -> Dataset:
    """Load a dataset by name ("cifar10", ..., or "folder:PATH") from `data_dir`."""
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    key = name.strip()
    if key.lower().startswith("folder:"):
        return _load_folder(key[len("folder:") :])
    canon = _ALIASES.get(key.lower(), key.lower())
    if canon in _CIFAR:
        return _load_cifar(_CIFAR[canon], root, download)
    if canon == "tinyimagenet":
        return _load_tiny(root, download)
    if canon in _IDX:
        return _load_idx_dataset(_IDX[canon], root, download)
    raise UsageError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}, folder:PATH")


def dataset_present(name: str, data_dir: Path | str | None = None) -> bool:
    """Whether dataset `name`'s files are already where load_dataset looks (a few stat calls, no
    reading): callers check it before saying "loading", so that missing data is the first thing
    a user reads. A folder: dataset and an unknown name count as present (load_dataset speaks)."""
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    key = name.strip()
    if key.lower().startswith("folder:"):
        return True
    canon = _ALIASES.get(key.lower(), key.lower())
    if canon in _CIFAR:
        return _cifar_folder(_CIFAR[canon], root) is not None
    if canon == "tinyimagenet":
        return _tiny_root(root) is not None
    if canon in _IDX:
        return _idx_folder(_IDX[canon], root) is not None
    return True


# --------------------------------------------------------------------------------------------
# Shared helpers


def _one_line(err: BaseException) -> str:
    """An exception's message squeezed onto one line."""
    return " ".join(str(err).split()) or type(err).__name__


def _fetch(title: str, fetch: Callable[[], Any], hint: str) -> None:
    """Run a download; any failure (offline, bad checksum, disk full) becomes DatasetNotFound."""
    try:
        fetch()
    except Exception as err:  # noqa: BLE001 - urllib/torchvision raise many unrelated types
        raise DatasetNotFound(f"downloading {title} failed ({_one_line(err)}); {hint}") from err


def _check_labels(labels: np.ndarray, num_classes: int, where: Path) -> None:
    """Reject labels outside 0 .. num_classes - 1 (a corrupt or foreign file)."""
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        found = f"{labels.min()}..{labels.max()}"
        raise UsageError(f"{where}: labels outside 0..{num_classes - 1} (found {found})")


def _tensors(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """numpy arrays -> (uint8 images, int64 labels) tensors that own contiguous memory."""
    return (
        torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)),
        torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)),
    )


def _save_atomic(obj: Any, path: Path) -> bool:
    """torch.save via a temporary file and rename (never through a link); False if the location
    is not writable."""
    from mctool.core.errors import MctoolError
    from mctool.store.files import write_atomically

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda fh: torch.save(obj, fh))
        return True
    except (OSError, RuntimeError, MctoolError):  # torch.save reports some write failures as RuntimeError
        # A cache only saves time: a read-only data dir, a full disk or a planted link must not stop the run.
        return False


def _load_cache(path: Path) -> dict[str, Any] | None:
    """A cache file's dict, or None when it is absent or unreadable (then it is rebuilt)."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a torn or foreign cache file is simply rebuilt
        return None
    return state if isinstance(state, dict) else None


# --------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100: torchvision's on-disk layout (python pickles)


@dataclass(frozen=True)
class _CifarSpec:
    name: str
    title: str
    folder: str
    url: str
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    label_key: str
    names_key: str
    num_classes: int
    torchvision_class: str


_CIFAR = {
    "cifar10": _CifarSpec(
        "cifar10", "CIFAR-10", "cifar-10-batches-py",
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta",
        "labels", "label_names", 10, "CIFAR10",
    ),
    "cifar100": _CifarSpec(
        "cifar100", "CIFAR-100", "cifar-100-python",
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        ("train",), "test", "meta", "fine_labels", "fine_label_names", 100, "CIFAR100",
    ),
}  # fmt: skip

# The only globals a CIFAR pickle needs (numpy arrays, py2/py3 bytes). Refusing the rest means
# a file dropped into the data dir cannot run code when we unpickle it.
_PICKLE_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }
)


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return super().find_class(module, name)


def _read_pickle(path: Path) -> dict[str, Any]:
    """A CIFAR pickle as a dict with str keys (the files have bytes keys under encoding='bytes')."""
    try:
        with open(path, "rb") as f:
            obj = _SafeUnpickler(f, encoding="bytes").load()
    except Exception as err:  # noqa: BLE001 - unpickling garbage can raise almost anything
        raise UsageError(f"cannot read {path}: not a CIFAR pickle ({_one_line(err)})") from err
    if not isinstance(obj, dict):
        raise UsageError(f"cannot read {path}: not a CIFAR pickle (no dict inside)")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _read_cifar_batch(path: Path, spec: _CifarSpec) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR batch file -> (uint8 [N, 3, 32, 32], int64 [N])."""
    d = _read_pickle(path)
    if "data" not in d or spec.label_key not in d:
        raise UsageError(f"cannot read {path}: missing 'data' or '{spec.label_key}'")
    data = np.asarray(d["data"])
    labels = np.asarray(d[spec.label_key], dtype=np.int64).reshape(-1)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        got = f"{data.dtype} {data.shape} and {len(labels)}"
        raise UsageError(f"cannot read {path}: expected uint8 data [N, 3072] and N labels, got {got}")
    _check_labels(labels, spec.num_classes, path)
    return data.reshape(-1, 3, 32, 32), labels  # rows are stored R plane, G plane, B plane


def _cifar_folder(spec: _CifarSpec, root: Path) -> Path | None:
    """The folder holding the CIFAR files: <root>/<folder>, or root itself if it is that folder."""
    needed = (*spec.train_files, spec.test_file, spec.meta_file)
    for folder in (root / spec.folder, root):
        if all((folder / f).is_file() for f in needed):
            return folder
    return None


def _load_cifar(spec: _CifarSpec, root: Path, download: bool) -> Dataset:
    """Read CIFAR-10/100 from torchvision's extracted layout, downloading it first if asked."""
    hint = (
        f"download {spec.url} and extract it into {root} so that {root / spec.folder / spec.test_file} "
        f"exists, or choose another data folder with --data-dir / MCTOOL_DATA"
    )
    folder = _cifar_folder(spec, root)
    if folder is None and download:
        import torchvision.datasets as tvd  # only needed for downloads

        dataset_class = getattr(tvd, spec.torchvision_class)
        _fetch(spec.title, lambda: dataset_class(root=str(root), train=True, download=True), hint)
        folder = _cifar_folder(spec, root)
    if folder is None:
        raise DatasetNotFound(f"{spec.title} not found: {hint}")

    train = [_read_cifar_batch(folder / f, spec) for f in spec.train_files]
    test_x, test_y = _read_cifar_batch(folder / spec.test_file, spec)
    meta = _read_pickle(folder / spec.meta_file)
    names = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in meta.get(spec.names_key, [])]
    if len(names) != spec.num_classes:
        want = f"{spec.num_classes} '{spec.names_key}'"
        raise UsageError(f"cannot read {folder / spec.meta_file}: expected {want}, found {len(names)}")
    train_x, train_y = _tensors(np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]))
    test_xt, test_yt = _tensors(test_x, test_y)
    # CIFAR-100 uses CIFAR-10's statistics, as the reference does (method.md §1.1).
    return Dataset(spec.name, train_x, train_y, test_xt, test_yt, names, CIFAR_MEAN, CIFAR_STD, True)


# --------------------------------------------------------------------------------------------
# Images decoded with PIL (Tiny ImageNet, folder datasets)


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in _IMAGE_EXTS and not path.name.startswith(".")


def _class_files(root: Path, classes: Sequence[str]) -> tuple[list[Path], np.ndarray]:
    """Image files under root/<class>/ (any depth), class by class, sorted like ImageFolder."""
    files: list[Path] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        found = [p for p in (root / cls).rglob("*") if _is_image(p) and p.is_file()]
        found.sort(key=lambda p: p.as_posix())
        files += found
        labels += [label] * len(found)
    return files, np.asarray(labels, dtype=np.int64)


def _subdirs(folder: Path) -> list[str]:
    """Sorted names of the visible subfolders of `folder`."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _class_mismatch(folder: Path, train: Sequence[str], found: Sequence[str]) -> str:
    """Message for a test/val folder whose classes differ from train/'s."""
    extra, missing = sorted(set(found) - set(train)), sorted(set(train) - set(found))
    return f"{folder}: class folders differ from train/ (extra: {extra[:5]}, missing: {missing[:5]})"


def _image_size(path: Path) -> tuple[int, int]:
    """(H, W) of an image from its header alone (nothing decoded)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise UsageError(f"cannot read image {path}: {_one_line(err)}") from err
    _check_pixels(path, h, w)
    return h, w


def _check_pixels(path: Path, h: int, w: int) -> None:
    if h * w > MAX_IMAGE_PIXELS:
        raise UsageError(f"{path} is {w}x{h} pixels, more than mctool reads ({MAX_IMAGE_PIXELS:,} pixels, e.g. "
                         "4096x4096); resize the images (small ones suit the method)")


def _decode_one(path: Path, size: tuple[int, int] | None = None) -> tuple[np.ndarray, bool]:
    """One image as uint8 RGB [H, W, 3] and whether it was greyscale; with `size` = (H, W), an
    image of another size is refused from its header, before it is decoded."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
            if size is not None and (h, w) != tuple(size):
                raise UsageError(f"{path} is {w}x{h} pixels but the other images are {size[1]}x{size[0]}; "
                                 "all images of a dataset must have the same size")
            _check_pixels(path, h, w)
            return np.asarray(im.convert("RGB")), im.mode in _GREY_MODES
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise UsageError(f"cannot read image {path}: {_one_line(err)}") from err


def _check_decoded_size(n: int, h: int, w: int, where: Path) -> None:
    """Refuse, before decoding, a dataset whose decoded images would not fit in memory."""
    from mctool.matching.memory import free_bytes

    need = n * 3 * h * w * _LOAD_BYTES_PER_VALUE
    free = free_bytes("cpu")
    if free is not None and need > free:
        raise UsageError(f"{where}: {n} images of {w}x{h} pixels need about {need / 1e9:.1f} GB to load, more than the "
                         f"{free / 1e9:.1f} GB of memory available; use fewer or smaller images")


def _decode_images(
    files: Sequence[Path], size: tuple[int, int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Decode images into uint8 [N, 3, H, W] plus a per-image "was greyscale" flag.

    All images must have the same size (`size` = (H, W), or the first image's). PIL releases
    the GIL while decoding, so a thread pool uses every core.
    """
    h, w = size if size is not None else _image_size(files[0])
    _check_decoded_size(len(files), h, w, files[0].parent)
    first, first_grey = _decode_one(files[0], (h, w))
    out = np.empty((len(files), 3, h, w), dtype=np.uint8)
    grey = np.empty(len(files), dtype=bool)

    def store(i: int, decoded: tuple[np.ndarray, bool]) -> None:
        pixels, grey[i] = decoded
        if pixels.shape[:2] != (h, w):
            raise UsageError(
                f"{files[i]} is {pixels.shape[1]}x{pixels.shape[0]} pixels but the other images are {w}x{h}; "
                "all images of a dataset must have the same size"
            )
        out[i] = pixels.transpose(2, 0, 1)

    store(0, (first, first_grey))
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for i, decoded in enumerate(pool.map(lambda f: _decode_one(f, (h, w)), files[1:]), start=1):
            store(i, decoded)
    return out, grey


# --------------------------------------------------------------------------------------------
# Tiny ImageNet: the stock tiny-imagenet-200 folder (or the reorganised val layouts)

_TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"


def _tiny_root(root: Path) -> Path | None:
    """<root>/tiny-imagenet-200, or root itself when it is that folder."""
    for folder in (root / "tiny-imagenet-200", root):
        if (folder / "train").is_dir() and (folder / "val").is_dir():
            return folder
    return None


def _tiny_val(val: Path, wnids: list[str]) -> tuple[list[Path], np.ndarray, list[Path]]:
    """Validation files and labels for any of the three layouts, plus the files they depend on.

    Stock: val/images/*.JPEG + val/val_annotations.txt. Reorganised: val/images/<wnid>/*.JPEG
    (what the reference reads) or val/<wnid>/images/*.JPEG (what its dealer script makes).
    Every layout yields the same order (class, then file name), so the test split is identical.
    """
    images = val / "images"
    flat = sorted(p for p in images.iterdir() if p.is_file() and _is_image(p)) if images.is_dir() else []
    if flat:
        ann = val / "val_annotations.txt"
        if not ann.is_file():
            raise UsageError(f"{images} holds images but {ann} (which names their classes) is missing")
        wnid_of = {}
        for line in ann.read_text(encoding="utf-8").splitlines():
            fields = line.split("\t")
            if len(fields) >= 2:
                wnid_of[fields[0].strip()] = fields[1].strip()
        index = {w: i for i, w in enumerate(wnids)}
        labels = []
        for p in flat:
            wnid = wnid_of.get(p.name)
            if wnid is None:
                raise UsageError(f"{p} is not listed in {ann}")
            if wnid not in index:
                train = val.parent / "train"
                raise UsageError(f"{ann}: {p.name} has class {wnid}, which has no folder in {train}")
            labels.append(index[wnid])
        order = sorted(range(len(flat)), key=lambda i: (labels[i], flat[i].name))
        return [flat[i] for i in order], np.asarray([labels[i] for i in order], dtype=np.int64), [ann]
    tree = images if images.is_dir() else val
    found = [d for d in _subdirs(tree) if d != "images"]
    if not found:
        raise UsageError(f"no validation images in {val} (expected val/images/*.JPEG + val_annotations.txt)")
    if found != wnids:
        raise UsageError(_class_mismatch(tree, wnids, found))
    files, labels = _class_files(tree, wnids)
    if not files:
        raise UsageError(f"no validation images under {tree}")
    return files, labels, []


def _tiny_class_names(tiny: Path, wnids: list[str]) -> list[str]:
    """First synonym from words.txt for each wnid (wnid itself if absent; duplicates disambiguated)."""
    words = tiny / "words.txt"
    if not words.is_file():
        return list(wnids)
    lookup = {}
    for line in words.read_text(encoding="utf-8", errors="replace").splitlines():
        wnid, _, text = line.partition("\t")
        lookup[wnid.strip()] = text.split(",")[0].strip()
    names = [lookup.get(w) or w for w in wnids]
    # ImageNet reuses some words (two "crane"s, two "maillot"s): keep every name unique.
    return [f"{n} ({w})" if names.count(n) > 1 else n for n, w in zip(names, wnids)]


def _listing_signature(
    base: Path, files: Sequence[Path], labels: Sequence[np.ndarray], extra: Sequence[Path]
) -> str:
    """Cheap identity of a folder dataset: file names, sizes and labels (no pixel reads)."""
    h = hashlib.sha256(b"mctool-listing-v1\n")
    for p in (*files, *extra):
        h.update(f"{p.relative_to(base).as_posix()}\t{p.stat().st_size}\n".encode())
    for y in labels:
        h.update(y.tobytes())
    return h.hexdigest()


def _cache_matches(cached: dict[str, Any] | None, signature: str, shapes: dict[str, tuple[int, ...]]) -> bool:
    """Whether a decoded-image cache was made from this listing and holds uint8 tensors of these shapes."""
    if cached is None or cached.get("signature") != signature:
        return False
    for key, shape in shapes.items():
        t = cached.get(key)
        if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or tuple(t.shape) != shape:
            return False
    return True


def _load_tiny(root: Path, download: bool) -> Dataset:
    """Read Tiny ImageNet (200 classes, 64x64), decoding once and caching the tensors."""
    hint = (
        f"download {_TINY_URL} and unzip it into {root} so that {root / 'tiny-imagenet-200' / 'train'} "
        f"exists, or choose another data folder with --data-dir / MCTOOL_DATA"
    )
    tiny = _tiny_root(root)
    if tiny is None and download:
        from torchvision.datasets.utils import download_and_extract_archive

        _fetch("Tiny ImageNet", lambda: download_and_extract_archive(_TINY_URL, str(root)), hint)
        tiny = _tiny_root(root)
    if tiny is None:
        raise DatasetNotFound(f"Tiny ImageNet not found: {hint}")

    wnids = _subdirs(tiny / "train")
    if not wnids:
        raise UsageError(f"no class folders in {tiny / 'train'}")
    train_files, train_y = _class_files(tiny / "train", wnids)
    if not train_files:
        raise UsageError(f"no training images under {tiny / 'train'}")
    test_files, test_y, extra = _tiny_val(tiny / "val", wnids)
    signature = _listing_signature(tiny, train_files + test_files, (train_y, test_y), extra)

    cache_path = tiny / _TINY_CACHE
    cached = _load_cache(cache_path)
    shapes = {"train_images": len(train_files), "test_images": len(test_files)}
    if _cache_matches(cached, signature, {k: (n, 3, 64, 64) for k, n in shapes.items()}):
        assert cached is not None
        train_x, test_x = cached["train_images"], cached["test_images"]
    else:
        train_x = torch.from_numpy(_decode_images(train_files, (64, 64))[0])
        test_x = torch.from_numpy(_decode_images(test_files, (64, 64))[0])
        _save_atomic({"signature": signature, "train_images": train_x, "test_images": test_x}, cache_path)
    train_yt, test_yt = torch.from_numpy(train_y), torch.from_numpy(test_y)
    names = _tiny_class_names(tiny, wnids)
    return Dataset(
        "tinyimagenet", train_x, train_yt, test_x, test_yt, names, IMAGENET_MEAN, IMAGENET_STD, True
    )


# --------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST: IDX files, gzipped or not


@dataclass(frozen=True)
class _IdxSpec:
    name: str
    title: str
    folders: tuple[str, ...]  # relative to the data dir, in search order
    url: str
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    flip: bool
    torchvision_class: str
    apt_package: str | None


_IDX = {
    "fashion-mnist": _IdxSpec(
        "fashion-mnist", "Fashion-MNIST", ("fashion-mnist", "FashionMNIST/raw"),
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        tuple(FASHION_CLASSES), (0.2861,), (0.3530,), True, "FashionMNIST", "dataset-fashion-mnist",
    ),
    # No flips for digits: a mirrored 2 or 7 is not a digit.
    "mnist": _IdxSpec(
        "mnist", "MNIST", ("mnist", "MNIST/raw"), "https://ossci-datasets.s3.amazonaws.com/mnist/",
        tuple(str(i) for i in range(10)), (0.1307,), (0.3081,), False, "MNIST", None,
    ),
}  # fmt: skip

_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _idx_file(folder: Path, stem: str) -> Path | None:
    """The file for `stem` in folder: plain or .gz, also the "train-images.idx3-ubyte" spelling."""
    for base in (stem, stem.replace("-idx", ".idx")):
        for name in (base, base + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes with `ndim` dimensions (gzipped or not) as a uint8 array."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":  # gzip magic: decide by content, not by the file name
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise UsageError(f"cannot read {path}: {_one_line(err)}") from err
    header = 4 + 4 * ndim
    # Magic: two zero bytes, type 0x08 (unsigned byte), number of dimensions.
    if len(raw) < header or raw[:4] != bytes((0, 0, 0x08, ndim)):
        raise UsageError(f"{path} is not an IDX file of {ndim}-D unsigned bytes (bad magic number)")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    if len(raw) - header != math.prod(dims):
        raise UsageError(
            f"{path} is truncated or corrupt: its header promises {math.prod(dims)} bytes of data, "
            f"found {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()  # copy: writable


def _idx_folder(spec: _IdxSpec, root: Path) -> Path | None:
    """The first folder in the search order that has all four IDX files."""
    for folder in (*(root / f for f in spec.folders), *SYSTEM_IDX_DIRS.get(spec.name, ())):
        if all(_idx_file(folder, stem) for stem in _IDX_FILES.values()):
            return folder
    return None


def _load_idx_dataset(spec: _IdxSpec, root: Path, download: bool) -> Dataset:
    """Read (Fashion-)MNIST from IDX files in the data dir or a system location."""
    where = root / spec.folders[0]
    hint = (
        f"put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
        f"t10k-labels-idx1-ubyte.gz (from {spec.url}) in {where}, or choose another data folder with "
        f"--data-dir / MCTOOL_DATA"
    )
    if spec.apt_package:
        hint = f"install it with 'apt-get install {spec.apt_package}', or {hint}"
    folder = _idx_folder(spec, root)
    if folder is None and download:
        import torchvision.datasets as tvd  # only needed for downloads

        dataset_class = getattr(tvd, spec.torchvision_class)
        _fetch(spec.title, lambda: dataset_class(root=str(root), train=True, download=True), hint)
        folder = _idx_folder(spec, root)
    if folder is None:
        raise DatasetNotFound(f"{spec.title} not found: {hint}")

    paths = {key: _idx_file(folder, stem) for key, stem in _IDX_FILES.items()}
    arrays: dict[str, np.ndarray] = {}
    for key, path in paths.items():
        assert path is not None  # _idx_folder checked all four
        arrays[key] = _read_idx(path, 3 if key.endswith("images") else 1)
    for split in ("train", "test"):
        n_img, n_lab = len(arrays[f"{split}_images"]), len(arrays[f"{split}_labels"])
        if n_img != n_lab:
            raise UsageError(f"{paths[f'{split}_labels']} has {n_lab} labels for {n_img} images")
        _check_labels(arrays[f"{split}_labels"], len(spec.class_names), paths[f"{split}_labels"])
    train_x, train_y = _tensors(arrays["train_images"][:, None], arrays["train_labels"])
    test_x, test_y = _tensors(arrays["test_images"][:, None], arrays["test_labels"])
    names = list(spec.class_names)
    return Dataset(spec.name, train_x, train_y, test_x, test_y, names, spec.mean, spec.std, spec.flip)


# --------------------------------------------------------------------------------------------
# folder:PATH — one subfolder per class under train/ and test/ (or val/)


def _channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images in [0, 1] units (float64 running sums)."""
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    for part in images.split(chunk):
        x = part.transpose(0, 1).reshape(c, -1).double()
        total += x.sum(1)
        total_sq += (x * x).sum(1)
    n = images.numel() // c
    mean = total / n
    # A constant channel would divide by zero when normalising; a tiny floor maps it to 0 instead.
    std = (total_sq / n - mean * mean).clamp_min(0).sqrt().clamp_min(1e-6 * 255)
    return tuple((mean / 255).tolist()), tuple((std / 255).tolist())


def count_folder_images(spec: str, split: str = "train") -> int | None:
    """How many images a folder dataset's `split` holds, from the listing alone (None when the
    folder is not there)."""
    folder = Path(spec.strip()).expanduser() / split
    if not folder.is_dir():
        return None
    return len(_class_files(folder, _subdirs(folder))[0])


def _load_folder(spec: str) -> Dataset:
    """Read a class-per-folder dataset: PATH/train/<class>/* and PATH/test/<class>/* (or val/)."""
    if not spec.strip():
        raise UsageError("folder: needs a path, e.g. folder:/data/mypets")
    path = Path(spec.strip()).expanduser().resolve()
    layout = f"expected {path}/train/<class>/* and {path}/test/<class>/* (or val/)"
    if not (path / "train").is_dir():
        raise DatasetNotFound(f"folder dataset {path} has no train/ folder: {layout}")
    test_dir = next((path / s for s in ("test", "val") if (path / s).is_dir()), None)
    if test_dir is None:
        raise DatasetNotFound(f"folder dataset {path} has no test/ or val/ folder: {layout}")
    classes = _subdirs(path / "train")
    test_classes = _subdirs(test_dir)
    if classes != test_classes:
        raise UsageError(_class_mismatch(test_dir, classes, test_classes))
    if not classes:
        raise UsageError(f"no class folders in {path / 'train'}: {layout}")
    train_files, train_y = _class_files(path / "train", classes)
    test_files, test_y = _class_files(test_dir, classes)
    empty = [c for c, n in zip(classes, np.bincount(train_y, minlength=len(classes))) if n == 0]
    if empty:
        raise UsageError(f"class folder {path / 'train' / empty[0]} has no images")
    if not test_files:
        raise UsageError(f"no images under {test_dir}")

    images, grey = _decode_images(train_files + test_files)
    if grey.all():  # only an all-greyscale dataset becomes 1-channel
        images = np.ascontiguousarray(images[:, :1])
    n = len(train_files)
    train_x, train_yt = _tensors(images[:n], train_y)
    test_x, test_yt = _tensors(images[n:], test_y)
    mean, std = _channel_stats(train_x)
    return Dataset(f"folder:{path}", train_x, train_yt, test_x, test_yt, classes, mean, std, True)


# --------------------------------------------------------------------------------------------
# Preprocessing: normalisation or ZCA whitening


@dataclass
class Preprocessing:
    """How images enter the networks: per-channel normalisation or ZCA whitening (method.md §1.3)."""

    kind: str  # "zca" or "normalize"
    mean: torch.Tensor  # normalize: per channel [C]; zca: per feature [D], D = C*H*W (float32)
    std: torch.Tensor | None = None  # normalize only, [C]
    zca_eps: float = 0.0  # zca only (0.1 in the method)
    transform: torch.Tensor | None = None  # zca: D x D whitening matrix T
    transform_inv: torch.Tensor | None = None  # zca: D x D inverse of T

    def _check(self, x: torch.Tensor) -> None:
        """Refuse images whose shape does not fit the fitted statistics."""
        if x.dim() != 4:
            raise ValueError(f"expected images [N, C, H, W], got {tuple(x.shape)}")
        if self.kind == "zca" and math.prod(x.shape[1:]) != self.mean.numel():
            got = math.prod(x.shape[1:])
            raise ValueError(f"ZCA was fitted on {self.mean.numel()} features, images have {got}")
        if self.kind == "normalize" and x.shape[1] != self.mean.numel():
            raise ValueError(f"normalisation has {self.mean.numel()} channels, images have {x.shape[1]}")

    @torch.no_grad()
    def apply(
        self, images_uint8: torch.Tensor, device: torch.device | str | None = None, batch: int = 4096
    ) -> torch.Tensor:
        """Preprocess images (uint8 0..255, or float already in [0, 1]) to float32 on `device`."""
        self._check(images_uint8)
        dev = torch.device(device) if device is not None else images_uint8.device
        out = torch.empty(images_uint8.shape, dtype=torch.float32, device=dev)
        if self.kind == "zca":
            assert self.transform is not None
            mu, t = self.mean.to(dev, torch.float32).reshape(1, -1), self.transform.to(dev, torch.float32)
        else:
            assert self.std is not None
            mu = self.mean.to(dev, torch.float32).view(1, -1, 1, 1)
            sd = self.std.to(dev, torch.float32).view(1, -1, 1, 1)
        for start in range(0, images_uint8.shape[0], batch):
            x = images_uint8[start : start + batch].to(dev)
            x = x.float() / 255 if x.dtype == torch.uint8 else x.float()  # ToTensor's scaling
            if self.kind == "zca":
                y = (x.reshape(x.shape[0], -1) - mu) @ t  # kornia's linear_transform
                out[start : start + batch] = y.view(x.shape)
            else:
                out[start : start + batch] = (x - mu) / sd
        return out

    @torch.no_grad()
    def invert(self, x: torch.Tensor) -> torch.Tensor:
        """Map preprocessed images back to pixel space in [0, 1] (for viewing), on x's device."""
        self._check(x)
        x = x.detach().float()
        if self.kind == "zca":
            assert self.transform_inv is not None
            t_inv = self.transform_inv.to(x.device, torch.float32)
            mu = self.mean.to(x.device, torch.float32).reshape(1, -1)
            # kornia's inverse_transform: (y + mu T) T_inv = y T_inv + mu, since T T_inv = I.
            pixels = (x.reshape(x.shape[0], -1) @ t_inv + mu).view(x.shape)
        else:
            assert self.std is not None
            mu = self.mean.to(x.device, torch.float32).view(1, -1, 1, 1)
            pixels = x * self.std.to(x.device, torch.float32).view(1, -1, 1, 1) + mu
        return pixels.clamp(0, 1)

    def to_state(self) -> dict[str, torch.Tensor | float | str]:
        """A plain dict (tensors, floats, str) for caching or storing; None fields are left out."""
        state: dict[str, torch.Tensor | float | str] = {"kind": self.kind, "zca_eps": float(self.zca_eps)}
        for key in ("mean", "std", "transform", "transform_inv"):
            value = getattr(self, key)
            if value is not None:
                state[key] = value.detach().cpu()
        return state

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Preprocessing:
        """Rebuild from to_state()'s dict (tensors or numpy arrays, e.g. read back from HDF5)."""
        kind = state.get("kind")
        kind = kind.decode() if isinstance(kind, bytes) else kind
        needed = {"zca": ("mean", "transform", "transform_inv"), "normalize": ("mean", "std")}.get(str(kind))
        if needed is None:
            raise ArtifactError(f"unknown preprocessing kind {kind!r} (expected 'zca' or 'normalize')")
        missing = [k for k in needed if state.get(k) is None]
        if missing:
            raise ArtifactError(f"{kind} preprocessing state lacks {', '.join(missing)}")

        def tensor(key: str) -> torch.Tensor | None:
            value = state.get(key)
            if value is None:
                return None
            value = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))
            return value.detach().to("cpu", torch.float32)

        mean = tensor("mean")
        assert mean is not None  # checked above
        eps = float(state.get("zca_eps", 0.0))
        pre = cls(str(kind), mean, tensor("std"), eps, tensor("transform"), tensor("transform_inv"))
        if kind == "zca":
            d = pre.mean.numel()
            pre.mean = pre.mean.reshape(d)
            for key in ("transform", "transform_inv"):
                shape = tuple(getattr(pre, key).shape)
                if shape != (d, d):
                    raise ArtifactError(f"ZCA {key} has shape {shape}, expected {(d, d)}")
        elif pre.std is not None and pre.std.shape != pre.mean.shape:
            raise ArtifactError("normalisation mean and std differ in length")
        return pre


def _fit_zca(ds: Dataset, eps: float, device: torch.device | str | None) -> Preprocessing:
    """Fit kornia's ZCAWhitening on the whole training split in [0, 1] pixels (method.md §1.3)."""
    from kornia.enhance import ZCAWhitening  # imported lazily: only --zca needs kornia

    dev = torch.device(device) if device is not None else torch.device("cpu")
    n, d = ds.train_images.shape[0], ds.channels * ds.height * ds.width
    use_f64 = n * d * 8 <= _ZCA_F64_MAX_BYTES and dev.type != "mps"  # MPS has no float64
    dtype = torch.float64 if use_f64 else torch.float32

    def fit(on: torch.device) -> ZCAWhitening:
        x = ds.train_images.to(on, dtype).div_(255)  # ToTensor only
        return ZCAWhitening(eps=float(eps), compute_inv=True).fit(x)

    try:
        zca: ZCAWhitening | None = fit(dev)
    except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError only from torch 2.5
        # Tiny ImageNet's images, their centred copy and the D×D decomposition need over 11 GB:
        # more than many GPUs have. The CPU is slower, but the fit is cached on disk.
        zca = None
    if zca is None:  # outside the except block, whose traceback still holds the failed attempt's tensors
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        zca = fit(torch.device("cpu"))
    return Preprocessing(
        kind="zca",
        mean=zca.mean_vector.reshape(-1).float().cpu(),
        std=None,
        zca_eps=float(eps),
        transform=zca.transform_matrix.float().cpu(),
        transform_inv=zca.transform_inv.float().cpu(),
    )


def _cached_zca(path: Path, d: int, eps: float) -> Preprocessing | None:
    """A cached ZCA fit if `path` holds one for D features and this eps, else None."""
    state = _load_cache(path)
    if state is None:
        return None
    try:
        pre = Preprocessing.from_state(state)
    except (UsageError, TypeError, ValueError, RuntimeError):  # not our state: refit
        return None
    if pre.kind != "zca" or pre.mean.numel() != d or pre.zca_eps != float(eps):
        return None
    return pre


def fit_preprocessing(
    ds: Dataset,
    zca: bool,
    eps: float = 0.1,
    device: torch.device | str | None = None,
    cache_dir: Path | None = None,
) -> Preprocessing:
    """ZCA fitted on the training split (cached in `cache_dir` if given), or the dataset's mean/std."""
    if not zca:
        return Preprocessing(
            kind="normalize",
            mean=torch.tensor(ds.mean, dtype=torch.float32),
            std=torch.tensor(ds.std, dtype=torch.float32),
        )
    d = ds.channels * ds.height * ds.width
    path = Path(cache_dir) / f"zca-{ds.fingerprint()}-eps{float(eps):g}.pt" if cache_dir is not None else None
    pre = _cached_zca(path, d, eps) if path is not None else None
    if pre is None:
        pre = _fit_zca(ds, eps, device)
        if path is not None:
            _save_atomic(pre.to_state(), path)
    return pre
