"""Import synthetic sets made elsewhere into a synset file that ``mctool evaluate`` scores.

Three sources, each a folder or one images file:

* the MTT/MCT authors' scripts' saved tensors: ``images_<tag>.pt`` with ``labels_<tag>.pt`` and
  (where the script saved it) ``syn_lr_<tag>.pt`` beside it — MTT's ``images_{it}.pt`` /
  ``images_best.pt``, MCT's ``images_ipc-{ipc}_{it}.pt``; MTT's ``images_zca_<tag>.pt`` are
  the same images mapped back to pixels by the inverse ZCA (method.md §6.7, §7);
* a DD-Ranking folder: ``images.pt`` (+ ``labels.pt``, ``lr.pt``);
* an ``mctool export --format mtt|ddranking`` folder: its ``mctool_export.json`` says the
  dataset, the space, the model and the checksums.

What the files do not say is stated by the user or refused with one line: the dataset, whether
the images are ZCA-whitened or mean/std normalised (the space the scripts distil in), the
learned step size when no lr file was saved. Labels missing from a folder are the class-major
blocks of ipc every script builds (a note says so).

Hostile-file rules, as for expert buffers: tensors are read only through the restricted reader
(``torchfile.open_torch_file``, which never runs code); each file must hold one tensor whose
declared shape, dtype and storage size are checked against the dataset's image shape, the class
count and this machine's free memory *before* any byte of it is read; values must be finite,
labels in range, the images per class the same for every class (and equal to the ipc a file
name states). Every refusal is one line (exit 2) and leaves no output; the output is written
atomically and never through a symbolic link.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from mctool import store
from mctool.core.errors import UsageError
from mctool.interop.export import EXPORT_FORMAT, EXPORT_VERSION, META_NAME, _sha256
from mctool.interop.torchfile import LoadedTensor, TensorRef, TorchFileError, open_torch_file
from mctool.models import ModelSpec, default_depth
from mctool.core.progress import SILENT, Reporter

SPACES = ("auto", "preprocessed", "pixels")
FILES_FORMAT = "mtt-scripts"
DDRANKING_FORMAT = "ddranking"
EXPORT_SOURCE = "mctool-export"

# images.pt (DD-Ranking), images_<tag>.pt (MTT/MCT), images_zca_<tag>.pt (MTT: de-whitened).
_IMAGES = re.compile(r"^images(?:_(?P<zca>zca_)?(?P<tag>[^/]+?))?\.pt$")
_IPC_IN_TAG = re.compile(r"(?:^|_)ipc-(\d+)(?:_|$)")
_ITERATION_IN_TAG = re.compile(r"(?:^|_)(\d+)$")
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_INTS = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
_MAX_JSON_BYTES = 16 << 20
_MAX_PARAMS = 200_000_000  # far above any ConvNet the scripts train (CIFAR's: 320k)
_ZIP_MAGIC = b"PK\x03\x04"


@dataclass(frozen=True)
class SynsetImportConfig:
    """What the user states (None: from an export's JSON or a file name; refused when unknown)."""

    dataset: str | None = None
    zca: bool | None = None
    zca_eps: float = 0.1
    space: str = "auto"
    lr: float | None = None  # --syn-lr: the step size to train on the images with
    name: str | None = None
    model: str | None = None
    depth: int | None = None
    width: int | None = None
    norm: str | None = None

    def validate(self) -> None:
        """Settings checked before any file is opened (one line, exit 2)."""
        if self.space not in SPACES:
            raise UsageError(f"unknown --space '{self.space}'; choose from {', '.join(SPACES)}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise UsageError(f"--syn-lr must be a positive number, got {self.lr}")
        if not (math.isfinite(self.zca_eps) and self.zca_eps > 0):
            raise UsageError(f"--zca-eps must be positive, got {self.zca_eps}")
        if self.name is not None:
            check_name(self.name)


def check_name(name: str) -> str:
    """A synset name mctool writes: printable, no '/', not empty."""
    if not name or name != name.strip() or "/" in name or any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        raise UsageError(f"--name {name!r}: a synset name must be non-empty printable text without '/'")
    return name


# --------------------------------------------------------------------------- finding the files


@dataclass(frozen=True)
class Found:
    """The files of one synthetic set and what their names say."""

    format: str  # mtt-scripts, ddranking or mctool-export
    images: Path
    labels: Path | None
    lr: Path | None
    pixels: bool  # images_zca_*: de-whitened, in [0, 1] pixel units
    tag: str
    description: dict[str, Any] | None = None  # an export's mctool_export.json

    def files(self) -> list[Path]:
        """Every file that will be read."""
        return [p for p in (self.images, self.labels, self.lr) if p is not None]


def _image_files(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if _IMAGES.match(p.name) and p.is_file())
    except OSError as exc:
        raise UsageError(f"{folder}: cannot list ({exc.strerror or exc})") from None


def looks_like_synset(path: Path) -> bool:
    """Whether `path` is a synthetic set (an images file, an export, a folder of images_*.pt) rather
    than a folder of expert buffers (replay_buffer_*.pt, waypoint/step pairs)."""
    if path.is_file():
        return bool(_IMAGES.match(path.name))
    if not path.is_dir():
        return False
    if (path / META_NAME).is_file():
        return True
    try:
        names = [p.name for p in path.iterdir()]
    except OSError:
        return False
    experts = any(n.startswith(("replay_buffer_", "waypoint_buffer", "step_buffer")) for n in names)
    return not experts and any(_IMAGES.match(n) for n in names)


def _companion(folder: Path, kinds: tuple[str, ...], tag: str) -> Path | None:
    for kind in kinds:
        p = folder / (f"{kind}_{tag}.pt" if tag else f"{kind}.pt")
        if p.is_file():
            return p
        if p.exists() or p.is_symlink():  # a folder, a device, a dangling link: not "absent"
            raise UsageError(f"{p}: not a regular file")
    return None


def _from_images_file(images: Path) -> Found:
    m = _IMAGES.match(images.name)
    assert m is not None
    tag, pixels = m.group("tag") or "", bool(m.group("zca"))
    folder = images.parent
    fmt = DDRANKING_FORMAT if not tag else FILES_FORMAT
    return Found(fmt, images, _companion(folder, ("labels",), tag), _companion(folder, ("syn_lr", "lr"), tag), pixels,
                 tag)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        size = path.stat().st_size
        if size > _MAX_JSON_BYTES:
            raise UsageError(f"{path}: {size} bytes: too large for an export description")
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: nested too deeply for the parser
        raise UsageError(f"{path}: unreadable ({' '.join(str(exc).split())[:160]})") from None
    if not isinstance(doc, dict) or doc.get("format") != EXPORT_FORMAT:
        raise UsageError(f"{path}: not an mctool export description")
    version = doc.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version > EXPORT_VERSION:
        raise UsageError(f"{path}: an export version this mctool does not understand ({version!r})")
    return doc


def _from_export(folder: Path) -> Found:
    doc = _read_json(folder / META_NAME)
    files = doc.get("files")
    if not isinstance(files, dict) or not isinstance(files.get("images"), str):
        raise UsageError(f"{folder}: a {doc.get('layout')!r} export holds no image tensors (a PNG export cannot "
                         "be imported: its pixels were rounded to 8 bits)")

    def member(key: str) -> Path | None:
        name = files.get(key)
        if name is None:
            return None
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise UsageError(f"{folder / META_NAME}: files.{key} must be a file name in the folder, got {name!r}")
        return folder / name

    sums = doc.get("sha256")
    found = Found(EXPORT_SOURCE, member("images"), member("labels"), member("lr"), False,  # type: ignore[arg-type]
                  "", doc)
    if not isinstance(sums, dict):
        raise UsageError(f"{folder / META_NAME}: no sha256 of its files")
    for path in found.files():
        digest = sums.get(path.name)
        if not path.is_file():
            raise UsageError(f"{path}: missing (the export lists it)")
        if not isinstance(digest, str) or _sha256(path) != digest:
            raise UsageError(f"{path}: changed since the export (its SHA-256 differs from {META_NAME}'s)")
    if found.labels is None or found.lr is None:
        raise UsageError(f"{folder / META_NAME}: lists no labels or lr file")
    return found


def find(path: Path) -> Found:
    """The synthetic set at `path` (a folder or an images file); one line when it is ambiguous."""
    if path.is_dir():
        if (path / META_NAME).is_file():
            return _from_export(path)
        candidates = _image_files(path)
        whitened = [p for p in candidates if not _IMAGES.match(p.name).group("zca")]  # type: ignore[union-attr]
        pool = whitened or candidates
        if not pool:
            raise UsageError(f"{path}: no images*.pt (MTT/MCT images_<tag>.pt, DD-Ranking images.pt) and no "
                             f"{META_NAME}")
        if len(pool) > 1:
            shown = ", ".join(p.name for p in pool[:4]) + (", ..." if len(pool) > 4 else "")
            raise UsageError(f"{path}: holds {len(pool)} image files ({shown}); name the one to import, e.g. "
                             f"mctool import {path / pool[-1].name}")
        return _from_images_file(pool[0])
    if path.is_file():
        if not _IMAGES.match(path.name):
            raise UsageError(f"{path}: not an images file (expected images.pt, images_<tag>.pt or "
                             "images_zca_<tag>.pt)")
        meta = path.parent / META_NAME
        if meta.is_file():
            found = _from_export(path.parent)
            if found.images.name == path.name:
                return found
        return _from_images_file(path)
    if path.exists():  # a device, a FIFO, a socket: never opened
        raise UsageError(f"{path}: not a regular file")
    raise UsageError(f"{path}: no such file or folder")


# --------------------------------------------------------------------------- what the files are


@dataclass(frozen=True)
class Stated:
    """The dataset, space and model the import will use, and where each came from."""

    dataset: str
    zca: bool
    zca_eps: float
    pixels: bool
    notes: tuple[str, ...] = ()
    fingerprint: str | None = None  # an export's: the dataset here must be the same


def resolve(found: Found, cfg: SynsetImportConfig) -> Stated:
    """The user's statements checked against what an export or a file name says."""
    notes: list[str] = []
    dataset, zca, eps = cfg.dataset, cfg.zca, cfg.zca_eps
    fingerprint = None
    if found.description is not None:
        space = found.description.get("space")
        if not isinstance(space, dict) or space.get("kind") not in ("zca", "normalize") \
                or not isinstance(space.get("dataset"), str):
            raise UsageError(f"{found.images.parent / META_NAME}: its 'space' does not say the dataset and "
                             "preprocessing")
        said_zca = space["kind"] == "zca"
        if dataset is not None and _canonical(dataset) != _canonical(space["dataset"]):
            raise UsageError(f"--dataset {dataset}: the export says its images are of '{space['dataset']}'")
        if zca is not None and zca != said_zca:
            raise UsageError(f"--{'zca' if zca else 'no-zca'}: the export says its images are "
                             f"{'ZCA-whitened' if said_zca else 'mean/std normalised'}")
        dataset, zca = space["dataset"], said_zca
        if said_zca:
            stored_eps = space.get("zca_eps")
            if not isinstance(stored_eps, (int, float)) or not stored_eps > 0:
                raise UsageError(f"{found.images.parent / META_NAME}: space.zca_eps must be a positive number")
            eps = float(stored_eps)
        fp = space.get("train_fingerprint")
        fingerprint = fp if isinstance(fp, str) else None
        notes.append(f"dataset '{dataset}' and {'ZCA' if zca else 'normalised'} space from {META_NAME}")
    if found.pixels:
        if zca is False:
            raise UsageError(f"{found.images.name}: MTT writes images_zca_* only with --zca (the images de-whitened "
                             "to pixels); --no-zca contradicts the name")
        if zca is None:
            zca = True
            notes.append(f"{found.images.name}: the scripts write images_zca_* only for ZCA runs: ZCA")
    if dataset is None:
        raise UsageError(f"{found.images}: the files do not say which dataset the images are of; pass --dataset")
    if zca is None:
        raise UsageError(f"{found.images}: the files do not say whether the images are ZCA-whitened (the scripts' "
                         "--zca) or mean/std normalised; pass --zca or --no-zca")
    pixels = found.pixels if cfg.space == "auto" else cfg.space == "pixels"
    if found.pixels and not pixels:
        notes.append(f"{found.images.name} read as preprocessed images, as --space says (the scripts' images_zca_* "
                     "are pixels)")
    return Stated(_canonical(dataset), zca, eps, pixels, tuple(notes), fingerprint)


def _canonical(name: str) -> str:
    from mctool.data.datasets import canonical_name

    return canonical_name(name)


def model_spec(found: Found, cfg: SynsetImportConfig, channels: int, classes: int,
               size: tuple[int, int]) -> tuple[ModelSpec, str]:
    """The network evaluation trains: the export's, else the scripts' ConvNet (width 128,
    instancenorm) adjusted by --model/--depth/--width/--norm; with where it came from."""
    from mctool.models import build_model, param_layout
    from mctool.models.build import CONVNET_VARIANTS
    from mctool.models.convnet import NORMS

    base = ModelSpec(channels=channels, num_classes=classes, im_size=size, depth=default_depth(size[0], size[1]))
    origin = "the scripts' default ConvNet"
    stored = (found.description or {}).get("model")
    if isinstance(stored, dict):
        try:
            base = replace(ModelSpec.from_dict(stored), channels=channels, num_classes=classes, im_size=size)
        except (TypeError, ValueError):
            raise UsageError(f"{found.images.parent / META_NAME}: 'model' is not a model description") from None
        origin = f"the export's {META_NAME}"
    if cfg.model is not None:
        if cfg.model not in CONVNET_VARIANTS:
            raise UsageError(f"--model {cfg.model}: choose from {', '.join(CONVNET_VARIANTS)}")
        base = replace(base, arch="ConvNet", **CONVNET_VARIANTS[cfg.model])
        origin = f"--model {cfg.model}"
    overrides = {k: v for k, v in (("depth", cfg.depth), ("width", cfg.width), ("norm", cfg.norm)) if v is not None}
    if overrides:
        base = replace(base, **overrides)
        origin += " with " + ", ".join(f"--{k} {v}" for k, v in overrides.items())
    if base.norm not in NORMS:
        raise UsageError(f"--norm {base.norm}: choose from {', '.join(NORMS)}")
    if base.arch != "ConvNet":
        raise UsageError(f"model '{base.arch}': imports are evaluated on the scripts' ConvNet family")
    # Counted before the network is built: a width from a file or an option is not allocated unchecked.
    params = base.depth * (base.width * base.width * 9 + 3 * base.width) + base.width * size[0] * size[1] * classes
    if not 1 <= base.depth <= 8 or not 1 <= base.width or params > _MAX_PARAMS:
        raise UsageError(f"ConvNet depth {base.depth} width {base.width}: about {params:,} parameters, larger than any "
                         "network the scripts train (depth 1-8)")
    try:
        param_layout(build_model(base))
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001 - an impossible spec fails in many ways inside torch
        raise UsageError(f"{origin}: no such ConvNet for {size[0]}x{size[1]} images ({exc})") from None
    return base, origin


# --------------------------------------------------------------------------- reading, checked


def _describe(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def _open(path: Path, max_bytes: int) -> Any:
    """open_torch_file, after refusing a legacy-format file larger than `max_bytes` (those are read whole)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise TorchFileError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if head != _ZIP_MAGIC and size > max_bytes + (1 << 20):
        # Legacy (pre-1.6) files are loaded whole: their size is what opening them costs.
        raise TorchFileError(f"{path}: {size} bytes in the legacy torch format: more than the "
                             f"{max_bytes} bytes this tensor can need")
    return open_torch_file(path)


def _one_tensor(tf: Any) -> TensorRef | LoadedTensor:
    root = tf.root
    if isinstance(root, (list, tuple)) and len(root) == 1 and isinstance(root[0], (TensorRef, LoadedTensor)):
        root = root[0]
    if not isinstance(root, (TensorRef, LoadedTensor)):
        raise TorchFileError(f"{tf.path}: holds a list, expected one tensor (a plain torch.save of a tensor)")
    return root


def declared(path: Path, max_bytes: int) -> tuple[tuple[int, ...], torch.dtype]:
    """Shape and dtype of the one tensor `path` holds (the pickle only: no tensor bytes read)."""
    with _open(path, max_bytes) as tf:
        root = _one_tensor(tf)
        return tuple(int(s) for s in root.shape), root.dtype


def read_tensor(path: Path, check: Callable[[tuple[int, ...], torch.dtype], None], max_bytes: int) -> torch.Tensor:
    """The one tensor `path` holds, read only after `check(shape, dtype)` accepted its declared shape
    and its storage (what reading it inflates) fits `max_bytes`."""
    with _open(path, max_bytes) as tf:
        root = _one_tensor(tf)
        check(tuple(int(s) for s in root.shape), root.dtype)
        itemsize = torch.empty(0, dtype=root.dtype).element_size()
        need = root.numel() * itemsize
        stored = root.storage.nbytes if isinstance(root, TensorRef) else need
        # Reading inflates the whole storage: one much larger than the tensor (a slice of a huge
        # buffer, a deflate bomb) is refused, not read; the scripts save whole tensors (stored = need).
        allowed = min(max_bytes, 4 * need + (1 << 20))
        if need > max_bytes or stored > allowed:
            raise TorchFileError(f"{path}: its storage declares {stored} bytes for a {_describe(tuple(root.shape))} "
                                 f"tensor of {need} bytes (at most {allowed} are read)")
        return tf.read(root)


def _limit_bytes() -> int:
    """What one imported tensor may take: half the free memory (the images are copied once)."""
    from mctool.matching.memory import free_bytes

    free = free_bytes("cpu")
    return (free // 2) if free else (16 << 30)


@dataclass
class Checked:
    """The tensors of a synthetic set, checked against the dataset."""

    images: torch.Tensor  # float32 [N, C, H, W]
    labels: torch.Tensor  # int64 [N] or float32 [N, classes]
    lr: float
    ipc: int
    notes: list[str] = field(default_factory=list)


def read_checked(found: Found, cfg: SynsetImportConfig, image_shape: tuple[int, int, int], classes: int,
                 limit: int | None = None) -> Checked:
    """Images, labels and lr read and checked: shapes before reading, values after."""
    from mctool.store.synsets import MAX_IMAGES

    limit = _limit_bytes() if limit is None else limit
    notes: list[str] = []
    c, h, w = image_shape
    per_image = c * h * w

    def images_ok(shape: tuple[int, ...], dtype: torch.dtype) -> None:
        if dtype not in _FLOATS:
            raise TorchFileError(f"{found.images}: images are {str(dtype).replace('torch.', '')}; expected floating "
                                 "point (the scripts save float32)")
        if len(shape) != 4 or tuple(shape[1:]) != image_shape:
            raise TorchFileError(f"{found.images}: images of shape {_describe(shape)}; the dataset's are "
                                 f"[N, {c}, {h}, {w}]")
        n = shape[0]
        _check_count(found, n, classes)
        if n > MAX_IMAGES or n * per_image * 4 > limit:
            raise TorchFileError(f"{found.images}: declares {n} images of {c}x{h}x{w} "
                                 f"({n * per_image * 4 / 1e9:.1f} GB as float32): more than this machine can hold "
                                 f"({limit / 1e9:.1f} GB)")

    images = read_tensor(found.images, images_ok, limit).to(torch.float32)
    n = images.shape[0]
    if not bool(torch.isfinite(images).all()):
        bad = int((~torch.isfinite(images)).sum())
        raise UsageError(f"{found.images}: {bad} image value(s) are NaN or infinite")
    ipc = n // classes
    labels = _labels(found, n, classes, notes)
    if labels.dim() == 1:
        counts = torch.bincount(labels, minlength=classes)
        if not bool((counts == ipc).all()):
            k = int((counts != ipc).nonzero()[0])
            raise UsageError(f"{found.labels}: class {k} has {int(counts[k])} images, others {ipc}: the images per "
                             "class must be the same for every class")
    _check_count(found, n, classes)
    return Checked(images, labels, _lr(found, cfg, notes), ipc, notes)


def _check_count(found: Found, n: int, classes: int) -> None:
    """N images: a whole number per class, and the ipc a file name or an export states."""
    if n == 0 or n % classes:
        raise TorchFileError(f"{found.images}: {n} images: not a whole number of images for each of the "
                             f"{classes} classes")
    said = _IPC_IN_TAG.search(found.tag)
    said_ipc = int(said.group(1)) if said else (found.description or {}).get("ipc")
    if said_ipc is not None and said_ipc != n // classes:
        where = found.images.name if said else META_NAME
        raise UsageError(f"{where} says ipc {said_ipc}, but {n} images of {classes} classes are ipc {n // classes}")


def _labels(found: Found, n: int, classes: int, notes: list[str]) -> torch.Tensor:
    if found.labels is None:
        notes.append(f"no labels file beside {found.images.name}: class-major labels (ipc images of class 0, then "
                     "class 1, ...), as MTT, MCT and DD-Ranking build them")
        return store.class_major_labels(classes, n // classes)
    path = found.labels

    def labels_ok(shape: tuple[int, ...], dtype: torch.dtype) -> None:
        if shape == (n,) and (dtype in _INTS or dtype in _FLOATS):
            return
        if shape == (n, classes) and dtype in _FLOATS:
            return
        raise TorchFileError(f"{path}: labels of shape {_describe(shape)} ({str(dtype).replace('torch.', '')}); "
                             f"expected [{n}] class ids or [{n}, {classes}] probabilities for the {n} images")

    labels = read_tensor(path, labels_ok, max(1 << 20, n * classes * 8))
    if labels.dtype in _FLOATS and not bool(torch.isfinite(labels).all()):
        raise UsageError(f"{path}: labels hold NaN or infinite values")
    if labels.dim() == 1:
        if labels.dtype in _FLOATS:
            if not bool((labels == labels.round()).all()):
                raise UsageError(f"{path}: float labels that are not whole class ids")
            notes.append(f"{path.name}: float class ids converted to int64")
        labels = labels.to(torch.int64)
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= classes:
            raise UsageError(f"{path}: holds class {low if low < 0 else high} outside 0..{classes - 1}")
        return labels
    labels = labels.to(torch.float32)
    if bool((labels < 0).any()) or float((labels.sum(1) - 1).abs().max()) > 1e-3:
        raise UsageError(f"{path}: soft labels must be probabilities (non-negative, rows summing to 1); logits "
                         "are not imported")
    notes.append(f"{path.name}: soft labels (probabilities per class)")
    return labels


def _lr(found: Found, cfg: SynsetImportConfig, notes: list[str]) -> float:
    if found.lr is None:
        if cfg.lr is None:
            raise UsageError(f"{found.images}: no syn_lr/lr file beside it says the step size to train on the images "
                             "with; pass --syn-lr (the scripts' initial --lr_teacher is 0.01)")
        return cfg.lr
    path = found.lr

    def lr_ok(shape: tuple[int, ...], dtype: torch.dtype) -> None:
        if math.prod(shape) != 1 or dtype not in _FLOATS:
            raise TorchFileError(f"{path}: expected one floating-point number (the learned step size), got "
                                 f"{str(dtype).replace('torch.', '')} {_describe(shape)}")

    value = float(read_tensor(path, lr_ok, 1 << 20).reshape(()).item())
    if cfg.lr is not None:
        notes.append(f"--syn-lr {cfg.lr:g} used instead of the {value:g} in {path.name}")
        return cfg.lr
    if not (math.isfinite(value) and value > 0):
        raise UsageError(f"{path}: the learned step size is {value:g}, not a usable learning rate (MCT's α can go "
                         "negative); pass --syn-lr")
    return value


# --------------------------------------------------------------------------- the import


@dataclass
class SynsetImportResult:
    """What `mctool import` did with a synthetic set."""

    file: str
    synset: str
    format: str
    source: str
    dataset: str
    zca: bool
    space: str
    images: int
    ipc: int
    labels: str
    lr: float
    model: dict[str, Any]
    model_from: str
    notes: list[str]
    already_imported: bool = False


def _looks_like_pixels(images: torch.Tensor) -> bool:
    return float(images.min()) >= 0.0 and float(images.max()) <= 1.0


def _to_space(images: torch.Tensor, prep: Any) -> torch.Tensor:
    """Pixels in [0, 1] → the training space (ZCA or mean/std), as the scripts' data loader does."""
    return prep.apply(images, device="cpu")


def run(path: Path, out: Path, cfg: SynsetImportConfig, data_dir: Path | None = None, download: bool = True,
        reporter: Reporter = SILENT) -> SynsetImportResult:
    """`mctool import` of a synthetic set: find and check the files, load the dataset they are of
    (its fingerprint goes into /dataset), write one synset that `mctool evaluate` scores."""
    from mctool.data.datasets import CLASSES, SHAPES
    from mctool.interop import h5out
    from mctool.data.prepared import prepare

    cfg.validate()
    found = find(path)
    stated = resolve(found, cfg)
    if found.lr is None and cfg.lr is None:
        _lr(found, cfg, [])  # refused now, not after loading the dataset
    name = check_name(str(cfg.name or (found.description or {}).get("synset")
                          or (f"imported-{found.tag}" if found.tag else "imported")))
    sums = {p.name: _sha256(p) for p in found.files()}
    h5out.check_synset_output(out, name, sums)  # a taken name is refused before the dataset is loaded
    notes = list(stated.notes)
    # Every pickle is checked, and the images' shape against the named dataset's, before the
    # dataset is loaded (no tensor bytes are read yet).
    limit = _limit_bytes()
    for p in found.files():
        shape, _ = declared(p, limit)
        known, classes = SHAPES.get(stated.dataset), CLASSES.get(stated.dataset)
        if p == found.images and known is not None and (len(shape) != 4 or tuple(shape[1:]) != known):
            raise TorchFileError(f"{p}: images of shape {_describe(shape)}; {stated.dataset}'s are "
                                 f"[N, {known[0]}, {known[1]}, {known[2]}]")
        if p == found.images and classes is not None:
            _check_count(found, shape[0], classes)
    for note in notes:
        reporter.log(f"note: {note}")
    reporter.log(f"loading {stated.dataset}" + (" and fitting ZCA (cached after the first time)" if stated.zca else ""))
    prepared = prepare(stated.dataset, data_dir, stated.zca, stated.zca_eps, torch.device("cpu"), download=download)
    meta = prepared.meta
    if stated.fingerprint is not None and stated.fingerprint != meta.train_fingerprint:
        raise UsageError(f"dataset '{meta.name}' on this machine differs from the one the export was made from "
                         f"(fingerprint {meta.train_fingerprint} != {stated.fingerprint})")
    spec, origin = model_spec(found, cfg, meta.channels, meta.num_classes, (meta.height, meta.width))
    checked = read_checked(found, cfg, meta.image_shape, meta.num_classes, limit)
    notes += checked.notes
    images = checked.images
    if stated.pixels:
        images = _to_space(images, prepared.prep)
        notes.append(f"{found.images.name}: pixels mapped into the {'ZCA' if stated.zca else 'normalised'} space with "
                     f"the dataset's {'ZCA fitted here' if stated.zca else 'mean/std'}")
    elif _looks_like_pixels(images):
        notes.append(f"{found.images.name}: every value lies in [0, 1], as pixels do; if these are not "
                     f"{'ZCA-whitened' if stated.zca else 'normalised'} images, import again with --space pixels")
    source = {"format": found.format, "files": [str(p.resolve()) for p in found.files()], "sha256": sums,
              "space": "pixels" if stated.pixels else "preprocessed"}
    iteration = _ITERATION_IN_TAG.search(found.tag)
    iterations = int(iteration.group(1)) if iteration else int((found.description or {}).get("iterations") or 0)
    reference = (found.description or {}).get("experts_reference")
    config = {"imported": True, "format": found.format, "dataset": meta.name, "zca": meta.zca,
              "zca_eps": meta.zca_eps, "space": source["space"], "model_from": origin}
    already = h5out.write_imported_synset(out, name, images, checked.labels, checked.lr, checked.ipc, iterations,
                                          meta, spec, config, source,
                                          reference if isinstance(reference, dict) else None)
    for note in notes[len(stated.notes):]:
        reporter.log(f"note: {note}")
    return SynsetImportResult(
        file=str(out), synset=name, format=found.format, source=str(found.images), dataset=meta.name, zca=meta.zca,
        space=source["space"], images=int(images.shape[0]), ipc=checked.ipc,
        labels="soft" if checked.labels.dim() == 2 else "hard", lr=checked.lr, model=spec.to_dict(),
        model_from=origin, notes=notes, already_imported=already)
