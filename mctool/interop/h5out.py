"""The one place the interop package touches the artifact: through mctool.store.

Everything else in mctool.interop produces or consumes tensors and plain dataclasses.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mctool import store
from mctool.core.errors import ArtifactError
from mctool.models import Layout, ModelSpec, layer_sizes
from mctool.store import DatasetMeta

@dataclass(frozen=True)
class SynsetData:
    """A synthetic set and what describes its space (read by the store adapter)."""

    name: str
    images: torch.Tensor  # [N, C, H, W] float32, preprocessed space
    labels: torch.Tensor  # int64 [N] or float32 [N, classes]
    lr: float
    ipc: int
    iterations: int
    meta: DatasetMeta
    spec: ModelSpec | None
    source: dict[str, Any]
    experts_reference: dict[str, Any] | None = None


# Marks /experts of a buffer written by an import (value: the source format).
IMPORTED_ATTR = "imported_from"


@dataclass(frozen=True)
class NewBuffer:
    """Everything a fresh import buffer records before its first row."""

    meta: store.DatasetMeta
    spec: ModelSpec
    layout: Layout
    epochs: int
    rows: int  # every expert the source folder holds (row storage is allocated up front)
    training: dict[str, Any]  # lr, momentum, weight_decay, batch_size, augmentation (as stated)
    config: dict[str, Any]  # what must match to resume
    source: dict[str, Any]  # format, folder, file listing
    convex: store.ConvexMeta | None = None  # compressed imports: /convex rows instead of trajectories


def create_buffer(out: Path, new: NewBuffer) -> None:
    """Write an empty buffer (metadata, rows allocated for every expert) atomically."""
    sizes = layer_sizes(new.layout)
    rows = store.RowLayout(epochs=new.epochs, num_params=sum(sizes), num_layers=len(sizes),
                           trajectories=new.convex is None,
                           num_waypoints=None if new.convex is None else len(new.convex.positions))
    store.ensure_free_space(out, rows.row_bytes() * new.rows, f"{new.rows} imported expert(s) in {out.name}")
    attrs = {"epochs": new.epochs, **new.training, "seed": -1, **store.provenance(new.config, None, new.source),
             IMPORTED_ATTR: str(new.source.get("format", ""))}
    # /convex rows are written together with /experts rows, like `experts --convexify` ("streaming").
    streaming = None if new.convex is None else (
        new.convex, store.provenance({**new.config, "streaming": True}, None, new.source))
    store.create_buffer(out, new.meta, new.spec, new.layout, new.rows, rows, attrs, streaming)


def stored_import(out: Path) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(config, source) of an import buffer, or None when `out` is an artifact but not an import.

    ArtifactError when `out` is not an mctool artifact at all."""
    with store.open_buffer(out) as buf:
        info = buf.experts
        if info is None or info.imported_from is None:
            return None
        return info.config, info.source


def contents(out: Path) -> str:
    """What an existing artifact holds, in words."""
    try:
        with store.open_artifact(out) as f:
            return store.contents(f)
    except ArtifactError as exc:
        return f"no mctool artifact ({exc})"


def done_rows(out: Path) -> np.ndarray:
    """Boolean mask of the rows already imported."""
    with store.open_buffer(out) as buf:
        return buf.experts.done if buf.experts is not None else np.zeros(0, dtype=bool)


class RowWriter:
    """Writes one expert's row of an open buffer; the row counts only after `finish`."""

    def __init__(self, rows: store.ExpertRows, epochs: int) -> None:
        self._rows, self._epochs = rows, epochs

    def snapshot(self, row: int, k: int, flat: torch.Tensor) -> None:
        """Store snapshot k of row `row` (memory: one snapshot)."""
        self._rows.write_snapshot(row, k, flat)

    def finish(self, row: int, final_accuracy: float | None, waypoints: torch.Tensor | None = None,
               beta: torch.Tensor | None = None) -> None:
        """Accuracy of the last snapshot (or NaN), no training losses; flush, then mark done."""
        nan = float("nan")
        acc = [nan] * (self._epochs + 1)
        if final_accuracy is not None:
            acc[-1] = float(final_accuracy)
        self._rows.finish(row, -1, acc, [nan] * (self._epochs + 1), waypoints=waypoints, beta=beta)


@contextlib.contextmanager
def open_rows(out: Path, row_bytes: int) -> Iterator[RowWriter]:
    """Open the buffer for writing rows, after checking the disk can take one."""
    store.ensure_free_space(out, row_bytes, "storing one imported expert", metadata=False)
    with store.append(out) as f:
        rows = store.ExpertRows(f)
        yield RowWriter(rows, rows.epochs)


# --------------------------------------------------------------------------- synsets (for export)


def read_synset(path: Path, name: str | None = None, images: str = "final") -> SynsetData:
    """The final (or best) images of synset `name` (default: the only or latest) of a synset file."""
    from mctool.core.errors import UsageError

    with store.open_synsets(path) as sf:
        synset = sf.pick(name)
        syn = sf.read(synset)
    source = {"file": str(Path(path).resolve()), "synset": synset, "synset_created": syn.created, "images": images}
    if images == "best":
        if syn.best is None:
            raise UsageError(f"{store.shown(path)}: synset '{synset}' keeps no best images (distill with --eval-every "
                             "to select them)")
        source.update(iteration=syn.best.iteration, selected_on=syn.best.selected_on)
        return SynsetData(synset, syn.best.images, syn.best.labels, syn.best.lr, syn.ipc, syn.best.iteration, sf.data,
                          sf.spec, source, syn.experts_reference)
    return SynsetData(synset, syn.images, syn.labels, syn.lr, syn.ipc, syn.iterations, sf.data, sf.spec, source,
                      syn.experts_reference)


def keeps_best(path: Path, name: str | None = None) -> bool:
    """Whether synset `name` keeps best images."""
    with store.open_synsets(path) as sf:
        return sf.read(sf.pick(name), values=False).best is not None


# --------------------------------------------------------------------------- synsets (for import)


def check_synset_output(out: Path, name: str | None = None, sha256: dict[str, str] | None = None) -> bool:
    """Refuse, before any work, an output an imported synset may not go to: a symbolic link (never
    written through), a folder, a file that is not a synset file (a buffer, anything else), a file
    holding another synset named `name`. True when it holds this same import (same files by SHA-256)."""
    from mctool.core.errors import UsageError

    if out.is_symlink():
        raise UsageError(f"{out}: a symbolic link; mctool does not write through links (remove it or choose "
                         "another -o)")
    if out.exists():
        if not out.is_file():
            raise UsageError(f"{out}: exists and is not a file; choose another -o")
        try:
            with store.open_artifact(out) as f:
                keys = set(f.keys())
        except ArtifactError as exc:
            raise UsageError(f"{out}: already exists and is not an mctool synset file ({exc}); choose another -o") \
                from None
        if "synsets" not in keys or keys & {"experts", "convex"}:
            raise UsageError(f"{out}: already exists and holds {contents(out)}, not synthetic sets; choose another -o")
        if name is not None:
            with store.open_synsets(out) as sf:
                if name in sf.names:
                    if sf.read(name, values=False).source.get("sha256") == sha256:
                        return True
                    raise UsageError(f"{store.shown(out)}: already holds a synset named '{name}'; pass --name or "
                                     "choose another -o")
    store.check_writable(out)
    return False


def write_imported_synset(out: Path, name: str, images: torch.Tensor, labels: torch.Tensor, lr: float, ipc: int,
                          iterations: int, meta: DatasetMeta, spec: ModelSpec, config: dict[str, Any],
                          source: dict[str, Any], reference: dict[str, Any] | None) -> bool:
    """Write an imported synset as a new file, or add it to a synset file of the same data and
    model (atomically, either way). True when `out` already holds this same import (nothing written)."""
    from mctool.core.errors import UsageError
    from mctool.models import build_model, param_layout

    if check_synset_output(out, name, source.get("sha256")):
        return True
    layout = param_layout(build_model(spec))
    if out.exists():
        with store.open_synsets(out) as sf:
            if (sf.data.name, sf.data.zca, sf.data.train_fingerprint) != (meta.name, meta.zca, meta.train_fingerprint):
                raise UsageError(f"{store.shown(out)}: its synsets are of {sf.data.name} "
                                 f"({'ZCA' if sf.data.zca else 'normalised'}), not of these images' {meta.name} "
                                 f"({'ZCA' if meta.zca else 'normalised'}); choose another -o")
            if sf.spec != spec:
                raise UsageError(f"{store.shown(out)}: its synsets are evaluated on ConvNet d{sf.spec.depth} "
                                 f"w{sf.spec.width} {sf.spec.norm}, not d{spec.depth} w{spec.width} {spec.norm}; "
                                 "choose another -o")
    syn = store.Synset(name=name, images=images, labels=labels, lr=float(lr), ipc=ipc, method="imported",
                       iterations=iterations, complete=True, config=config, source=source,
                       experts_reference=reference, created=store.now_iso())
    size = images.numel() * 4 + labels.numel() * 8
    store.ensure_free_space(out, size, f"saving {name}")
    store.save_synset(out, syn, meta, spec, layout, store.provenance(config, None, source), size)
    return False
