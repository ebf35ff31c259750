"""Export a synthetic set as the files MTT-family scripts and DD-Ranking read, or as PNGs per class.

Tensor layouts (each tensor file is a plain ``torch.save`` of one tensor):

* ``mtt``: ``images_best.pt`` (float32 [N, C, H, W], in the experts' training space: ZCA-whitened
  or mean/std-normalised), ``labels_best.pt`` (int64 [N] class-major, or float32 [N, classes]
  soft labels = probabilities), ``lr_best.pt`` (0-d tensor: the learned step size), and with ZCA
  ``images_zca_best.pt``: the images mapped back to pixel space by the inverse ZCA — what MTT's
  distill.py names ``images_zca_*`` (not clamped, as theirs).
* ``ddranking``: ``images.pt``, ``labels.pt``, ``lr.pt`` — the names DD-Ranking's README loads and
  passes to ``compute_metrics(image_tensor=..., soft_labels=..., syn_lr=...)``. DD-Ranking
  builds hard labels itself as class-major blocks of ipc, which is how mctool orders images.

Every export writes ``mctool_export.json``: which file is what, their SHA-256, the image space
(ZCA or not, eps, fitted on which split, mean/std, class names) and the settings a receiver
must use (DD-Ranking's ``use_zca``/``im_size``/``model_name``, MTT's ``--dataset``/``--zca``).
The ZCA matrices are not shipped by default: MTT and DD-Ranking refit the same kornia
ZCA (eps 0.1, whole training split in [0, 1] pixels) themselves; ``zca_matrix=True`` adds
``zca.pt`` = [mean [D], transform [D, D], transform_inv [D, D]] for receivers that want to
de-whiten exactly as we do (37 MB for CIFAR, 600 MB for Tiny ImageNet).

The lr is stored as a float64 0-d tensor so that it round-trips bit for bit (mctool keeps α
as a Python float); receivers call ``.item()`` on it.

``png``: one folder per class, ``000_<class name>/0000.png``..., de-whitened, clamped to [0, 1]
and rounded to 8 bits — for looking at and sharing, not for training (information is lost).
Class folders sort in label order, so torchvision's ImageFolder (DD-Ranking's ``image_path``)
assigns the right labels.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mctool import __version__
from mctool.store import DatasetMeta, now_iso
from mctool.data import Preprocessing
from mctool.errors import UsageError
from mctool.interop.h5out import SynsetData, keeps_best, read_synset
from mctool.interop.torchfile import LoadedTensor, TensorRef, TorchFileError, open_torch_file

FORMATS = ("mtt", "ddranking", "png")
META_NAME = "mctool_export.json"
EXPORT_FORMAT = "mctool-export"
EXPORT_VERSION = 1

_FILES = {
    "mtt": {"images": "images_best.pt", "labels": "labels_best.pt", "lr": "lr_best.pt", "pixels": "images_zca_best.pt"},
    "ddranking": {"images": "images.pt", "labels": "labels.pt", "lr": "lr.pt"},
}
ZCA_FILE = "zca.pt"

# mctool dataset name -> (MTT --dataset, DD-Ranking dataset)
_RECEIVER_NAMES = {
    "cifar10": ("CIFAR10", "CIFAR10"),
    "cifar100": ("CIFAR100", "CIFAR100"),
    "tinyimagenet": ("Tiny", "TinyImageNet"),
    "mnist": ("MNIST", None),
    "fashion-mnist": ("FashionMNIST", None),
}


@dataclass(frozen=True)
class Exported:
    """An export read back: the tensors exactly as written, and its description."""

    images: torch.Tensor
    labels: torch.Tensor
    lr: float
    pixels: torch.Tensor | None
    zca: list[torch.Tensor] | None
    description: dict[str, Any]


def preprocessing_without_data(meta: DatasetMeta) -> Preprocessing | None:
    """The normalisation from /dataset alone; None for ZCA (its matrix needs the training split)."""
    if meta.zca:
        return None
    return Preprocessing(kind="normalize", mean=torch.tensor(meta.mean, dtype=torch.float32),
                         std=torch.tensor(meta.std, dtype=torch.float32))


def to_pixels(prep: Preprocessing, images: torch.Tensor, clamp: bool) -> torch.Tensor:
    """Images back in [0, 1] pixel units (float32); unclamped like MTT's images_zca unless `clamp`."""
    x = images.detach().to("cpu", torch.float32)
    if prep.kind == "zca":
        assert prep.transform_inv is not None
        # kornia's inverse_transform, as MTT applies it to write images_zca_*: y @ T_inv + mean.
        flat = x.reshape(x.shape[0], -1) @ prep.transform_inv.float() + prep.mean.float().reshape(1, -1)
        pixels = flat.view(x.shape)
    else:
        assert prep.std is not None
        pixels = x * prep.std.float().view(1, -1, 1, 1) + prep.mean.float().view(1, -1, 1, 1)
    return pixels.clamp(0, 1) if clamp else pixels


# --------------------------------------------------------------------------- description


def space_description(meta: DatasetMeta) -> dict[str, Any]:
    """The image space the tensors live in, in words a receiver can act on."""
    if meta.zca:
        how = ("ZCA whitening (kornia ZCAWhitening, unbiased covariance, eps added to the eigenvalues) fitted on "
               "the whole training split as pixels in [0, 1] (ToTensor only, no mean/std normalisation); "
               "whitened = (x.flatten(1) - mean) @ transform")
    else:
        how = "per-channel normalisation of [0, 1] pixels: (x - mean) / std"
    return {"kind": "zca" if meta.zca else "normalize", "how": how, "zca_eps": meta.zca_eps if meta.zca else None,
            "fitted_on": "train" if meta.zca else None, "mean": list(meta.mean), "std": list(meta.std),
            "dataset": meta.name, "train_fingerprint": meta.train_fingerprint}


def _receivers(syn: SynsetData) -> dict[str, Any]:
    mtt_name, dd_name = _RECEIVER_NAMES.get(syn.meta.name, (None, None))
    spec = syn.spec
    out: dict[str, Any] = {"mtt": {"dataset": mtt_name, "zca": syn.meta.zca,
                                   "model": None if spec is None else
                                   ("ConvNet" if spec.depth == 3 else f"ConvNetD{spec.depth}")}}
    dd: dict[str, Any] = {"dataset": dd_name, "use_zca": syn.meta.zca, "ipc": syn.ipc,
                          "im_size": [syn.meta.height, syn.meta.width]}
    if spec is not None and spec.arch == "ConvNet":
        dd["model_name"] = f"ConvNet-{spec.depth}"
        if spec.width != 128 or spec.norm != "instancenorm":
            dd["note"] = (f"the experts' ConvNet has width {spec.width} and {spec.norm}; DD-Ranking's ConvNet-N "
                          "uses its defaults")
    if dd_name is None:
        dd["note"] = f"DD-Ranking has no dataset '{syn.meta.name}'"
    out["ddranking"] = dd
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- writing


def _prepare_dir(out_dir: Path) -> None:
    """An absent or empty folder, or one holding an earlier export (whose files are replaced)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{out_dir}: exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / META_NAME).is_file():
        raise UsageError(f"{out_dir}: not empty and not an earlier mctool export; choose another -o")
    out_dir.mkdir(parents=True, exist_ok=True)


def _save(obj: Any, path: Path) -> None:
    """torch.save through a temporary file in the same folder, then rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _finite(obj: Any) -> Any:
    """NaN and infinity as null (JSON has neither), recursively."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _write_json(doc: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_finite(doc), indent=2, sort_keys=True, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _check(syn: SynsetData) -> None:
    if syn.images.dim() != 4:
        raise UsageError(f"synset '{syn.name}': images must be [N, C, H, W], got {list(syn.images.shape)}")
    n = syn.images.shape[0]
    if syn.labels.shape[0] != n:
        raise UsageError(f"synset '{syn.name}': {syn.labels.shape[0]} labels for {n} images")


def _labels_kind(labels: torch.Tensor) -> str:
    return "soft" if labels.dim() == 2 else "hard"


def _class_major(syn: SynsetData) -> bool:
    if _labels_kind(syn.labels) != "hard" or syn.ipc < 1:
        return False
    expected = torch.arange(syn.meta.num_classes).repeat_interleave(syn.ipc)
    return syn.labels.shape == expected.shape and bool(torch.equal(syn.labels.cpu(), expected))


def _description(syn: SynsetData, layout: str, files: dict[str, str | None], out_dir: Path) -> dict[str, Any]:
    return {
        "format": EXPORT_FORMAT, "version": EXPORT_VERSION, "layout": layout,
        "files": files,
        "sha256": {name: _sha256(out_dir / name) for name in files.values() if name},
        "synset": syn.name, "ipc": syn.ipc, "iterations": syn.iterations, "num_images": int(syn.images.shape[0]),
        "image_shape": list(syn.images.shape[1:]), "num_classes": syn.meta.num_classes,
        "class_names": list(syn.meta.class_names),
        "labels": {"kind": _labels_kind(syn.labels),
                   "class_major": _class_major(syn),
                   "meaning": ("int64 class ids" if _labels_kind(syn.labels) == "hard" else
                               "float32 probabilities per class (rows sum to 1)")},
        "lr": syn.lr, "lr_meaning": "the learned step size α: the learning rate to train on these images with",
        "space": space_description(syn.meta),
        "receivers": _receivers(syn),
        "model": None if syn.spec is None else syn.spec.to_dict(),
        "experts_reference": syn.experts_reference,
        "source": syn.source, "created": now_iso(), "mctool_version": __version__,
    }


def export_tensors(syn: SynsetData, out_dir: Path, layout: str, prep: Preprocessing | None,
                   zca_matrix: bool = False) -> dict[str, Any]:
    """Write `syn` in the MTT ('mtt') or DD-Ranking ('ddranking') tensor layout; returns the description.

    `prep` (the fitted preprocessing) is needed for the de-whitened images_zca_best.pt and for
    zca.pt; without it (ZCA data not loaded) those are left out and the description says so.
    """
    if layout not in _FILES:
        raise UsageError(f"unknown tensor layout '{layout}'; choose from {', '.join(_FILES)}")
    _check(syn)
    if zca_matrix and not syn.meta.zca:
        raise UsageError("--zca-matrix: the synset is not in a ZCA space (its dataset is mean/std normalised)")
    if zca_matrix and (prep is None or prep.kind != "zca"):
        raise UsageError("--zca-matrix needs the fitted ZCA (the dataset on this machine)")
    _prepare_dir(out_dir)
    names = _FILES[layout]
    _save(syn.images.detach().to("cpu", torch.float32).contiguous().clone(), out_dir / names["images"])
    labels = syn.labels.detach().cpu().contiguous().clone()
    _save(labels, out_dir / names["labels"])
    _save(torch.tensor(float(syn.lr), dtype=torch.float64), out_dir / names["lr"])
    files: dict[str, str | None] = {"images": names["images"], "labels": names["labels"], "lr": names["lr"],
                                    "pixels": None, "zca": None}
    if "pixels" in names and syn.meta.zca and prep is not None:
        _save(to_pixels(prep, syn.images, clamp=False).contiguous(), out_dir / names["pixels"])
        files["pixels"] = names["pixels"]
    if zca_matrix:
        assert prep is not None and prep.transform is not None and prep.transform_inv is not None
        _save([prep.mean.float().contiguous().clone(), prep.transform.float().contiguous().clone(),
               prep.transform_inv.float().contiguous().clone()], out_dir / ZCA_FILE)
        files["zca"] = ZCA_FILE
    doc = _description(syn, layout, files, out_dir)
    if files["zca"]:
        doc["zca"] = {"file": ZCA_FILE, "contents": ["mean [D]", "transform [D, D]", "transform_inv [D, D]"],
                      "whiten": "y = (x.flatten(1) - mean) @ transform",
                      "dewhiten": "x = y.flatten(1) @ transform_inv + mean"}
    _write_json(doc, out_dir / META_NAME)
    return doc


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def class_folder(index: int, name: str, num_classes: int) -> str:
    """'003_cat': zero-padded so folders sort in label order; the name made file-system safe."""
    width = max(3, len(str(num_classes - 1)))
    safe = _UNSAFE.sub("_", name).strip("._") or "class"
    return f"{index:0{width}d}_{safe}"


def export_pngs(syn: SynsetData, out_dir: Path, prep: Preprocessing) -> dict[str, Any]:
    """One folder per class of de-whitened 8-bit PNGs; hard labels pick the folder, soft ones their argmax."""
    from PIL import Image

    _check(syn)
    _prepare_dir(out_dir)
    pixels = to_pixels(prep, syn.images, clamp=True)
    # torchvision.save_image's rounding: floor(x * 255 + 0.5).
    as_bytes = pixels.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)
    classes = syn.labels.argmax(1) if syn.labels.dim() == 2 else syn.labels.to(torch.int64)
    counts: dict[int, int] = {}
    written = []
    for i in range(as_bytes.shape[0]):
        c = int(classes[i])
        folder = out_dir / class_folder(c, syn.meta.class_names[c] if c < len(syn.meta.class_names) else str(c),
                                        syn.meta.num_classes)
        folder.mkdir(exist_ok=True)
        n = counts.get(c, 0)
        counts[c] = n + 1
        img = as_bytes[i].permute(1, 2, 0).numpy()
        mode = "L" if img.shape[2] == 1 else "RGB"
        path = folder / f"{n:04d}.png"
        Image.fromarray(img[:, :, 0] if mode == "L" else img, mode=mode).save(path)
        written.append(path.relative_to(out_dir).as_posix())
    doc = _description(syn, "png", {}, out_dir)
    doc["png"] = {"images": written, "per_class": {str(c): n for c, n in sorted(counts.items())},
                  "pixels": "de-whitened, clamped to [0, 1], 8-bit (floor(x * 255 + 0.5))",
                  "folder_of": "label" if syn.labels.dim() == 1 else "argmax of the soft label"}
    _write_json(doc, out_dir / META_NAME)
    return doc


# --------------------------------------------------------------------------- reading back


def _read_tensor(path: Path) -> Any:
    """A file holding one tensor, or a list of tensors, read with the restricted reader."""
    with open_torch_file(path) as tf:
        root = tf.root
        if isinstance(root, (TensorRef, LoadedTensor)):
            return tf.read(root)
        return [tf.read(leaf) for leaf in root]


def load_export(folder: Path) -> Exported:
    """An export folder read back (checksums verified, tensors through the restricted reader)."""
    meta_path = folder / META_NAME
    if not meta_path.is_file():
        raise UsageError(f"{folder}: no {META_NAME}: not an mctool export")
    try:
        doc = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"{meta_path}: unreadable ({exc})") from None
    if doc.get("format") != EXPORT_FORMAT or int(doc.get("version", 0)) > EXPORT_VERSION:
        raise UsageError(f"{meta_path}: not an mctool export this version understands")
    files = doc.get("files") or {}
    if not files.get("images"):
        raise UsageError(f"{folder}: a {doc.get('layout')} export has no tensor files to load")
    for name, digest in (doc.get("sha256") or {}).items():
        path = folder / name
        if not path.is_file() or _sha256(path) != digest:
            raise UsageError(f"{path}: missing or changed since the export (checksum differs)")

    def tensor(key: str) -> torch.Tensor:
        value = _read_tensor(folder / files[key])
        if not isinstance(value, torch.Tensor):
            raise TorchFileError(f"{folder / files[key]}: holds a list, expected one tensor")
        return value

    lr = tensor("lr")
    if lr.numel() != 1:
        raise UsageError(f"{folder / files['lr']}: expected one number, got shape {list(lr.shape)}")
    zca = _read_tensor(folder / files["zca"]) if files.get("zca") else None
    return Exported(images=tensor("images"), labels=tensor("labels"), lr=float(lr.reshape(()).item()),
                    pixels=tensor("pixels") if files.get("pixels") else None, zca=zca, description=doc)


@dataclass
class ExportResult:
    """What `mctool export` wrote."""

    folder: str
    format: str
    synset: str
    images: str  # final or best
    lr: float
    files: list[str]
    description: dict[str, Any]


def export_file(file: Path, fmt: str, out: Path | None = None, name: str | None = None, images: str = "auto",
                zca_matrix: bool = False, data_dir: Path | None = None, reporter: Any = None) -> ExportResult:
    """`mctool export`: write the final or best images of a synset in a receiving layout."""
    from mctool.errors import DatasetNotFound
    from mctool.prepared import prepare_like
    from mctool.progress import SILENT

    reporter = reporter or SILENT
    if fmt not in FORMATS:
        raise UsageError(f"unknown --format '{fmt}' (use {', '.join(FORMATS)})")
    if images not in ("auto", "final", "best"):
        raise UsageError(f"--images must be final, best or auto, got '{images}'")
    if images == "auto":
        images = "best" if keeps_best(file, name) else "final"
    syn = read_synset(file, name, images)
    target = out or file.with_name(f"{file.stem}-{fmt}")
    prep = preprocessing_without_data(syn.meta)
    if prep is None and (fmt in ("png", "mtt") or zca_matrix):
        try:  # the ZCA matrix is refitted from the fingerprinted training split (cached)
            prep = prepare_like(syn.meta, data_dir, torch.device("cpu")).prep
        except DatasetNotFound:
            if fmt == "png" or zca_matrix:
                raise
            reporter.log(f"note: {syn.meta.name} is not on this machine, so images_zca_best.pt "
                         "(the de-whitened images) is left out")
    if fmt == "png":
        assert prep is not None
        doc = export_pngs(syn, target, prep)
    else:
        doc = export_tensors(syn, target, fmt, prep, zca_matrix)
    files = sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file())
    return ExportResult(folder=str(target), format=fmt, synset=syn.name, images=images, lr=syn.lr, files=files,
                        description=doc)
