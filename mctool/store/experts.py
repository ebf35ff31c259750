"""/experts: expert rows (trajectories, done flags, seeds, accuracy) and /convex rows when streaming.

Row storage is allocated when a buffer is created, for the number of experts asked for:
writing a finished expert then changes no HDF5 structure (see store/files.py), and a row
counts only once its `done` flag is set, after the row itself is flushed. Buffers written
before that layout (rows grown one by one) and requests for more experts than the rows hold
are first rewritten, as a whole and atomically, into the preallocated layout.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from mctool.models import Layout, ModelSpec, layer_sizes
from mctool.store.convex import is_streaming, write_convex_attrs
from mctool.store.fields import MAX_EPOCHS, MAX_EXPERTS, Fields
from mctool.store.files import create, open_artifact, require_group, shown
from mctool.store.meta import DatasetMeta, write_dataset, write_model

_ROW_SETS = ("done", "seeds", "test_accuracy", "train_loss", "trajectories")
_CONVEX_ROW_SETS = ("waypoints", "beta", "done")


@dataclass(frozen=True)
class ExpertsReference:
    """The experts' own final test accuracy: the whole-dataset reference evaluations compare with."""

    mean: float
    std: float
    experts: int
    epochs: int


@dataclass
class ExpertsInfo:
    """/experts, checked: K, rows, which are done, and the settings they were trained with."""

    epochs: int
    rows: int
    done: np.ndarray  # bool [rows]
    has_trajectories: bool
    seeds: np.ndarray  # int64 [rows]
    config: dict[str, Any]
    lr: float
    batch_size: int
    seed: int
    trajectories_in: str | None = None
    imported_from: str | None = None  # set by `mctool import`: the source format
    source: dict[str, Any] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def done_indices(self) -> np.ndarray:
        """Indices of the finished experts."""
        return np.flatnonzero(self.done)


def read_experts(path: str | os.PathLike[str], f: h5py.File, layout: Layout) -> ExpertsInfo:
    """Read and check /experts against the model's layout (row shapes, dtypes, agreement)."""
    r = Fields(path, require_group(path, f, "experts"))
    epochs = r.int("epochs", 1, MAX_EPOCHS)
    done_ds = r.dataset("done", "b", [None])
    rows = done_ds.shape[0]
    if rows > MAX_EXPERTS:
        raise r.problem("done", f"declares {rows} experts; refusing", attribute=False)
    done = r.array("done", "b", [rows]).astype(bool)
    seeds = r.array("seeds", "iu", [rows])
    r.dataset("test_accuracy", "f", [rows, epochs + 1])
    if r.has("train_loss"):
        r.dataset("train_loss", "f", [rows, epochs + 1])
    has_traj = r.has("trajectories")
    if has_traj:
        ds = r.dataset("trajectories", "f", [rows, epochs + 1, sum(layer_sizes(layout))])
        # Snapshots are read one at a time later: the done rows must be stored, whatever their shape says.
        r.stored("trajectories", ds, int(done.sum()) * (epochs + 1) * sum(layer_sizes(layout)) * ds.dtype.itemsize)
    r.provenance()
    attrs: dict[str, Any] = {}
    if "augmentation" in r.group.attrs:
        attrs["augmentation"] = r.str("augmentation")
    for key in ("momentum", "weight_decay"):
        if key in r.group.attrs:
            attrs[key] = r.float(key, 0.0)
    return ExpertsInfo(
        epochs=epochs, rows=rows, done=done, has_trajectories=has_traj, seeds=seeds.astype(np.int64),
        config=r.json("config", dict, {}, raw=True), lr=r.float("lr", positive=True, default=float("nan")),
        batch_size=r.int("batch_size", 1, default=0), seed=r.int("seed", default=-1),
        trajectories_in=r.str("trajectories_in", default=None), imported_from=r.str("imported_from", default=None),
        source=r.json("source", dict, {}), attrs=attrs,
    )


def experts_accuracy(path: str | os.PathLike[str], f: h5py.File, info: ExpertsInfo) -> np.ndarray:
    """Test accuracy [done, K+1] of the finished experts (rows in done order)."""
    r = Fields(path, f["experts"])
    acc = r.array("test_accuracy", "f", [info.rows, info.epochs + 1], rows=info.done_indices).astype(np.float64)
    bad = np.isfinite(acc) & ((acc < 0) | (acc > 1))
    if bad.any():
        raise r.problem("test_accuracy", "holds values outside [0, 1]", attribute=False)
    return acc


def final_accuracy(accuracy: np.ndarray, epochs: int) -> ExpertsReference | None:
    """The one definition of the experts' final accuracy: mean (and population std) over the
    finished experts of the test accuracy at θ_K; None when no expert is finished."""
    last = accuracy[:, -1] if accuracy.size else np.zeros(0)
    last = last[np.isfinite(last)]
    if last.size == 0:
        return None
    return ExpertsReference(mean=float(last.mean()), std=float(last.std()), experts=int(last.size), epochs=epochs)


def read_trajectory(path: str | os.PathLike[str], f: h5py.File, info: ExpertsInfo, e: int) -> torch.Tensor:
    """The full trajectory [K+1, P] of finished expert e (finite values checked)."""
    if not info.has_trajectories:
        raise require_trajectories_error(path)
    r = Fields(path, f["experts"])
    ds = f["experts/trajectories"]
    return torch.from_numpy(r.array("trajectories", "f", [info.rows, info.epochs + 1, ds.shape[2]], finite=True,
                                    rows=int(e)).astype(np.float32, copy=False))


def require_trajectories_error(path: str | os.PathLike[str]) -> Exception:
    """The error for a buffer without full trajectories."""
    from mctool.core.errors import ArtifactError

    return ArtifactError(f"{shown(path)}: holds no full trajectories (convexified only); this needs a buffer "
                         "written by `mctool experts` without --convexify")


# --------------------------------------------------------------------------- writing rows


def _preallocated(parent: h5py.Group, name: str, row_shape: tuple[int, ...], dtype: Any, rows: int,
                  zero: bool) -> h5py.Dataset:
    """A contiguous dataset of `rows` rows allocated now, so that writing rows later touches no
    HDF5 metadata. `zero` fills it at allocation (small flag/accuracy arrays); big row data is
    left unwritten (a sparse file) — only rows marked done are ever read."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_ALLOC if zero else h5py.h5d.FILL_TIME_NEVER)
    return parent.create_dataset(name, shape=(rows, *row_shape), dtype=dtype, dcpl=dcpl)


def _is_preallocated(ds: h5py.Dataset) -> bool:
    return ds.chunks is None and ds.id.get_create_plist().get_alloc_time() == h5py.h5d.ALLOC_TIME_EARLY


@dataclass(frozen=True)
class RowLayout:
    """The shapes of one expert's row: what `create_rows` allocates."""

    epochs: int
    num_params: int
    num_layers: int
    trajectories: bool
    num_waypoints: int | None  # streaming /convex rows, else None

    def row_bytes(self) -> int:
        """Bytes one expert's row takes."""
        k1 = self.epochs + 1
        total = 1 + 8 + 2 * 4 * k1
        if self.trajectories:
            total += k1 * self.num_params * 4
        if self.num_waypoints is not None:
            total += 1 + self.num_waypoints * self.num_params * 4 + k1 * self.num_layers * 4
        return total


def create_rows(f: h5py.File, rows: int, layout: RowLayout) -> None:
    """Allocate /experts rows (and streaming /convex rows) in a file being created."""
    g = f.require_group("experts")
    k1 = layout.epochs + 1
    _preallocated(g, "done", (), np.bool_, rows, zero=True)
    _preallocated(g, "seeds", (), np.int64, rows, zero=True)
    _preallocated(g, "test_accuracy", (k1,), np.float32, rows, zero=True)
    _preallocated(g, "train_loss", (k1,), np.float32, rows, zero=True)
    if layout.trajectories:
        _preallocated(g, "trajectories", (k1, layout.num_params), np.float32, rows, zero=False)
    if layout.num_waypoints is not None:
        c = f.require_group("convex")
        _preallocated(c, "waypoints", (layout.num_waypoints, layout.num_params), np.float32, rows, zero=False)
        _preallocated(c, "beta", (k1, layout.num_layers), np.float32, rows, zero=False)
        _preallocated(c, "done", (), np.bool_, rows, zero=True)
        c.attrs["complete"] = True  # rows count only where /convex/done is set


def rows_ready(f: h5py.File, rows: int) -> bool:
    """Whether every row dataset is preallocated with at least `rows` rows."""
    sets = [f["experts"][n] for n in _ROW_SETS if n in f["experts"]]
    if is_streaming(f):
        sets += [f["convex"][n] for n in _CONVEX_ROW_SETS if n in f["convex"]]
    return all(_is_preallocated(ds) and ds.shape[0] >= rows for ds in sets)


def regrow(path: str | os.PathLike[str], rows: int) -> None:
    """Rewrite `path` as a whole (atomically) with every row dataset preallocated for `rows`
    experts, keeping all rows, attributes and the artifact's identity."""
    path = Path(path)
    with open_artifact(path) as src, create(path) as dst:
        for key, value in src.attrs.items():
            dst.attrs[key] = value
        streaming = is_streaming(src)
        for name in src:
            if name == "experts" or (name == "convex" and streaming):
                group = dst.create_group(name)
                for key, value in src[name].attrs.items():
                    group.attrs[key] = value
                for ds_name, ds in src[name].items():
                    _copy_rows(ds, group, ds_name, max(rows, ds.shape[0]))
            else:
                src.copy(src[name], dst, name=name)


def _copy_rows(ds: h5py.Dataset, group: h5py.Group, name: str, rows: int) -> None:
    big = ds.ndim >= 2 and ds.shape[1] * max(1, int(np.prod(ds.shape[2:]))) > 4096
    new = _preallocated(group, name, ds.shape[1:], ds.dtype, rows, zero=not big)
    for key, value in ds.attrs.items():
        new.attrs[key] = value
    if not big:
        new[: ds.shape[0]] = ds[()]
        return
    for i in range(ds.shape[0]):  # one row at a time: memory bounded by a trajectory
        new[i] = ds[i]


# The open datasets of writes that failed (a full disk): HDF5 (2.0) crashes (SIGSEGV) closing a
# dataset whose flush failed, so they stay open until the process ends (the CLI then leaves
# without teardown).
_ABANDONED: list[dict[str, h5py.Dataset]] = []


class ExpertRows:
    """Writes finished experts into a buffer opened with `store.append` (rows preallocated)."""

    def __init__(self, f: h5py.File) -> None:
        self.f = f
        self.streaming = is_streaming(f)
        self._open: dict[str, h5py.Dataset] = {}

    def _ds(self, name: str) -> h5py.Dataset:
        """Dataset `name`, kept open while the rows are written: HDF5 holds a small write in the
        dataset's buffer until the dataset is closed, and h5py only prints (never raises) what
        fails then — on a full disk a row was lost and still marked done. An open dataset's
        buffer is written by `f.flush()`, which raises."""
        if name not in self._open:
            self._open[name] = self.f[name]
        return self._open[name]

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        try:
            yield
        except BaseException:
            _ABANDONED.append(self._open)
            self._open = {}
            raise

    @property
    def epochs(self) -> int:
        """The rows' K, checked as every read is."""
        return Fields(self.f.filename, self.f["experts"]).int("epochs", 1, MAX_EPOCHS)

    def done(self) -> np.ndarray:
        """Boolean mask of finished experts."""
        return self.f["experts/done"][()].astype(bool)

    def write_snapshot(self, e: int, k: int, flat: torch.Tensor) -> None:
        """Store snapshot k of expert e (not yet done: `finish` marks the row)."""
        with self._writing():
            self._ds("experts/trajectories")[e, k] = flat.detach().to("cpu", torch.float32).numpy()

    def finish(self, e: int, seed: int, test_accuracy: list[float], train_loss: list[float],
               trajectory: torch.Tensor | None = None, waypoints: torch.Tensor | None = None,
               beta: torch.Tensor | None = None) -> None:
        """Write expert e's row, flush, then mark it done and flush again.

        A streamed row has two flags: /convex/done first, then /experts/done, the one that
        commits the row (readers count a streamed /convex row only where both are set)."""
        with self._writing():
            ds = self._ds
            if trajectory is not None:
                ds("experts/trajectories")[e] = trajectory.detach().to("cpu", torch.float32).numpy()
            ds("experts/seeds")[e] = seed
            ds("experts/test_accuracy")[e] = np.asarray(test_accuracy, dtype=np.float32)
            ds("experts/train_loss")[e] = np.asarray(train_loss, dtype=np.float32)
            if self.streaming:
                assert waypoints is not None and beta is not None
                ds("convex/waypoints")[e] = waypoints.to("cpu", torch.float32).numpy()
                ds("convex/beta")[e] = beta.to("cpu", torch.float32).numpy()
            self.f.flush()
            if self.streaming:
                ds("convex/done")[e] = True
                self.f.flush()
            ds("experts/done")[e] = True
            self.f.flush()


def copy_without_trajectories(src: h5py.File, dst: h5py.File, trajectories_in: str) -> None:
    """Start a compact artifact in `dst` (being created): /dataset, /model and /experts of `src`
    with every row but the trajectories, and `trajectories_in` naming where those remain."""
    for name in ("dataset", "model"):
        src.copy(src[name], dst, name=name)
    group = dst.create_group("experts")
    group.attrs.update(dict(src["experts"].attrs))
    for name in _ROW_SETS:
        if name != "trajectories" and name in src["experts"]:
            src.copy(src["experts"][name], group, name=name)
    group.attrs["trajectories_in"] = trajectories_in


def create_buffer(out: str | os.PathLike[str], data: DatasetMeta, spec: ModelSpec, layout: Layout, rows: int,
                  row_layout: RowLayout, attrs: dict[str, Any], streaming: tuple[Any, dict[str, Any]] | None) -> None:
    """Write a new buffer atomically: metadata, and rows allocated for `rows` experts.

    `streaming` is (ConvexMeta, provenance) for `experts --convexify` buffers (rows of /convex
    instead of full trajectories)."""
    with create(out) as f:
        write_dataset(f, data)
        write_model(f, spec, layout)
        f.require_group("experts").attrs.update(attrs)
        create_rows(f, rows, row_layout)
        if streaming is not None:
            meta, prov = streaming
            write_convex_attrs(f["convex"], meta, prov, complete=True)
