"""Folders of MTT-family expert buffers: numbered files, their layout, and the ConvNet they describe.

``buffer.py`` of MTT/FTD/DATM/TESLA/MCT writes ``replay_buffer_{n}.pt`` (n = 0, 1, ...): a
torch-saved list of experts, each a list of K+1 snapshots θ_0..θ_K, each a list of the
network's parameter tensors in module order (method.md §4). Everything here works on the
files' pickles (shapes, dtypes, counts) before any tensor data is read, so a wrong shape in
the last file is reported before the first byte is imported.

Gaps in the numbering (a deleted or failed file) are deliberate to handle: the scripts' own
readers stop at the first missing number and silently ignore every later file; we import every
numbered file in numeric order and report the missing numbers, because the files after a gap
hold GPU-days of experts too.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mctool.core.errors import UsageError
from mctool.interop.torchfile import Leaf, TorchFile, TorchFileError, open_torch_file
from mctool.models import CONVNET_VARIANTS, ModelSpec
from mctool.models.convnet import NORMS

REPLAY_PATTERN = re.compile(r"^replay_buffer_(\d+)\.pt$")

Shape = tuple[int, ...]
Layout = list[tuple[str, Shape]]

# The scripts' dataset folder names -> mctool dataset names.
_SCRIPT_DATASETS = {"CIFAR10": "cifar10", "CIFAR100": "cifar100", "Tiny": "tinyimagenet", "MNIST": "mnist",
                    "FashionMNIST": "fashion-mnist"}
# Datasets whose folder gets "_NO_ZCA" without --zca in both MTT and MCT (Tiny only in MCT).
_SUFFIXED_BY_BOTH = {"cifar10", "cifar100"}


class BufferLayoutError(TorchFileError):
    """A buffer file whose structure or shapes are not those of the stated/inferred model."""


class NonFiniteError(TorchFileError):
    """A buffer file holding NaN or infinite values."""


# --------------------------------------------------------------------------- discovery


@dataclass(frozen=True)
class Numbered:
    """A file of a numbered series."""

    number: int
    path: Path


def numbered_files(folder: Path, pattern: re.Pattern[str]) -> tuple[list[Numbered], list[int]]:
    """Files of `folder` whose name matches `pattern` (group 1 = number), by number, and the
    numbers missing between 0 and the largest one."""
    found = []
    for p in folder.iterdir():
        m = pattern.match(p.name)
        if m and p.is_file():
            found.append(Numbered(int(m.group(1)), p))
    found.sort(key=lambda n: n.number)
    return found, missing_numbers([n.number for n in found], folder)


# More missing numbers than this in a series is not a series with a few failed files but a stray
# or hostile name (replay_buffer_99999999999.pt): refused before the gaps are listed.
MAX_GAPS = 10_000


def missing_numbers(numbers: Sequence[int], folder: Path) -> list[int]:
    """The numbers missing from 0 to max(numbers); one line when there are more than MAX_GAPS."""
    if not numbers:
        return []
    present, last = set(numbers), max(numbers)
    missing = last + 1 - len(present)
    if missing > MAX_GAPS:
        before = max((n for n in present if n != last), default=None)
        after = f"after {before}" if before is not None else "alone"
        raise UsageError(f"{folder}: the file numbered {last} comes {after}: {missing:,} numbers of the series are "
                         f"missing (more than {MAX_GAPS:,}); move that file away or rename it")
    return [i for i in range(last + 1) if i not in present]


def describe_numbers(numbers: Sequence[int]) -> str:
    """'3, 5-7' for [3, 5, 6, 7]."""
    runs: list[list[int]] = []
    for n in sorted(numbers):
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def require_folder(folder: Path, what: str, pattern: re.Pattern[str]) -> None:
    """A folder that exists; when it holds no matching file, say where some are (one level down)."""
    if not folder.is_dir():
        raise UsageError(f"{folder}: no such folder")
    if any(pattern.match(p.name) for p in folder.iterdir()):
        return
    below = sorted({p.parent for p in folder.glob("*/*/*") if pattern.match(p.name)} |
                   {p.parent for p in folder.glob("*/*") if pattern.match(p.name)})
    hint = f" (found some in {below[0]}: pass that folder)" if below else ""
    raise UsageError(f"{folder}: no {what} files{hint}")


@dataclass(frozen=True)
class FolderHints:
    """What the scripts' folder naming says: <buffer_path>/<DATASET>[_NO_ZCA]/<model>/."""

    dataset: str | None = None
    zca: bool | None = None
    model: str | None = None


def folder_hints(folder: Path) -> FolderHints:
    """Dataset, ZCA and model from the scripts' folder names, where the convention is unambiguous.

    CIFAR10/CIFAR100 folders get ``_NO_ZCA`` without ``--zca`` in every script, so a bare name
    means ZCA; Tiny's suffix exists only in MCT's buffer.py, so a bare ``Tiny`` says nothing.
    """
    folder = folder.resolve()
    model = folder.name if folder.name in CONVNET_VARIANTS else None
    parent = folder.parent.name if model else folder.name
    no_zca = parent.endswith("_NO_ZCA")
    dataset = _SCRIPT_DATASETS.get(parent[: -len("_NO_ZCA")] if no_zca else parent)
    if dataset is None:
        return FolderHints(model=model)
    zca = False if no_zca else (True if dataset in _SUFFIXED_BY_BOTH else None)
    return FolderHints(dataset, zca, model)


# --------------------------------------------------------------------------- structure and shapes


def location(path: Path, expert: int, snapshot: int | None = None, tensor: int | None = None,
             names: Sequence[str] | None = None) -> str:
    """'FILE: expert e, snapshot k, tensor i (name)' for messages."""
    text = f"{path}: expert {expert}"
    if snapshot is not None:
        text += f", snapshot {snapshot}"
    if tensor is not None:
        text += f", tensor {tensor}" + (f" ({names[tensor]})" if names and tensor < len(names) else "")
    return text


def as_list(node: Any, what: str, where: str) -> list[Any]:
    """`node` as a list, or one line saying a list of `what` was expected at `where`."""
    if not isinstance(node, (list, tuple)):
        raise BufferLayoutError(f"{where}: expected a list of {what}, found a tensor")
    return list(node)


def check_snapshot(snapshot: Any, reference: Sequence[Shape], path: Path, expert: int, k: int,
                   names: Sequence[str] | None = None) -> list[Leaf]:
    """The snapshot's tensors, after checking count, shapes and dtype against `reference`."""
    leaves = as_list(snapshot, "parameter tensors", location(path, expert, k))
    if len(leaves) != len(reference):
        raise BufferLayoutError(f"{location(path, expert, k)}: {len(leaves)} parameter tensors, expected "
                                f"{len(reference)}")
    for i, (leaf, shape) in enumerate(zip(leaves, reference)):
        if isinstance(leaf, (list, tuple)):
            raise BufferLayoutError(f"{location(path, expert, k, i, names)}: a list where a tensor belongs")
        if tuple(leaf.shape) != tuple(shape):
            raise BufferLayoutError(f"{location(path, expert, k, i, names)}: shape {list(leaf.shape)}, expected "
                                    f"{list(shape)}")
        if not leaf.dtype.is_floating_point:
            raise BufferLayoutError(f"{location(path, expert, k, i, names)}: dtype {leaf.dtype}, expected floats")
        if leaf.overlaps_itself():
            raise BufferLayoutError(f"{location(path, expert, k, i, names)}: a view that repeats stored values "
                                    f"(shape {list(leaf.shape)}, stride 0 or overlapping): not a saved parameter "
                                    "tensor")
    return leaves


def check_expert(expert: Any, reference: Sequence[Shape], snapshots: int | None, path: Path, e: int,
                 names: Sequence[str] | None = None) -> list[list[Leaf]]:
    """An expert's snapshots (lists of leaves), checked; `snapshots` = K+1 when known."""
    items = as_list(expert, "snapshots", location(path, e))
    if snapshots is not None and len(items) != snapshots:
        raise BufferLayoutError(f"{location(path, e)}: {len(items)} snapshots, the other experts have {snapshots}")
    if len(items) < 2:
        raise BufferLayoutError(f"{location(path, e)}: {len(items)} snapshot(s); a trajectory needs at least 2")
    checked = [check_snapshot(s, reference, path, e, k, names) for k, s in enumerate(items)]
    _refuse_aliasing(checked, path, e, names)
    return checked


def _refuse_aliasing(checked: list[list[Leaf]], path: Path, e: int, names: Sequence[str] | None) -> None:
    """Refuse two tensors of an expert whose bytes overlap in one storage (slices that do not
    overlap are separate values, whatever storage holds them)."""
    spans: dict[str, list[tuple[int, int, int, int]]] = {}
    for k, leaves in enumerate(checked):
        for i, leaf in enumerate(leaves):
            start, end = leaf.span()
            if end > start:
                spans.setdefault(leaf.storage_id, []).append((start, end, k, i))
    for ranges in spans.values():
        if len(ranges) < 2:
            continue
        ranges.sort()
        reach = ranges[0]
        for cur in ranges[1:]:
            if cur[0] < reach[1]:  # starts before an earlier one ends: shared bytes
                first, second = sorted([reach, cur], key=lambda r: (r[2], r[3]))
                if first[2] == second[2]:
                    raise BufferLayoutError(
                        f"{location(path, e, second[2], second[3], names)}: shares its memory with tensor {first[3]} "
                        "of the same snapshot: not a network's parameters")
                raise BufferLayoutError(
                    f"{location(path, e, second[2], second[3], names)}: shares its memory with snapshot {first[2]}, "
                    f"tensor {first[3]} — the snapshots alias the live weights (buffer.py run on a CPU, method.md "
                    "§4), so every snapshot is the final network and the trajectory is lost")
            if cur[1] > reach[1]:
                reach = cur


def experts_of(tf: TorchFile) -> list[Any]:
    """The top-level list of experts of an open buffer file."""
    return as_list(tf.root, "experts", str(tf.path))


def first_snapshot_shapes(path: Path) -> list[Shape]:
    """Shapes of the first snapshot of the first expert of a buffer file (reads only its pickle)."""
    with open_torch_file(path) as tf:
        experts = experts_of(tf)
        if not experts:
            raise BufferLayoutError(f"{path}: holds no experts")
        snaps = as_list(experts[0], "snapshots", location(path, 0))
        if not snaps:
            raise BufferLayoutError(f"{location(path, 0)}: holds no snapshots")
        leaves = as_list(snaps[0], "parameter tensors", location(path, 0, 0))
        for i, leaf in enumerate(leaves):
            if isinstance(leaf, (list, tuple)):
                raise BufferLayoutError(f"{location(path, 0, 0, i)}: a list where a tensor belongs")
        return [tuple(leaf.shape) for leaf in leaves]


@dataclass(frozen=True)
class BufferFile:
    """One numbered file of a folder and how many experts it holds."""

    number: int
    path: Path
    experts: int
    bytes: int
    streaming: bool = True  # False: a legacy (pre-zip) file, read whole


@dataclass(frozen=True)
class ReplayScan:
    """A checked folder of replay buffers: files in order, K, the snapshot layout."""

    folder: Path
    files: tuple[BufferFile, ...]
    gaps: tuple[int, ...]
    epochs: int
    shapes: tuple[Shape, ...]
    names: tuple[str, ...] | None = None
    dtypes: tuple[str, ...] = field(default=("torch.float32",))

    @property
    def num_experts(self) -> int:
        """Experts in all files together."""
        return sum(f.experts for f in self.files)

    @property
    def num_params(self) -> int:
        """P, the length of a flat snapshot."""
        return sum(math.prod(s) for s in self.shapes)

    @property
    def total_bytes(self) -> int:
        """Size of the files on disk."""
        return sum(f.bytes for f in self.files)

    def listing(self) -> list[dict[str, Any]]:
        """What identifies the source (names, sizes, expert counts): a resumed import must match it."""
        return [{"name": f.path.name, "number": f.number, "bytes": f.bytes, "experts": f.experts} for f in self.files]


def scan_replay_folder(folder: Path, layout: Layout | None = None) -> ReplayScan:
    """Find and check every replay_buffer_{n}.pt of `folder` from the pickles alone.

    Every snapshot of every expert must have the shapes of `layout` (or, without one, of the
    first snapshot of the first file); a mismatch names the file, expert, snapshot and tensor.
    """
    require_folder(folder, "replay_buffer_{n}.pt", REPLAY_PATTERN)
    numbered, gaps = numbered_files(folder, REPLAY_PATTERN)
    reference = [tuple(s) for _, s in layout] if layout is not None else first_snapshot_shapes(numbered[0].path)
    names = [n for n, _ in layout] if layout is not None else None
    files, snapshots, dtypes = [], None, set()
    for item in numbered:
        with open_torch_file(item.path) as tf:
            experts = experts_of(tf)
            for e, expert in enumerate(experts):
                checked = check_expert(expert, reference, snapshots, item.path, e, names)
                snapshots = len(checked)
                dtypes.update(str(leaf.dtype) for leaves in checked for leaf in leaves)
            files.append(BufferFile(item.number, item.path, len(experts), item.path.stat().st_size, tf.streaming))
    if snapshots is None:
        raise BufferLayoutError(f"{folder}: the replay buffers hold no experts")
    return ReplayScan(folder, tuple(files), tuple(gaps), snapshots - 1, tuple(reference),
                      tuple(names) if names else None, tuple(sorted(dtypes)))


def flat_snapshot(tf: TorchFile, leaves: Sequence[Leaf], expert: int, k: int,
                  names: Sequence[str] | None = None) -> torch.Tensor:
    """One snapshot as a flat float32 vector in layout order (reads its storages)."""
    parts = []
    for i, leaf in enumerate(leaves):
        try:
            part = tf.read(leaf).reshape(-1)
        except TorchFileError as exc:
            detail = str(exc).split(": ", 1)[-1]
            raise TorchFileError(f"{location(tf.path, expert, k, i, names)}: {detail}") from None
        # NaN/Inf refused here, before anything is written (float64 values too large for float32
        # become Inf and are refused as well).
        part = part.to(torch.float32)
        if not bool(torch.isfinite(part).all()):
            bad = part[~torch.isfinite(part)][0].item()
            raise NonFiniteError(f"{location(tf.path, expert, k, i, names)}: holds {bad} (NaN or infinite "
                                 "values): not a trajectory mctool can use")
        parts.append(part)
    return torch.cat(parts)


# --------------------------------------------------------------------------- the ConvNet the shapes describe


@dataclass(frozen=True)
class StatedModel:
    """What the user says about the experts' network (None: infer or default)."""

    model: str | None = None  # a script model name: ConvNet, ConvNetD4, ConvNetBN, ...
    depth: int | None = None
    width: int | None = None
    norm: str | None = None


def infer_convnet(shapes: Sequence[Shape], channels: int, im_size: tuple[int, int], num_classes: int,
                  stated: StatedModel = StatedModel()) -> tuple[ModelSpec, list[str]]:
    """The ConvNet spec whose parameters have `shapes` on the named dataset's images; notes on assumptions.

    Depth, width, input channels, classes and pooling-or-not follow from the shapes. What they
    cannot tell is resolved explicitly: the image size is the dataset's (28 px greyscale is padded
    to 32 px by the scripts' ConvNet, so 28 and 32 px give identical shapes); instance-, batch- and
    group-norm have identical (width,) affine parameters, so the norm is the stated one, the folder's
    model name's, or the scripts' default instancenorm (noted); average vs max pooling and the
    activation leave no trace in the parameters, so they are the model name's or the defaults.
    """
    notes: list[str] = []
    shapes = [tuple(int(d) for d in s) for s in shapes]
    base: dict[str, Any] = {}
    if stated.model is not None:
        if stated.model not in CONVNET_VARIANTS:
            raise UsageError(f"model '{stated.model}': only the ConvNet family can be imported "
                             f"({', '.join(CONVNET_VARIANTS)})")
        base = dict(CONVNET_VARIANTS[stated.model])
    convs = [i for i, s in enumerate(shapes) if len(s) == 4]
    if not convs or len(shapes) < 4:
        raise BufferLayoutError(f"the snapshots ({len(shapes)} tensors, shapes {shapes[:3]}...) are not a ConvNet's: "
                                "no convolution weights")
    depth, width = len(convs), shapes[convs[0]][0]
    per_block = (len(shapes) - 2) / depth
    if per_block not in (2, 4) or convs != [int(i * per_block) for i in range(depth)]:
        raise BufferLayoutError(f"the snapshots' {len(shapes)} tensors do not form ConvNet blocks "
                                f"(convolutions at {convs})")
    per_block = int(per_block)
    for b, i in enumerate(convs):
        expect = (width, channels if b == 0 else width, 3, 3)
        if shapes[i] != expect or shapes[i + 1] != (width,):
            what = f"{channels} input channels" if b == 0 and shapes[i][1] != channels else "a 3x3 ConvNet block"
            raise BufferLayoutError(f"tensor {i} has shape {list(shapes[i])} (bias {list(shapes[i + 1])}); "
                                    f"expected {list(expect)} for {what} of width {width}")
    if per_block == 2:
        norm_found = "none"
    else:
        first = shapes[2]
        norm_found = "layernorm" if len(first) == 3 else "affine"  # affine: instance/batch/group
    weight, bias = shapes[-2], shapes[-1]
    if len(weight) != 2 or bias != (weight[0],):
        raise BufferLayoutError(f"the last two tensors {list(weight)}, {list(bias)} are not a linear classifier")
    if weight[0] != num_classes:
        raise BufferLayoutError(f"the classifier has {weight[0]} outputs but the dataset has {num_classes} "
                                "classes: experts of another dataset?")

    for key, value in (("depth", stated.depth), ("width", stated.width)):
        found = depth if key == "depth" else width
        if value is not None and value != found:
            raise BufferLayoutError(f"the files hold a ConvNet of {key} {found}, not the {key} {value} stated")
    if "depth" in base and base["depth"] != depth:
        raise BufferLayoutError(f"the files hold a ConvNet of depth {depth}, not {stated.model}'s {base['depth']}")

    norm = stated.norm or base.get("norm")
    if norm is not None and norm not in NORMS:
        raise UsageError(f"unknown norm '{norm}'; choose from {', '.join(NORMS)}")
    if norm is None:
        if norm_found == "affine":
            norm = "instancenorm"
            notes.append("instance-, batch- and group-norm ConvNets have the same parameter shapes: assuming "
                         "the scripts' default instancenorm (state --norm or the model name otherwise)")
        else:
            norm = norm_found
    compatible = {"none": ("none",), "layernorm": ("layernorm",),
                  "affine": ("instancenorm", "batchnorm", "groupnorm")}[norm_found]
    if norm not in compatible:
        raise BufferLayoutError(f"the files hold a ConvNet with {'no norm' if norm_found == 'none' else norm_found} "
                                f"layers, not {norm}")

    h, w = im_size
    hp, wp = (32, 32) if (h, w) == (28, 28) else (h, w)  # the scripts pad 28 px to 32 px
    pooled, flat = width * (hp >> depth) * (wp >> depth), width * hp * wp
    features = weight[1]
    pool = base.get("pool")
    if features == pooled and pooled != flat:
        pool = pool if pool in ("avgpooling", "maxpooling") else "avgpooling"
    elif features == flat:
        pool = "none"
    else:
        raise BufferLayoutError(f"the classifier takes {features} inputs, but a depth-{depth} width-{width} ConvNet "
                                f"on {h}x{w} images gives {pooled}: experts of another image size?")
    spec = ModelSpec(arch="ConvNet", depth=depth, width=width, norm=norm, act="relu", pool=pool,
                     channels=channels, num_classes=num_classes, im_size=(h, w))
    return spec, notes


def check_layout(shapes: Sequence[Shape], layout: Layout, path: Path) -> None:
    """The model's layout must be exactly the files' shapes (first snapshot of `path`)."""
    if len(shapes) != len(layout):
        raise BufferLayoutError(f"{location(path, 0, 0)}: {len(shapes)} parameter tensors, the model has {len(layout)}")
    for i, (shape, (name, expected)) in enumerate(zip(shapes, layout)):
        if tuple(shape) != tuple(expected):
            raise BufferLayoutError(f"{location(path, 0, 0, i, [n for n, _ in layout])}: shape {list(shape)}, "
                                    f"the model expects {list(expected)}")
