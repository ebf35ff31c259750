"""The one place the interop package touches the HDF5 artifact (through mctool.artifact's API).

Everything else in mctool.interop produces or consumes tensors and plain dataclasses; porting
the interop package to another store means rewriting only this module.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mctool import artifact
from mctool.artifact import ConvexMeta, DatasetMeta
from mctool.errors import ArtifactError
from mctool.interop.export import SynsetData
from mctool.nets import ModelSpec

Layout = list[tuple[str, tuple[int, ...]]]

# Marks /experts of a buffer written by an import (value: the source format).
IMPORTED_ATTR = "imported_from"


@dataclass(frozen=True)
class NewBuffer:
    """Everything a fresh import buffer records before its first row."""

    meta: DatasetMeta
    spec: ModelSpec
    layout: Layout
    epochs: int
    training: dict[str, Any]  # lr, momentum, weight_decay, batch_size, augmentation (as stated)
    config: dict[str, Any]  # what must match to resume
    source: dict[str, Any]  # format, folder, file listing
    convex: ConvexMeta | None = None  # compressed imports: /convex rows instead of trajectories


def create_buffer(out: Path, new: NewBuffer) -> None:
    """Write an empty buffer (metadata, zero rows) atomically."""
    sizes = artifact.layer_sizes(new.layout)
    artifact.ensure_free_space(out, 0, f"creating {out.name}")
    with artifact.atomic_write(out, copy_existing=False) as f:
        new.meta.write(f)
        artifact.write_model(f, new.spec, new.layout)
        g = f.require_group("experts")
        g.attrs.update({"epochs": new.epochs, **new.training, "seed": -1})
        g.attrs.update(artifact.provenance(new.config, None, new.source))
        g.attrs[IMPORTED_ATTR] = str(new.source.get("format", ""))
        artifact.ExpertRows(f, 0, new.epochs, sum(sizes), len(sizes), trajectories=new.convex is None,
                            num_waypoints=None if new.convex is None else len(new.convex.positions))
        if new.convex is not None:
            artifact.write_convex_attrs(f["convex"], new.convex,
                                        artifact.provenance(new.config, None, new.source))


def stored_import(out: Path) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(config, source) of an import buffer, or None when `out` is an artifact but not an import.

    ArtifactError when `out` is not an mctool artifact at all."""
    with artifact.open_artifact(out) as f:
        if "experts" not in f or IMPORTED_ATTR not in f["experts"].attrs:
            return None
        g = f["experts"]
        return artifact.json_attr(g, "config", {}), artifact.json_attr(g, "source", {})


def contents(out: Path) -> str:
    """What an existing artifact holds, in words."""
    try:
        with artifact.open_artifact(out) as f:
            return artifact.contents(f)
    except ArtifactError as exc:
        return f"no mctool artifact ({exc})"


def done_rows(out: Path) -> np.ndarray:
    """Boolean mask of the rows already imported."""
    with artifact.open_artifact(out) as f:
        return f["experts/done"][()] if "experts/done" in f else np.zeros(0, dtype=bool)


class RowWriter:
    """Writes one expert's row of an open buffer; the row counts only after `finish`."""

    def __init__(self, f: Any, rows: artifact.ExpertRows, epochs: int) -> None:
        self._f, self._rows, self._epochs = f, rows, epochs

    def snapshot(self, row: int, k: int, flat: torch.Tensor) -> None:
        """Store snapshot k of row `row`."""
        self._rows.write_snapshot(row, k, flat)

    def finish(self, row: int, final_accuracy: float | None, waypoints: torch.Tensor | None = None,
               beta: torch.Tensor | None = None) -> None:
        """Accuracy of the last snapshot (or NaN), no training losses; flush, then mark done."""
        nan = float("nan")
        acc = [nan] * (self._epochs + 1)
        if final_accuracy is not None:
            acc[-1] = float(final_accuracy)
        self._rows.finish(row, -1, acc, [nan] * (self._epochs + 1), waypoints, beta)


@contextlib.contextmanager
def open_rows(out: Path, num_rows: int, row_bytes: int) -> Iterator[RowWriter]:
    """Open the buffer for writing rows (grown to `num_rows`), after checking the disk can take one."""
    artifact.ensure_free_space(out, row_bytes, "storing one imported expert")
    with artifact.open_artifact(out, "r+") as f:
        spec_layout = artifact.read_model(out, f)[1]
        sizes = artifact.layer_sizes(spec_layout)
        epochs = int(f["experts"].attrs["epochs"])
        streaming = "convex" in f and "trajectories" not in f["experts"]
        positions = len(f["convex"].attrs["positions"]) if streaming else None
        rows = artifact.ExpertRows(f, num_rows, epochs, sum(sizes), len(sizes), trajectories=not streaming,
                                   num_waypoints=positions)
        yield RowWriter(f, rows, epochs)


# --------------------------------------------------------------------------- synsets (for export)


def read_synset(path: Path, name: str | None = None) -> SynsetData:
    """The synset `name` (default: the only or latest) of a synset file."""
    with artifact.open_artifact(path) as f:
        meta = DatasetMeta.read(path, f)
        try:
            spec: ModelSpec | None = artifact.read_model(path, f)[0]
        except ArtifactError:
            spec = None
        g = artifact.pick_synset(path, f, name)
        synset = g.name.split("/")[-1]
        images = torch.from_numpy(g["images"][()])
        labels = torch.from_numpy(g["labels"][()])
        lr = float(g.attrs.get("lr", math.nan))
        source = artifact.fingerprint(path, f)
        source["synset"] = synset
        source["synset_created"] = artifact.str_attr(g, "created")
        reference = artifact.json_attr(g, "experts_reference", None)
        return SynsetData(synset, images, labels, lr, int(g.attrs.get("ipc", 0)), int(g.attrs.get("iterations", 0)),
                          meta, spec, source, reference)
