"""/dataset and /model: what the data and the network were, checked against each other."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import h5py

from mctool.core.errors import UsageError
from mctool.models import Layout, ModelSpec, layer_sizes, layout_json, layout_of
from mctool.models.convnet import ACTS, NORMS, POOLS
from mctool.store.fields import Fields
from mctool.store.files import require_group

MAX_CLASSES = 100_000
MAX_CHANNELS = 16
MAX_SIDE = 4096
MAX_PARAMS = 2_000_000_000


@dataclass(frozen=True)
class DatasetMeta:
    """What /dataset records: enough for distill/evaluate to rebuild the same preprocessing."""

    name: str
    num_classes: int
    channels: int
    height: int
    width: int
    zca: bool
    zca_eps: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]
    train_fingerprint: str
    flip: bool = True

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width)."""
        return self.channels, self.height, self.width


def write_dataset(f: h5py.File, meta: DatasetMeta) -> None:
    """Create or overwrite /dataset."""
    g = f.require_group("dataset")
    g.attrs.update({
        "name": meta.name,
        "num_classes": meta.num_classes,
        "channels": meta.channels,
        "height": meta.height,
        "width": meta.width,
        "zca": meta.zca,
        "zca_eps": meta.zca_eps,
        "normalization": json.dumps({"mean": list(meta.mean), "std": list(meta.std)}),
        "class_names": json.dumps(list(meta.class_names)),
        "train_fingerprint": meta.train_fingerprint,
        "flip": meta.flip,
    })


def read_dataset(path: str | os.PathLike[str], f: h5py.File) -> DatasetMeta:
    """Read and check /dataset."""
    r = Fields(path, require_group(path, f, "dataset"))
    channels = r.int("channels", 1, MAX_CHANNELS)
    zca = r.bool("zca")
    num_classes = r.int("num_classes", 1, MAX_CLASSES)
    norm = r.json("normalization", dict, {"mean": [], "std": []})
    mean, std = norm.get("mean", []), norm.get("std", [])
    if not _numbers(mean, len(mean) in (0, channels)) or not _numbers(std, len(std) == len(mean)) \
            or any(s <= 0 for s in std):
        raise r.problem("normalization", f"needs {channels} mean and {channels} positive std values")
    # The names as they are (a folder: dataset's path and folder names): never their display form.
    names = r.json("class_names", list, [], raw=True)
    if names and (len(names) != num_classes or not all(isinstance(n, str) for n in names)):
        raise r.problem("class_names", f"needs {num_classes} names, got {len(names)}")
    return DatasetMeta(
        name=r.str("name", raw=True), num_classes=num_classes, channels=channels,
        height=r.int("height", 1, MAX_SIDE), width=r.int("width", 1, MAX_SIDE),
        zca=zca, zca_eps=r.float("zca_eps", 0.0, positive=zca),
        mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std), class_names=tuple(names),
        train_fingerprint=r.str("train_fingerprint"), flip=r.bool("flip", True),
    )


def _numbers(values: object, length_ok: bool) -> bool:
    return isinstance(values, list) and length_ok and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf") for v in values)


def write_model(f: h5py.File, spec: ModelSpec, layout: Layout) -> None:
    """Create or overwrite /model: the spec and the flat parameter layout."""
    g = f.require_group("model")
    d = spec.to_dict()
    d["im_size"] = json.dumps(d["im_size"])
    g.attrs.update(d)
    g.attrs["layers"] = layout_json(layout)
    g.attrs["num_params"] = sum(layer_sizes(layout))


def read_model(path: str | os.PathLike[str], f: h5py.File, data: DatasetMeta | None = None) -> tuple[ModelSpec, Layout]:
    """Read /model and check it: a known architecture, a layout equal to the one its spec
    builds, and (given /dataset) the same image shape and class count as the data."""
    r = Fields(path, require_group(path, f, "model"))
    im_size = r.json("im_size", list)
    if len(im_size) != 2 or not all(isinstance(v, int) and 1 <= v <= MAX_SIDE for v in im_size):
        raise r.problem("im_size", f"must be [height, width], got {im_size}")
    spec = ModelSpec(
        arch=r.str("arch"), depth=r.int("depth", 1, 16), width=r.int("width", 1, 1 << 16),
        norm=r.str("norm", choices=NORMS), act=r.str("act", choices=ACTS), pool=r.str("pool", choices=POOLS),
        channels=r.int("channels", 1, MAX_CHANNELS), num_classes=r.int("num_classes", 1, MAX_CLASSES),
        im_size=(im_size[0], im_size[1]),
    )
    if data is not None:
        if (spec.channels, *spec.im_size) != data.image_shape:
            raise r.problem("im_size", f"the network takes {spec.channels}x{spec.im_size[0]}x{spec.im_size[1]} "
                                       f"images but /dataset has {data.channels}x{data.height}x{data.width}")
        if spec.num_classes != data.num_classes:
            raise r.problem("num_classes", f"{spec.num_classes} outputs but /dataset has {data.num_classes} classes")
    layers = r.json("layers", list)
    try:
        layout = [(str(d["name"]), tuple(int(x) for x in d["shape"])) for d in layers]
    except (KeyError, TypeError, ValueError):
        raise r.problem("layers", "must be a list of {name, shape}") from None
    try:
        built = layout_of(spec)
    except UsageError as exc:
        raise r.problem("arch", str(exc)) from None
    if layout != built:
        raise r.problem("layers", f"do not match the {spec.arch} its attributes describe "
                                  f"({len(layout)} vs {len(built)} tensors)")
    if sum(layer_sizes(layout)) > MAX_PARAMS:
        raise r.problem("layers", "describe an implausibly large network")
    stated = r.int("num_params", default=None)  # present in every file mctool wrote; checked when there
    if stated is not None and stated != sum(layer_sizes(layout)):
        raise r.problem("num_params", f"says {stated} but the layers hold {sum(layer_sizes(layout))}")
    return spec, layout
