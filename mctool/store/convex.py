"""/convex: waypoint positions, β strategy, and per-expert waypoints + β rows."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np
import torch

from mctool.core.errors import ArtifactError
from mctool.core.text import count
from mctool.models import Layout, layer_sizes
from mctool.store.fields import MAX_EPOCHS, MAX_EXPERTS, Fields
from mctool.store.files import require_group, shown
from mctool.convexify.trajectory import STRATEGIES

SMOOTHING = ("none", "authors-code")
# β is stored in float32: exactly i at waypoint i, and within [0, I+1] everywhere.
_BETA_TOL = 1e-4


@dataclass(frozen=True)
class ConvexMeta:
    """The /convex attributes."""

    positions: tuple[int, ...]
    strategy: str
    smooth: bool

    @property
    def epochs(self) -> int:
        """K: the last waypoint position."""
        return self.positions[-1]


@dataclass
class ConvexInfo:
    """/convex, checked: its attributes, row count and which rows hold an expert."""

    meta: ConvexMeta
    rows: int
    done: np.ndarray  # bool [rows]

    @property
    def done_indices(self) -> np.ndarray:
        """Indices of the convexified experts."""
        return np.flatnonzero(self.done)


def is_streaming(f: h5py.File) -> bool:
    """Whether the buffer was written by `experts --convexify` (its /convex rows grow with /experts)."""
    if "convex" not in f or not isinstance(f.get("experts"), h5py.Group) or "trajectories" in f["experts"]:
        return False
    try:
        return bool(json.loads(f["convex"].attrs.get("config", "{}")).get("streaming", False))
    except (TypeError, ValueError, AttributeError):
        return False


def write_convex_attrs(g: h5py.Group, meta: ConvexMeta, prov: dict[str, Any], complete: bool) -> None:
    """Attributes of /convex (positions, strategy, smoothing, provenance, completeness)."""
    g.attrs["positions"] = np.asarray(meta.positions, dtype=np.int64)
    g.attrs["strategy"] = meta.strategy
    g.attrs["smoothing"] = "authors-code" if meta.smooth else "none"
    g.attrs.update(prov)
    g.attrs["complete"] = complete


def read_convex_meta(path: str | os.PathLike[str], f: h5py.File) -> ConvexMeta:
    """The /convex attributes, checked (positions 0 = p_0 < … < p_{I+1} = K)."""
    r = Fields(path, require_group(path, f, "convex"))
    positions = r.ints("positions", 0, MAX_EPOCHS)
    if len(positions) < 2 or positions[0] != 0 or any(b <= a for a, b in zip(positions, positions[1:])):
        raise r.problem("positions", f"must rise strictly from 0, got {positions[:8]}")
    return ConvexMeta(tuple(positions), r.str("strategy", choices=STRATEGIES),
                      r.str("smoothing", choices=SMOOTHING) != "none")


def read_convex(path: str | os.PathLike[str], f: h5py.File, layout: Layout,
                experts_epochs: int | None = None) -> ConvexInfo:
    """Read and check /convex against the model's layout (and the experts' K when present)."""
    g = require_group(path, f, "convex")
    r = Fields(path, g)
    if not r.bool("complete", False):
        raise ArtifactError(f"{shown(path)}: /convex is incomplete (interrupted?) — run `mctool convexify "
                            f"{shown(path)}` again")
    meta = read_convex_meta(path, f)
    r.provenance()
    if experts_epochs is not None and meta.epochs != experts_epochs:
        raise r.problem("positions", f"end at {meta.epochs} but the experts have K = {count(experts_epochs, 'epoch')}")
    done_ds = r.dataset("done", "b", [None])
    rows = done_ds.shape[0]
    if rows > MAX_EXPERTS:
        raise r.problem("done", f"declares {rows} experts; refusing", attribute=False)
    r.dataset("waypoints", "f", [rows, len(meta.positions), sum(layer_sizes(layout))])
    r.dataset("beta", "f", [rows, meta.epochs + 1, len(layout)])
    done = r.array("done", "b", [rows]).astype(bool)
    if is_streaming(f):  # a streamed row is committed by its expert's flag, written after this one
        done &= Fields(path, f["experts"]).array("done", "b", [rows]).astype(bool)
    return ConvexInfo(meta, rows, done)


def read_convex_expert(path: str | os.PathLike[str], f: h5py.File, info: ConvexInfo,
                       e: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Waypoints [I+2, P] and β [K+1, L] of expert e, checked: finite, β exactly i at waypoint
    i and within [0, I+1]."""
    r = Fields(path, f["convex"])
    w_shape = f["convex/waypoints"].shape
    b_shape = f["convex/beta"].shape
    waypoints = r.array("waypoints", "f", [info.rows, *w_shape[1:]], finite=True, rows=int(e))
    beta = r.array("beta", "f", [info.rows, *b_shape[1:]], finite=True, rows=int(e))
    check_beta(r, beta[None], info.meta, [int(e)])
    return torch.from_numpy(waypoints.astype(np.float32, copy=False)), torch.from_numpy(beta.astype(np.float32, copy=False))


def check_beta(r: Fields, beta: np.ndarray, meta: ConvexMeta, rows: Any) -> None:
    """Refuse β rows [n, K+1, L] that are not positions along the waypoints: exactly i at
    waypoint i, within [0, I+1] (NaN fails both)."""
    if beta.size == 0:
        return
    last = len(meta.positions) - 1
    at_waypoints = beta[:, list(meta.positions)].astype(np.float64)
    expected = np.arange(last + 1, dtype=np.float64)[None, :, None]
    off = np.abs(at_waypoints - expected).max(axis=(1, 2))
    bad = ~((off <= _BETA_TOL) & (beta.min(axis=(1, 2)) >= -_BETA_TOL) & (beta.max(axis=(1, 2)) <= last + _BETA_TOL))
    if bad.any():
        e = int(np.asarray(rows)[int(np.flatnonzero(bad)[0])])
        raise r.problem("beta", f"row {e} is not a position along the waypoints (must be i at waypoint i, "
                                f"within [0, {last}])", attribute=False)


def drop_convex(f: h5py.File) -> None:
    """Remove /convex from a file being rewritten, before its replacement is written."""
    if "convex" in f:
        del f["convex"]


def create_convex(f: h5py.File, rows: int, meta: ConvexMeta, layout: Layout, prov: dict[str, Any]) -> h5py.Group:
    """A new /convex in a file being created or rewritten, marked incomplete until `complete`."""
    g = f.create_group("convex")
    write_convex_attrs(g, meta, prov, complete=False)
    p = sum(layer_sizes(layout))
    g.create_dataset("waypoints", shape=(rows, len(meta.positions), p), dtype=np.float32,
                     chunks=(1, 1, p))
    g.create_dataset("beta", shape=(rows, meta.epochs + 1, len(layout)), dtype=np.float32)
    g.create_dataset("done", shape=(rows,), dtype=np.bool_)
    return g


def write_convex_row(g: h5py.Group, e: int, waypoints: torch.Tensor, beta: torch.Tensor) -> None:
    """Store expert e's waypoints and β and mark the row done."""
    g["waypoints"][e] = waypoints.detach().to("cpu", torch.float32).numpy()
    g["beta"][e] = beta.detach().to("cpu", torch.float32).numpy()
    g["done"][e] = True


def complete(g: h5py.Group) -> None:
    """Mark /convex complete (after its last row)."""
    g.attrs["complete"] = True
