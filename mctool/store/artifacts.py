"""Open artifacts as checked objects: a buffer of experts, a file of synthetic sets.

One open per use: a distillation reads its buffer through one `Buffer` for its whole run.
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

from mctool.core.errors import ArtifactError
from mctool.models import Layout, ModelSpec, layer_sizes
from mctool.store import convex as _convex
from mctool.store import experts as _experts
from mctool.store import synsets as _synsets
from mctool.store.fields import Fields
from mctool.store.files import fingerprint, open_artifact, reading, require_group, shown
from mctool.store.meta import DatasetMeta, read_dataset, read_model


@dataclass
class Buffer:
    """An open, checked buffer: /dataset, /model, /experts and /convex as far as present."""

    path: Path
    file: h5py.File
    data: DatasetMeta
    spec: ModelSpec
    layout: Layout
    experts: _experts.ExpertsInfo | None
    convex_state: str  # "absent", "incomplete" or "complete"
    _convex: _convex.ConvexInfo | None = field(default=None, repr=False)

    @property
    def layer_sizes(self) -> list[int]:
        """Entries of each parameter tensor, in flat order."""
        return layer_sizes(self.layout)

    @property
    def num_params(self) -> int:
        """P."""
        return sum(self.layer_sizes)

    @property
    def convex(self) -> _convex.ConvexInfo:
        """/convex, checked (ArtifactError when absent or incomplete)."""
        if self._convex is None:
            with reading(self.path):
                self._convex = _convex.read_convex(self.path, self.file, self.layout,
                                                   self.experts.epochs if self.experts else None)
        return self._convex

    def require_experts(self) -> _experts.ExpertsInfo:
        """/experts (ArtifactError naming the command that writes it when absent)."""
        if self.experts is None:
            require_group(self.path, self.file, "experts")
        assert self.experts is not None
        return self.experts

    def done_experts(self) -> np.ndarray:
        """Indices of the finished experts (ArtifactError when there are none)."""
        idx = self.require_experts().done_indices
        if idx.size == 0:
            raise ArtifactError(f"{shown(self.path)}: no finished experts yet — run or resume `mctool experts`")
        return idx

    def convex_experts(self) -> np.ndarray:
        """Indices of the convexified experts (ArtifactError when none)."""
        idx = self.convex.done_indices
        if idx.size == 0:
            raise ArtifactError(f"{shown(self.path)}: /convex holds no experts — run `mctool convexify {shown(self.path)}`")
        return idx

    def trajectory(self, e: int) -> torch.Tensor:
        """Full trajectory [K+1, P] of expert e."""
        with reading(self.path):
            return _experts.read_trajectory(self.path, self.file, self.require_experts(), e)

    def snapshot(self, e: int, k: int) -> torch.Tensor:
        """Snapshot k [P] of expert e's full trajectory (only that row is read)."""
        info = self.require_experts()
        if not info.has_trajectories:
            raise _experts.require_trajectories_error(self.path)
        with reading(self.path):
            row = self.file["experts/trajectories"][int(e), int(k)]
        if not np.isfinite(row).all():
            raise ArtifactError(f"{shown(self.path)}: /experts/trajectories: expert {e} snapshot {k} holds NaN "
                                "or infinite values")
        return torch.from_numpy(row)

    def convex_expert(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Waypoints [I+2, P] and β [K+1, L] of convexified expert e."""
        info = self.convex
        with reading(self.path):
            return _convex.read_convex_expert(self.path, self.file, info, e)

    def accuracy(self) -> np.ndarray:
        """Stored test accuracy [done, K+1] of the finished experts."""
        info = self.require_experts()
        with reading(self.path):
            return _experts.experts_accuracy(self.path, self.file, info)

    def reference(self) -> _experts.ExpertsReference | None:
        """The experts' final test accuracy (None without finished experts)."""
        if self.experts is None or not self.experts.done.any():
            return None
        return _experts.final_accuracy(self.accuracy(), self.experts.epochs)

    def source(self) -> dict[str, Any]:
        """How a product names this buffer (path, artifact id, experts done)."""
        with reading(self.path):
            return fingerprint(self.path, self.file)


def _convex_state(path: Path, f: h5py.File) -> str:
    if "convex" not in f:
        return "absent"
    complete = Fields(path, require_group(path, f, "convex")).bool("complete", False)
    return "complete" if complete else "incomplete"


@contextlib.contextmanager
def open_buffer(path: str | os.PathLike[str]) -> Iterator[Buffer]:
    """Open and check a buffer: dataset, model, experts and a complete /convex (an incomplete
    one, left by an interrupted earlier release, counts as absent until replaced)."""
    p = Path(path)
    with open_artifact(p) as f:
        if "experts" not in f and "convex" not in f:
            require_group(p, f, "experts")  # says "a synset file" or which command to run
        with reading(p):
            data = read_dataset(p, f)
            spec, layout = read_model(p, f, data)
            info = _experts.read_experts(p, f, layout) if "experts" in f else None
            state = _convex_state(p, f)
            buf = Buffer(p, f, data, spec, layout, info, state)
            if state == "complete":  # checked now: a damaged /convex is refused by every command
                buf._convex = _convex.read_convex(p, f, layout, info.epochs if info else None)
        yield buf


@dataclass
class SynsetFile:
    """An open, checked file of synthetic sets."""

    path: Path
    file: h5py.File
    data: DatasetMeta
    spec: ModelSpec
    layout: Layout

    @property
    def names(self) -> list[str]:
        """Names of the synsets it holds."""
        with reading(self.path):
            return _synsets.synset_names(self.file, self.path)

    def pick(self, name: str | None) -> str:
        """`name`, or the only/latest synset when None (ArtifactError when absent)."""
        with reading(self.path):
            return _synsets.pick_name(self.path, self.file, name)

    def read(self, name: str, values: bool = True, checkpoint: bool = False) -> _synsets.Synset:
        """Synset `name`, checked against /dataset."""
        with reading(self.path):
            return _synsets.read_synset(self.path, self.file, name, self.data, values=values, checkpoint=checkpoint)


@contextlib.contextmanager
def open_synsets(path: str | os.PathLike[str]) -> Iterator[SynsetFile]:
    """Open and check a file of synthetic sets."""
    p = Path(path)
    with open_artifact(p) as f:
        with reading(p):
            data = read_dataset(p, f)
            spec, layout = read_model(p, f, data)
        yield SynsetFile(p, f, data, spec, layout)
