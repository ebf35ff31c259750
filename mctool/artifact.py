"""The mctool HDF5 artifact: open, validate, read and write (layout in docs/format.md).

Every reader goes through `open_artifact`, which raises one error type, ArtifactError, whose
message names the file and the problem. Writers either append per-expert rows (flushed,
then marked done) or rewrite a whole file through a temporary copy moved into place.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from mctool import __version__
from mctool.allocator import malloc_tuned
from mctool.errors import ArtifactError, DiskFull
from mctool.nets import ModelSpec, layout_from_json, layout_json

FORMAT = "mctool"
FORMAT_VERSION = 1

# Group -> the command that creates it, for "run X first" hints.
_PRODUCERS = {
    "dataset": "mctool experts DATASET",
    "model": "mctool experts DATASET",
    "experts": "mctool experts DATASET",
    "convex": "mctool convexify FILE",
    "synsets": "mctool distill --buffer FILE",
}


def now_iso() -> str:
    """Current UTC time, ISO-8601, seconds precision."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def versions() -> dict[str, str]:
    """Versions recorded in every product (provenance)."""
    return {
        "mctool": __version__,
        "torch": torch.__version__,
        "h5py": h5py.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        # CPU float round-off depends on the thread count, so bit-exact reruns need the same one.
        "torch_threads": str(torch.get_num_threads()),
        "malloc": "tuned" if malloc_tuned() else "default",  # speed only, never the numbers
    }


def provenance(config: dict[str, Any], seed: int | None, source: dict[str, Any] | None = None) -> dict[str, str]:
    """The attributes every product group carries: config, argv, seed, versions, source, date."""
    return {
        "config": json.dumps(config, sort_keys=True),
        "argv": json.dumps(sys.argv),
        "seed": -1 if seed is None else int(seed),
        "versions": json.dumps(versions()),
        "source": json.dumps(source or {}),
        "created": now_iso(),
    }


def json_attr(obj: h5py.HLObject, key: str, default: Any = None) -> Any:
    """Read a JSON-encoded attribute (default when absent)."""
    if key not in obj.attrs:
        return default
    value = obj.attrs[key]
    if isinstance(value, bytes):
        value = value.decode()
    return json.loads(value)


def str_attr(obj: h5py.HLObject, key: str, default: str = "") -> str:
    """Read a string attribute (h5py may hand back bytes)."""
    value = obj.attrs.get(key, default)
    return value.decode() if isinstance(value, bytes) else str(value)


def ensure_free_space(path: str | os.PathLike[str], needed: int, what: str) -> None:
    """Refuse to start a write that cannot fit: HDF5 fails badly (even crashes) on a full disk,
    so writers check first and stop with one line while every file is still intact."""
    folder = Path(path).resolve().parent
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    want = int(needed * 1.05) + (1 << 20)  # HDF5 metadata and chunk slack
    if free < want:
        raise DiskFull(f"disk full: {what} needs about {want / 1e6:.1f} MB in {folder} but only "
                       f"{free / 1e6:.1f} MB are free; free space and run the same command again "
                       "(finished work is kept)")


# --------------------------------------------------------------------------- opening


def _check_root(path: Path, f: h5py.File) -> None:
    if str_attr(f, "format") != FORMAT:
        raise ArtifactError(f"{path}: an HDF5 file, but not an mctool artifact (no format='mctool' stamp)")
    version = int(f.attrs.get("format_version", 0))
    if version > FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: format_version {version} is newer than this mctool understands ({FORMAT_VERSION}); "
            "upgrade mctool"
        )
    if version < 1:
        raise ArtifactError(f"{path}: invalid format_version {version}")


@contextlib.contextmanager
def open_artifact(path: str | os.PathLike[str], mode: str = "r") -> Iterator[h5py.File]:
    """Open an existing artifact (mode 'r' or 'r+') after checking it is ours and readable."""
    p = Path(path)
    if not p.exists():
        raise ArtifactError(f"{p}: no such file")
    if p.is_dir():
        raise ArtifactError(f"{p}: is a directory, not an artifact file")
    try:
        ok = h5py.is_hdf5(p)
    except OSError as exc:
        raise ArtifactError(f"{p}: cannot read ({exc.strerror or exc})") from None
    if not ok:
        raise ArtifactError(f"{p}: not an HDF5 file")
    try:
        f = h5py.File(p, mode)
    except OSError as exc:
        raise ArtifactError(f"{p}: unreadable HDF5 file (truncated or damaged?): {exc}") from None
    try:
        _check_root(p, f)
        yield f
    finally:
        f.close()


def require_group(path: str | os.PathLike[str], f: h5py.File, name: str) -> h5py.Group:
    """The group `name`, or an ArtifactError saying which command creates it."""
    if name not in f or not isinstance(f[name], h5py.Group):
        if name.split("/")[0] != "synsets" and "synsets" in f and "experts" not in f and "convex" not in f:
            raise ArtifactError(f"{path}: a synset file (holds synthetic sets), not a buffer of experts")
        hint = _PRODUCERS.get(name.split("/")[0], "")
        hint = f" — run `{hint}` first" if hint else ""
        raise ArtifactError(f"{path}: no /{name} group{hint}")
    return f[name]


def contents(f: h5py.File) -> str:
    """What an artifact holds, in words, for messages."""
    held = [words for key, words in (("experts/trajectories", "expert trajectories"),
                                     ("convex", "convexified experts"), ("synsets", "synthetic sets")) if key in f]
    return " and ".join(held) or "nothing yet"


def new_file(f: h5py.File) -> None:
    """Stamp the root of a freshly created artifact."""
    f.attrs["format"] = FORMAT
    f.attrs["format_version"] = FORMAT_VERSION
    f.attrs["mctool_version"] = __version__
    f.attrs["created"] = now_iso()
    f.attrs["artifact_id"] = uuid.uuid4().hex


def fingerprint(path: str | os.PathLike[str], f: h5py.File) -> dict[str, Any]:
    """How a product names its source: file path, the source's artifact id and what it held."""
    info: dict[str, Any] = {"file": str(Path(path).resolve()), "artifact_id": str_attr(f, "artifact_id")}
    if "experts/done" in f:
        info["experts_done"] = int(np.count_nonzero(f["experts/done"][()]))
    return info


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], copy_existing: bool = True) -> Iterator[h5py.File]:
    """Write a whole-file product: work on a temporary file in the same directory, then
    `os.replace` it into place. An exception leaves the old file untouched."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if copy_existing and target.exists():
        ensure_free_space(target, target.stat().st_size, f"rewriting {target.name}")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if copy_existing and target.exists():
            with open_artifact(target):  # refuse to build on a file that is not ours
                pass
            shutil.copyfile(target, tmp)
            f = h5py.File(tmp, "r+")
        else:
            f = h5py.File(tmp, "w")
            new_file(f)
        try:
            yield f
        finally:
            f.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the product gets ordinary permissions
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- metadata


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

    def write(self, f: h5py.File) -> None:
        """Create or overwrite /dataset."""
        g = f.require_group("dataset")
        g.attrs.update(
            {
                "name": self.name,
                "num_classes": self.num_classes,
                "channels": self.channels,
                "height": self.height,
                "width": self.width,
                "zca": self.zca,
                "zca_eps": self.zca_eps,
                "normalization": json.dumps({"mean": list(self.mean), "std": list(self.std)}),
                "class_names": json.dumps(list(self.class_names)),
                "train_fingerprint": self.train_fingerprint,
                "flip": self.flip,
            }
        )

    @classmethod
    def read(cls, path: str | os.PathLike[str], f: h5py.File) -> "DatasetMeta":
        """Read /dataset (ArtifactError when absent or incomplete)."""
        g = require_group(path, f, "dataset")
        try:
            norm = json_attr(g, "normalization", {"mean": [], "std": []})
            return cls(
                name=str_attr(g, "name"),
                num_classes=int(g.attrs["num_classes"]),
                channels=int(g.attrs["channels"]),
                height=int(g.attrs["height"]),
                width=int(g.attrs["width"]),
                zca=bool(g.attrs["zca"]),
                zca_eps=float(g.attrs["zca_eps"]),
                mean=tuple(norm["mean"]),
                std=tuple(norm["std"]),
                class_names=tuple(json_attr(g, "class_names", [])),
                train_fingerprint=str_attr(g, "train_fingerprint"),
                flip=bool(g.attrs.get("flip", True)),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise ArtifactError(f"{path}: /dataset is incomplete ({exc})") from None


def write_model(f: h5py.File, spec: ModelSpec, layout: list[tuple[str, tuple[int, ...]]]) -> None:
    """Create or overwrite /model: the spec and the flat parameter layout."""
    g = f.require_group("model")
    d = spec.to_dict()
    d["im_size"] = json.dumps(d["im_size"])
    g.attrs.update(d)
    g.attrs["layers"] = layout_json(layout)
    g.attrs["num_params"] = sum(int(np.prod(s)) for _, s in layout)


def read_model(path: str | os.PathLike[str], f: h5py.File) -> tuple[ModelSpec, list[tuple[str, tuple[int, ...]]]]:
    """Read /model: (spec, layout)."""
    g = require_group(path, f, "model")
    try:
        d = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in g.attrs.items()}
        d["im_size"] = json.loads(d["im_size"])
        spec = ModelSpec.from_dict(d)
        layout = layout_from_json(str_attr(g, "layers"))
    except (KeyError, ValueError, TypeError) as exc:
        raise ArtifactError(f"{path}: /model is incomplete ({exc})") from None
    return spec, layout


def layer_sizes(layout: list[tuple[str, tuple[int, ...]]]) -> list[int]:
    """Number of entries of each parameter tensor, in flat order."""
    return [int(np.prod(s)) for _, s in layout]


# --------------------------------------------------------------------------- experts


class ExpertRows:
    """Appendable per-expert storage under /experts (and /convex when streaming).

    Each expert's row is written, the file flushed, and only then `done[e]` set and flushed
    again: a crash loses at most the expert in progress and the file stays readable.
    """

    def __init__(self, f: h5py.File, num_experts: int, epochs: int, num_params: int, num_layers: int,
                 trajectories: bool, num_waypoints: int | None) -> None:
        self.f = f
        g = f.require_group("experts")
        k1 = epochs + 1
        self.trajectories = trajectories
        if trajectories:
            _require_rows(g, "trajectories", (k1, num_params), np.float32, chunks=(1, 1, num_params))
        _require_rows(g, "done", (), np.bool_)
        _require_rows(g, "seeds", (), np.int64)
        _require_rows(g, "test_accuracy", (k1,), np.float32)
        _require_rows(g, "train_loss", (k1,), np.float32)
        self.streaming = num_waypoints is not None
        if self.streaming:
            c = f.require_group("convex")
            _require_rows(c, "waypoints", (num_waypoints, num_params), np.float32,
                          chunks=(1, 1, num_params))
            _require_rows(c, "beta", (k1, num_layers), np.float32)
            _require_rows(c, "done", (), np.bool_)
            c.attrs["complete"] = True  # rows count only where /convex/done is set
        self.resize(num_experts)

    def resize(self, num_experts: int) -> None:
        """Grow every row dataset to hold `num_experts` rows (never shrinks)."""
        datasets = [self.f["experts"][n] for n in ("done", "seeds", "test_accuracy", "train_loss")]
        if self.trajectories:
            datasets.append(self.f["experts/trajectories"])
        if self.streaming:
            datasets += [self.f["convex/waypoints"], self.f["convex/beta"], self.f["convex/done"]]
        for ds in datasets:
            if ds.shape[0] < num_experts:
                ds.resize(num_experts, axis=0)

    def done(self) -> np.ndarray:
        """Boolean mask of finished experts."""
        return self.f["experts/done"][()]

    def write_snapshot(self, e: int, k: int, flat: torch.Tensor) -> None:
        """Store snapshot k of expert e (not yet marked done)."""
        self.f["experts/trajectories"][e, k] = flat.detach().to("cpu", torch.float32).numpy()

    def finish(self, e: int, seed: int, test_accuracy: list[float], train_loss: list[float],
               waypoints: torch.Tensor | None = None, beta: torch.Tensor | None = None) -> None:
        """Write the rest of expert e's row, flush, then mark it done and flush again."""
        g = self.f["experts"]
        g["seeds"][e] = seed
        g["test_accuracy"][e] = np.asarray(test_accuracy, dtype=np.float32)
        g["train_loss"][e] = np.asarray(train_loss, dtype=np.float32)
        if self.streaming:
            assert waypoints is not None and beta is not None
            self.f["convex/waypoints"][e] = waypoints.to("cpu", torch.float32).numpy()
            self.f["convex/beta"][e] = beta.to("cpu", torch.float32).numpy()
        self.f.flush()
        g["done"][e] = True
        if self.streaming:
            self.f["convex/done"][e] = True
        self.f.flush()


def _require_rows(g: h5py.Group, name: str, row_shape: tuple[int, ...], dtype: Any,
                  chunks: tuple[int, ...] | None = None) -> h5py.Dataset:
    """A dataset of rows that can grow along axis 0; checks the row shape of an existing one."""
    if name in g:
        ds = g[name]
        if tuple(ds.shape[1:]) != row_shape:
            raise ArtifactError(f"{g.file.filename}: /{g.name.strip('/')}/{name} has rows of shape "
                                f"{tuple(ds.shape[1:])}, expected {row_shape}")
        return ds
    return g.create_dataset(name, shape=(0, *row_shape), maxshape=(None, *row_shape), dtype=dtype,
                            chunks=chunks or ((1, *row_shape) if row_shape else (1024,)))


def done_experts(path: str | os.PathLike[str], f: h5py.File) -> np.ndarray:
    """Indices of the finished experts (ArtifactError when there are none)."""
    g = require_group(path, f, "experts")
    if "done" not in g:
        raise ArtifactError(f"{path}: /experts has no done flags")
    idx = np.flatnonzero(g["done"][()])
    if idx.size == 0:
        raise ArtifactError(f"{path}: no finished experts yet — run or resume `mctool experts`")
    return idx


def read_trajectory(path: str | os.PathLike[str], f: h5py.File, e: int) -> torch.Tensor:
    """The full trajectory [K+1, P] of expert e."""
    g = require_group(path, f, "experts")
    if "trajectories" not in g:
        raise ArtifactError(f"{path}: holds no full trajectories (convexified only); "
                            "this needs a buffer written by `mctool experts` without --convexify")
    return torch.from_numpy(g["trajectories"][e])


# --------------------------------------------------------------------------- convex


@dataclass(frozen=True)
class ConvexMeta:
    """The /convex attributes."""

    positions: tuple[int, ...]
    strategy: str
    smooth: bool


def write_convex_attrs(g: h5py.Group, meta: ConvexMeta, prov: dict[str, Any]) -> None:
    """Attributes of /convex (positions, strategy, smoothing, provenance)."""
    g.attrs["positions"] = np.asarray(meta.positions, dtype=np.int64)
    g.attrs["strategy"] = meta.strategy
    g.attrs["smoothing"] = "authors-code" if meta.smooth else "none"
    g.attrs.update(prov)


def read_convex(path: str | os.PathLike[str], f: h5py.File) -> ConvexMeta:
    """Read and check /convex: positions, strategy, smoothing, shapes against /model."""
    g = require_group(path, f, "convex")
    if not bool(g.attrs.get("complete", False)) or "waypoints" not in g or "beta" not in g:
        raise ArtifactError(f"{path}: /convex is incomplete (interrupted?) — run `mctool convexify {path}` again")
    _, layout = read_model(path, f)
    positions = tuple(int(p) for p in g.attrs["positions"])
    p_total = sum(layer_sizes(layout))
    w, b = g["waypoints"], g["beta"]
    if w.shape[1:] != (len(positions), p_total) or b.shape[2] != len(layout) or b.shape[1] != positions[-1] + 1:
        raise ArtifactError(f"{path}: /convex shapes {w.shape}, {b.shape} do not match positions "
                            f"{list(positions)} and the model's {len(layout)} layers / {p_total} parameters")
    return ConvexMeta(positions, str_attr(g, "strategy"), str_attr(g, "smoothing") != "none")


def convex_experts(path: str | os.PathLike[str], f: h5py.File) -> np.ndarray:
    """Indices of the experts /convex holds (ArtifactError when none)."""
    idx = np.flatnonzero(f["convex/done"][()]) if "convex/done" in f else np.zeros(0, dtype=np.int64)
    if idx.size == 0:
        raise ArtifactError(f"{path}: /convex holds no experts — run `mctool convexify {path}`")
    return idx


def read_convex_expert(f: h5py.File, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Waypoints [I+2, P] and beta [K+1, L] of expert e."""
    return torch.from_numpy(f["convex/waypoints"][e]), torch.from_numpy(f["convex/beta"][e])


# --------------------------------------------------------------------------- synsets


def synset_names(f: h5py.File) -> list[str]:
    """Names of the synthetic sets in the file."""
    return sorted(f["synsets"].keys()) if "synsets" in f else []


def pick_synset(path: str | os.PathLike[str], f: h5py.File, name: str | None) -> h5py.Group:
    """The synset `name`, or the only/latest one when `name` is None."""
    names = synset_names(f)
    if not names:
        raise ArtifactError(f"{path}: no synthetic sets in this file — run `mctool distill` first")
    if name is None:
        if len(names) == 1:
            return f["synsets"][names[0]]
        latest = max(names, key=lambda n: str_attr(f["synsets"][n], "created"))
        return f["synsets"][latest]
    if name not in names:
        raise ArtifactError(f"{path}: no synset named '{name}' (has: {', '.join(names)})")
    return f["synsets"][name]


def write_tensor(g: h5py.Group, name: str, t: torch.Tensor | np.ndarray) -> None:
    """(Re)write a dataset from a tensor or array."""
    if name in g:
        del g[name]
    arr = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
    g.create_dataset(name, data=arr)
