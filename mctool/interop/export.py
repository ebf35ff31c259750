"""Export a synthetic set as the files MTT-family scripts and DD-Ranking read, or as PNGs per class.

Tensor layouts (each tensor file is a plain ``torch.save`` of one tensor):

* ``mtt``: named as MTT's distill.py names what it saves — ``images_best.pt`` when the synset's
  best images are exported (those a periodic evaluation selected), ``images_<it>.pt`` for the
  final images after `it` iterations: the images (float32 [N, C, H, W], in the experts' training
  space: ZCA-whitened or mean/std-normalised), ``labels_<tag>.pt`` (int64 [N] class-major, or
  float32 [N, classes] soft labels = probabilities), ``lr_<tag>.pt`` (0-d tensor: the learned
  step size), and with ZCA ``images_zca_<tag>.pt``: the images mapped back to pixel space by the
  inverse ZCA — what MTT's distill.py names ``images_zca_*`` (not clamped, as theirs).
* ``ddranking``: ``images.pt``, ``labels.pt``, ``lr.pt`` — the names DD-Ranking's README loads; with
  DD-Ranking 0.2.0 hard-label sets go to ``LabelRobustScoreHard(...).compute_metrics(image_tensor=...,
  hard_labels=..., syn_lr=...)`` (docs/interop.md says what works there and what fails inside it).
  Its labels are class-major blocks of ipc, which is how mctool orders images.

Every export writes ``mctool_export.json``: which file is what, their SHA-256, the image space
(ZCA or not, eps, fitted on which split, mean/std, class names) and the settings a receiver
must use (DD-Ranking's ``use_zca``/``im_size``/``model_name``, MTT's ``--dataset``/``--zca``/
``--model`` and the whole network: width, depth, norm, activation, pooling), and ``written``:
every file of the export (a later export into the same folder replaces exactly those).

The folder is written as a whole (``mctool.store.folders``): built beside its place, then
swapped in, so a kill leaves the earlier export or the new one, and the same command then
succeeds; a folder holding anything an earlier export did not write is refused.
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
import stat
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any, BinaryIO

import torch

from mctool import __version__
from mctool.store import DatasetMeta, class_major_labels, clean_text, now_iso, shown
from mctool.store.files import _is_link
from mctool.store.folders import Stage, staged_folder
from mctool.data.datasets import Preprocessing
from mctool.core.errors import UsageError
from mctool.interop.h5out import SynsetData, keeps_best, read_synset
from mctool.models import ModelSpec
from mctool.interop.torchfile import LoadedTensor, TensorRef, TorchFileError, open_torch_file

FORMATS = ("mtt", "ddranking", "png")
META_NAME = "mctool_export.json"
EXPORT_FORMAT = "mctool-export"
EXPORT_VERSION = 1

_LAYOUTS = ("mtt", "ddranking")


def tensor_names(layout: str, images: str, iteration: int) -> dict[str, str]:
    """The file names of a tensor export, saying what they hold as the receivers' scripts do:
    MTT's distill.py saves the images that scored best as ``images_best.pt`` and those of
    iteration `it` as ``images_{it}.pt`` (likewise labels, lr, images_zca); DD-Ranking's
    README loads ``images.pt``, ``labels.pt``, ``lr.pt`` (the JSON says final or best)."""
    if layout == "ddranking":
        return {"images": "images.pt", "labels": "labels.pt", "lr": "lr.pt"}
    tag = "best" if images == "best" else str(int(iteration))
    return {"images": f"images_{tag}.pt", "labels": f"labels_{tag}.pt", "lr": f"lr_{tag}.pt",
            "pixels": f"images_zca_{tag}.pt"}


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


# MTT's get_network names that change one setting of its default ConvNet (width 128, depth 3,
# instancenorm, relu, avgpooling): /work/shared/method.md §2.1.
_MTT_NORM = {"none": "NN", "batchnorm": "BN", "layernorm": "LN", "instancenorm": "IN", "groupnorm": "GN"}
_MTT_POOL = {"none": "NP", "maxpooling": "MP", "avgpooling": "AP"}
_MTT_ACT = {"sigmoid": "AS", "relu": "AR", "leakyrelu": "AL"}


def mtt_model(spec: ModelSpec) -> tuple[str | None, str | None]:
    """(MTT's --model name that builds exactly `spec`, or None; a note when there is none or
    when the name needs care)."""
    if spec.arch != "ConvNet":
        return spec.arch, None
    default = ModelSpec()
    changed = [k for k in ("width", "depth", "norm", "act", "pool") if getattr(spec, k) != getattr(default, k)]
    how = (f"networks.ConvNet(channel={spec.channels}, num_classes={spec.num_classes}, net_width={spec.width}, "
           f"net_depth={spec.depth}, net_act='{spec.act}', net_norm='{spec.norm}', net_pooling='{spec.pool}', "
           f"im_size={tuple(spec.im_size)})")
    if not changed:
        return "ConvNet", None
    if changed == ["depth"] and 1 <= spec.depth <= 8:
        return f"ConvNetD{spec.depth}", None
    if changed == ["width"] and spec.width in (32, 64, 256, 512, 1024):
        note = None if tuple(spec.im_size) == (32, 32) else f"MTT's ConvNetW* ignore im_size: build {how}"
        return f"ConvNetW{spec.width}", note
    if changed == ["norm"] and spec.norm in _MTT_NORM:
        return f"ConvNet{_MTT_NORM[spec.norm]}", None
    if changed == ["pool"] and spec.pool in _MTT_POOL:
        return f"ConvNet{_MTT_POOL[spec.pool]}", None
    if changed == ["act"] and spec.act in _MTT_ACT:
        return f"ConvNet{_MTT_ACT[spec.act]}", None
    return None, f"no MTT --model name builds this ConvNet ({', '.join(changed)} differ from MTT's); build {how}"


def _receivers(syn: SynsetData) -> dict[str, Any]:
    mtt_name, dd_name = _RECEIVER_NAMES.get(syn.meta.name, (None, None))
    spec = syn.spec
    mtt: dict[str, Any] = {"dataset": mtt_name, "zca": syn.meta.zca, "model": None, "model_spec": None}
    if spec is not None:
        mtt["model"], note = mtt_model(spec)
        # The whole network, in MTT's argument names, so a receiver builds the same one.
        mtt["model_spec"] = {"arch": spec.arch, "net_width": spec.width, "net_depth": spec.depth,
                             "net_norm": spec.norm, "net_act": spec.act, "net_pooling": spec.pool,
                             "channel": spec.channels, "num_classes": spec.num_classes,
                             "im_size": list(spec.im_size)}
        if note:
            mtt["note"] = note
    out: dict[str, Any] = {"mtt": mtt}
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


# --------------------------------------------------------------------------- the target folder

# The largest description an earlier export can have (PNG lists of 100,000 images fit easily).
_MAX_META_BYTES = 64 << 20
# Temporaries that releases up to 0.3 left inside the folder when killed: ".NAME.tmp", ".NAME.XXXX.tmp".
_OLD_TEMPORARY = re.compile(r"^\.(?P<base>.+?)(\.[A-Za-z0-9_]+)?\.tmp$")


def _listed(folder: Path) -> set[str] | None:
    """The files (relative paths) an earlier mctool export in `folder` says it wrote, its JSON
    included; None when `folder` holds no readable description of ours."""
    meta = folder / META_NAME
    try:
        st = os.lstat(meta)
        if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_META_BYTES:
            return None
        doc = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # RecursionError: nested too deeply for the parser
        return None
    if not isinstance(doc, dict) or doc.get("format") != EXPORT_FORMAT:
        return None
    names: list[Any] = list(doc.get("written") or [])  # since 0.4: every file, listed
    names += [v for v in (doc.get("files") or {}).values() if v]
    names += list((doc.get("png") or {}).get("images") or [])
    names += list(doc.get("sha256") or {})
    listed = {META_NAME}
    for name in names:
        if not isinstance(name, str) or not name or name.startswith("/") or ".." in Path(name).parts:
            return None
        listed.add(Path(name).as_posix())
    return listed


def _foreign(folder: Path) -> str | None:
    """What in `folder` an earlier mctool export did not write (a message), or None when every
    entry may be replaced: the folder is empty, or holds exactly an earlier export's files
    (and the temporaries an older release's killed export left), none of them a link."""
    entries: list[tuple[str, os.stat_result]] = []
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            entries.append((path.relative_to(folder).as_posix(), os.lstat(path)))
    if not entries:
        return None
    listed = _listed(folder)
    if listed is None:
        return "not empty and not an earlier mctool export"
    parents = {p.as_posix() for name in listed for p in Path(name).parents if p != Path(".")}
    for rel, st in entries:
        if stat.S_ISLNK(st.st_mode):
            return f"holds {clean_text(rel)}, a symbolic link no mctool export wrote"
        if stat.S_ISDIR(st.st_mode):
            if rel not in parents:
                return f"holds the folder {clean_text(rel)}, which the earlier export did not write"
            continue
        m = _OLD_TEMPORARY.match(Path(rel).name)
        leftover = m is not None and (Path(rel).parent / m.group("base")).as_posix() in listed
        if not stat.S_ISREG(st.st_mode) or (rel not in listed and not leftover):
            return f"holds {clean_text(rel)}, which the earlier export did not write"
    return None


def _is_earlier_export(folder: Path) -> bool:
    try:
        return _foreign(folder) is None and _listed(folder) is not None
    except OSError:
        return False


def check_target(out_dir: Path, inputs: tuple[Path, ...] = ()) -> None:
    """Refuse, before any work, an export folder that is a link or not a folder, that holds
    anything an earlier mctool export did not write (only those files are ever replaced), or
    that holds an input."""
    if _is_link(out_dir):
        raise UsageError(f"{shown(out_dir)}: is a symbolic link; an export replaces its folder as a whole and never "
                         "writes through a link — pass the real folder or another -o")
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{shown(out_dir)}: exists and is not a folder; choose another -o")
    for source in inputs:
        try:
            inside = source.resolve().is_relative_to(out_dir.resolve())
        except OSError:
            inside = False
        if inside:
            raise UsageError(f"{shown(out_dir)}: holds the input {shown(source)}; export into another folder (-o)")
    if out_dir.is_dir():
        try:
            problem = _foreign(out_dir)
        except OSError as exc:
            raise UsageError(f"{shown(out_dir)}: cannot be read ({clean_text(exc.strerror or str(exc))})") from None
        if problem is not None:
            raise UsageError(f"{shown(out_dir)}: {problem}; choose another -o (nothing was changed)")


# --------------------------------------------------------------------------- writing


def _torch_bytes(obj: Any) -> Callable[[BinaryIO], object]:
    return lambda fh: torch.save(obj, fh)


def _finite(obj: Any) -> Any:
    """NaN and infinity as null (JSON has neither), recursively."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _write_json(stage: Stage, doc: dict[str, Any]) -> None:
    """The description, written last: a folder with it is complete."""
    doc["written"] = sorted(stage.written)
    stage.write(META_NAME, (json.dumps(_finite(doc), indent=2, sort_keys=True, allow_nan=False) + "\n").encode())


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
    expected = class_major_labels(syn.meta.num_classes, syn.ipc)
    return syn.labels.shape == expected.shape and bool(torch.equal(syn.labels.cpu(), expected))


def _which(syn: SynsetData) -> str:
    """'best' or 'final': which images of the synset `syn` holds."""
    return "best" if syn.source.get("images") == "best" else "final"


def _description(syn: SynsetData, layout: str, files: dict[str, str | None], out_dir: Path) -> dict[str, Any]:
    return {
        "format": EXPORT_FORMAT, "version": EXPORT_VERSION, "layout": layout,
        "files": files,
        "sha256": {name: _sha256(out_dir / name) for name in files.values() if name},
        "synset": syn.name, "images": _which(syn), "ipc": syn.ipc, "iterations": syn.iterations,
        "num_images": int(syn.images.shape[0]),
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
                   zca_matrix: bool = False, inputs: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Write `syn` in the MTT ('mtt') or DD-Ranking ('ddranking') tensor layout; returns the description.

    `prep` (the fitted preprocessing) is needed for the de-whitened images_zca_*.pt and for
    zca.pt; without it (ZCA data not loaded) those are left out and the description says so.
    The folder is written as a whole (mctool.store.folders): a kill leaves the old export or
    the new one."""
    if layout not in _LAYOUTS:
        raise UsageError(f"unknown tensor layout '{layout}'; choose from {', '.join(_LAYOUTS)}")
    _check(syn)
    if zca_matrix and not syn.meta.zca:
        raise UsageError("--zca-matrix: the synset is not in a ZCA space (its dataset is mean/std normalised)")
    if zca_matrix and (prep is None or prep.kind != "zca"):
        raise UsageError("--zca-matrix needs the fitted ZCA (the dataset on this machine)")
    check_target(out_dir, inputs)
    names = tensor_names(layout, _which(syn), syn.iterations)
    with staged_folder(out_dir, _is_earlier_export, lambda: check_target(out_dir, inputs)) as stage:
        stage.write(names["images"], _torch_bytes(syn.images.detach().to("cpu", torch.float32).contiguous().clone()))
        stage.write(names["labels"], _torch_bytes(syn.labels.detach().cpu().contiguous().clone()))
        stage.write(names["lr"], _torch_bytes(torch.tensor(float(syn.lr), dtype=torch.float64)))
        files: dict[str, str | None] = {"images": names["images"], "labels": names["labels"], "lr": names["lr"],
                                        "pixels": None, "zca": None}
        if "pixels" in names and syn.meta.zca and prep is not None:
            stage.write(names["pixels"], _torch_bytes(to_pixels(prep, syn.images, clamp=False).contiguous()))
            files["pixels"] = names["pixels"]
        if zca_matrix:
            assert prep is not None and prep.transform is not None and prep.transform_inv is not None
            stage.write(ZCA_FILE, _torch_bytes([prep.mean.float().contiguous().clone(),
                                                prep.transform.float().contiguous().clone(),
                                                prep.transform_inv.float().contiguous().clone()]))
            files["zca"] = ZCA_FILE
        doc = _description(syn, layout, files, stage.path)
        if files["zca"]:
            doc["zca"] = {"file": ZCA_FILE, "contents": ["mean [D]", "transform [D, D]", "transform_inv [D, D]"],
                          "whiten": "y = (x.flatten(1) - mean) @ transform",
                          "dewhiten": "x = y.flatten(1) @ transform_inv + mean"}
        _write_json(stage, doc)
    return doc


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def class_folder(index: int, name: str, num_classes: int) -> str:
    """'003_cat': zero-padded so folders sort in label order; the name made file-system safe."""
    width = max(3, len(str(num_classes - 1)))
    safe = _UNSAFE.sub("_", name).strip("._") or "class"
    return f"{index:0{width}d}_{safe}"


def export_pngs(syn: SynsetData, out_dir: Path, prep: Preprocessing, inputs: tuple[Path, ...] = ()) -> dict[str, Any]:
    """One folder per class of de-whitened 8-bit PNGs; hard labels pick the folder, soft ones their argmax.

    Written as a whole like the tensor layouts: a re-export keeps none of the earlier PNGs."""
    from PIL import Image

    _check(syn)
    check_target(out_dir, inputs)
    pixels = to_pixels(prep, syn.images, clamp=True)
    # torchvision.save_image's rounding: floor(x * 255 + 0.5).
    as_bytes = pixels.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)
    classes = syn.labels.argmax(1) if syn.labels.dim() == 2 else syn.labels.to(torch.int64)
    counts: dict[int, int] = {}
    written = []
    with staged_folder(out_dir, _is_earlier_export, lambda: check_target(out_dir, inputs)) as stage:
        for i in range(as_bytes.shape[0]):
            c = int(classes[i])
            folder = class_folder(c, syn.meta.class_names[c] if c < len(syn.meta.class_names) else str(c),
                                  syn.meta.num_classes)
            stage.folder(folder)
            n = counts.get(c, 0)
            counts[c] = n + 1
            img = as_bytes[i].permute(1, 2, 0).numpy()
            mode = "L" if img.shape[2] == 1 else "RGB"
            picture = Image.fromarray(img[:, :, 0] if mode == "L" else img, mode=mode)
            rel = f"{folder}/{n:04d}.png"
            stage.write(rel, lambda fh, picture=picture: picture.save(fh, format="PNG"))
            written.append(rel)
        doc = _description(syn, "png", {}, stage.path)
        doc["png"] = {"images": written, "per_class": {str(c): n for c, n in sorted(counts.items())},
                      "pixels": "de-whitened, clamped to [0, 1], 8-bit (floor(x * 255 + 0.5))",
                      "folder_of": "label" if syn.labels.dim() == 1 else "argmax of the soft label"}
        _write_json(stage, doc)
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
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: nested too deeply for the parser
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
    from mctool.core.errors import DatasetNotFound
    from mctool.data.prepared import prepare_like
    from mctool.core.progress import SILENT

    reporter = reporter or SILENT
    if fmt not in FORMATS:
        raise UsageError(f"unknown --format '{fmt}' (use {', '.join(FORMATS)})")
    if images not in ("auto", "final", "best"):
        raise UsageError(f"--images must be final, best or auto, got '{images}'")
    if images == "auto":
        images = "best" if keeps_best(file, name) else "final"
    target = out or file.with_name(f"{file.stem}-{fmt}")
    check_target(target, (file,))  # a folder that may not be replaced is refused before any work
    syn = read_synset(file, name, images)
    prep = preprocessing_without_data(syn.meta)
    if prep is None and (fmt in ("png", "mtt") or zca_matrix):
        try:  # the ZCA matrix is refitted from the fingerprinted training split (cached)
            prep = prepare_like(syn.meta, data_dir, torch.device("cpu")).prep
        except DatasetNotFound:
            if fmt == "png" or zca_matrix:
                raise
            reporter.log(f"note: {shown(syn.meta.name)} is not on this machine, so "
                         f"{tensor_names(fmt, images, syn.iterations)['pixels']} (the de-whitened images) is left out")
    if fmt == "png":
        assert prep is not None
        doc = export_pngs(syn, target, prep, inputs=(file,))
    else:
        doc = export_tensors(syn, target, fmt, prep, zca_matrix, inputs=(file,))
    files = sorted([*doc["written"], META_NAME])
    return ExportResult(folder=str(target), format=fmt, synset=syn.name, images=images, lr=syn.lr, files=files,
                        description=doc)
