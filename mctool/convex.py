"""`mctool convexify`: turn the stored trajectories of a buffer into waypoints + β (Algorithm A)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from mctool import artifact
from mctool.errors import ArtifactError, UsageError
from mctool.progress import SILENT, Reporter
from mctool.trajectory import STRATEGIES, convexify, parse_positions, uniform_positions


@dataclass(frozen=True)
class ConvexifyConfig:
    """Options of `mctool convexify` (positions: explicit, else `interior` uniform points)."""

    interior: int = 2
    positions: str | None = None
    strategy: str = "mct"
    smooth: bool = False

    def resolve_positions(self, epochs: int) -> list[int]:
        """The waypoint positions p_0=0 < ... < p_{I+1}=K for K = `epochs`."""
        if self.strategy not in STRATEGIES:
            raise UsageError(f"unknown --beta '{self.strategy}'; choose from {', '.join(STRATEGIES)}")
        if self.positions:
            return parse_positions(self.positions, epochs)
        return uniform_positions(epochs, self.interior)


def _write_convex(g: h5py.Group, rows: int, waypoints_shape: tuple[int, int], beta_shape: tuple[int, int]) -> None:
    g.create_dataset("waypoints", shape=(rows, *waypoints_shape), dtype=np.float32,
                     chunks=(1, 1, waypoints_shape[1]))
    g.create_dataset("beta", shape=(rows, *beta_shape), dtype=np.float32)
    g.create_dataset("done", shape=(rows,), dtype=np.bool_)


def _fill(src_path: Path, src: h5py.File, g: h5py.Group, experts: np.ndarray, sizes: list[int],
          positions: list[int], cfg: ConvexifyConfig, reporter: Reporter) -> None:
    reporter.task("convexify", "convexify", total=len(experts))
    for e in experts:
        traj = artifact.read_trajectory(src_path, src, int(e))
        waypoints, beta = convexify(traj, sizes, positions, cfg.strategy, cfg.smooth)
        g["waypoints"][e] = waypoints.numpy()
        g["beta"][e] = beta.numpy()
        g["done"][e] = True
        reporter.update("convexify", advance=1)
    reporter.done("convexify")


def _check_replaceable(out: Path) -> None:
    """`-o` may replace an earlier compact file of this command (derived data, marked by
    `trajectories_in`), never anything else: not even a streamed buffer of `experts --convexify`,
    which looks the same but holds the only copy of its experts."""
    if not out.exists():
        return
    try:
        with artifact.open_artifact(out) as f:
            ours = "experts" in f and "trajectories_in" in f["experts"].attrs and "synsets" not in f
            held = artifact.contents(f)
    except ArtifactError as exc:
        ours, held = False, f"no artifact this command wrote ({exc})"
    if not ours:
        raise UsageError(f"{out}: already exists and holds {held}; choose another -o (only an earlier "
                         "compact file of `mctool convexify -o` is replaced)")


def convexify_file(buffer: Path, cfg: ConvexifyConfig, out: Path | None = None,
                   reporter: Reporter = SILENT) -> dict[str, Any]:
    """Add /convex to `buffer` (in place) or write a compact artifact `out` without trajectories."""
    if out is not None and out.resolve() != buffer.resolve():
        _check_replaceable(out)
    with artifact.open_artifact(buffer, "r") as f:
        experts_g = artifact.require_group(buffer, f, "experts")
        if "trajectories" not in experts_g:
            raise UsageError(f"{buffer}: already convexified, with no full trajectories to convexify again "
                             "(made by `mctool experts --convexify` or `convexify -o`); other waypoints need "
                             "the full buffer of `mctool experts`")
        experts = artifact.done_experts(buffer, f)
        _, layout = artifact.read_model(buffer, f)
        epochs = int(experts_g["trajectories"].shape[1]) - 1
        positions = cfg.resolve_positions(epochs)
        rows = int(experts_g["done"].shape[0])
        prov = artifact.provenance(
            {"interior": len(positions) - 2, "positions": positions, "strategy": cfg.strategy, "smooth": cfg.smooth},
            None, artifact.fingerprint(buffer, f))
    if len(positions) == epochs + 1:
        reporter.log(f"note: with K = {epochs} epochs and {len(positions) - 2} interior waypoints every "
                     "epoch is a waypoint, so the convexified experts are no smaller; use fewer "
                     "--interior waypoints or experts with more epochs")
    sizes = artifact.layer_sizes(layout)
    meta = artifact.ConvexMeta(tuple(positions), cfg.strategy, cfg.smooth)
    needed = rows * (len(positions) * sum(sizes) + (epochs + 1) * len(sizes) + 1) * 4
    artifact.ensure_free_space(out or buffer, needed, "the convexified experts")
    shapes = ((len(positions), sum(sizes)), (epochs + 1, len(sizes)))
    if out is None or out.resolve() == buffer.resolve():
        target = buffer
        with artifact.open_artifact(buffer, "r+") as f:
            if "convex" in f:
                reporter.log(f"replacing the existing /convex of {buffer}")
                del f["convex"]
            g = f.create_group("convex")
            write_convex_attrs_incomplete(g, meta, prov)
            _write_convex(g, rows, *shapes)
            _fill(buffer, f, g, experts, sizes, positions, cfg, reporter)
            g.attrs["complete"] = True  # readers ignore a /convex interrupted before this line
    else:
        target = out
        with artifact.open_artifact(buffer, "r") as src, artifact.atomic_write(out, copy_existing=False) as dst:
            for name in ("dataset", "model"):
                src.copy(src[name], dst, name=name)
            eg = dst.create_group("experts")
            eg.attrs.update(dict(src["experts"].attrs))
            for name in ("done", "seeds", "test_accuracy", "train_loss"):
                if name in src["experts"]:
                    src.copy(src["experts"][name], eg, name=name)
            eg.attrs["trajectories_in"] = str(buffer.resolve())
            g = dst.create_group("convex")
            write_convex_attrs_incomplete(g, meta, prov)
            _write_convex(g, rows, *shapes)
            _fill(buffer, src, g, experts, sizes, positions, cfg, reporter)
            g.attrs["complete"] = True
    full = (epochs + 1) * sum(sizes) * 4
    convex = len(positions) * sum(sizes) * 4 + (epochs + 1) * len(sizes) * 4
    return {"file": str(target), "experts": len(experts), "positions": positions, "strategy": cfg.strategy,
            "smooth": cfg.smooth, "bytes_per_expert_full": full, "bytes_per_expert_convex": convex,
            "ratio": full / convex}


def write_convex_attrs_incomplete(g: h5py.Group, meta: artifact.ConvexMeta, prov: dict[str, Any]) -> None:
    """/convex attributes, marked incomplete until every row is written."""
    artifact.write_convex_attrs(g, meta, prov)
    g.attrs["complete"] = False
