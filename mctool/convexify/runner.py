"""`mctool convexify`: turn the stored trajectories of a buffer into waypoints + β (Algorithm A)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mctool import store
from mctool.configs.convexify import ConvexifyConfig  # noqa: F401 (re-exported)
from mctool.core.errors import ArtifactError, UsageError
from mctool.core.progress import SILENT, Reporter, stop_if_asked
from mctool.core.text import count
from mctool.convexify.trajectory import convexify


@dataclass(frozen=True)
class ConvexifyResult:
    """What `mctool convexify` wrote."""

    file: str
    experts: int
    positions: list[int]
    strategy: str
    smooth: bool
    bytes_per_expert_full: int
    bytes_per_expert_convex: int
    ratio: float


_UNCHANGED = "nothing was changed; run the command again"


def _check_replaceable(out: Path) -> None:
    """`-o` may replace an earlier compact file of this command (derived data, marked by
    `trajectories_in`), never anything else: not even a streamed buffer of `experts --convexify`,
    which looks the same but holds the only copy of its experts."""
    if not out.exists():
        return
    try:
        with store.open_artifact(out) as f:
            ours = "experts" in f and "trajectories_in" in f["experts"].attrs and "synsets" not in f
            held = store.contents(f)
    except ArtifactError as exc:
        ours, held = False, f"no artifact this command wrote ({exc})"
    if not ours:
        raise UsageError(f"{store.shown(out)}: already exists and holds {held}; choose another -o (only an earlier "
                         "compact file of `mctool convexify -o` is replaced)")


def _fill(buf: store.Buffer, g: Any, experts: Any, positions: list[int], cfg: ConvexifyConfig,
          reporter: Reporter) -> None:
    reporter.task("convexify", "convexify", total=len(experts))
    for e in experts:
        stop_if_asked(reporter, _UNCHANGED)
        waypoints, beta = convexify(buf.trajectory(int(e)), buf.layer_sizes, positions, cfg.strategy, cfg.smooth)
        store.write_convex_row(g, int(e), waypoints, beta)
        reporter.update("convexify", advance=1)
    reporter.done("convexify")
    store.complete(g)


def convexify_file(buffer: Path, cfg: ConvexifyConfig, out: Path | None = None,
                   reporter: Reporter = SILENT) -> ConvexifyResult:
    """Add /convex to `buffer` or write a compact artifact `out` without trajectories.

    In place, the buffer is rewritten as a whole (a copy with the new /convex replaces it):
    a crash at any moment leaves the old buffer, never a mix."""
    cfg.validate()  # before any file is opened
    in_place = out is None or out.resolve() == buffer.resolve()
    target = buffer if in_place else out
    assert target is not None
    if not in_place:
        _check_replaceable(target)
    store.check_writable(target)
    with store.open_buffer(buffer) as buf:
        info = buf.require_experts()
        if not info.has_trajectories:
            raise UsageError(f"{store.shown(buffer)}: already convexified, with no full trajectories to convexify "
                             "again (made by `mctool experts --convexify` or `convexify -o`); other waypoints need "
                             "the full buffer of `mctool experts`")
        experts = buf.done_experts()
        positions = cfg.resolve_positions(info.epochs)
        sizes, layout = buf.layer_sizes, buf.layout
        prov = store.provenance({"interior": len(positions) - 2, "positions": positions, "strategy": cfg.strategy,
                                 "smooth": cfg.smooth}, None, buf.source())
        if len(positions) == info.epochs + 1:
            reporter.log(f"note: with K = {count(info.epochs, 'epoch')} and {len(positions) - 2} interior waypoints every "
                         "epoch is a waypoint, so the convexified experts are no smaller; use fewer "
                         "--interior waypoints or experts with more epochs")
        meta = store.ConvexMeta(tuple(positions), cfg.strategy, cfg.smooth)
        rows = info.rows
        convex_bytes = rows * (len(positions) * sum(sizes) + (info.epochs + 1) * len(sizes) + 1) * 4
        if in_place:
            if buf.convex_state != "absent":
                reporter.log(f"replacing the existing /convex of {store.shown(buffer)}")
            # The copy is written while `buf` stays open for reading: the old file is untouched
            # until the finished copy takes its place.
            with store.rewrite(buffer, convex_bytes) as f:
                store.drop_convex(f)
                _fill(buf, store.create_convex(f, rows, meta, layout, prov), experts, positions, cfg, reporter)
        else:
            store.ensure_free_space(target, convex_bytes, "the convexified experts")
            with store.create(target) as dst:
                store.copy_without_trajectories(buf.file, dst, str(buffer.resolve()))
                _fill(buf, store.create_convex(dst, rows, meta, layout, prov), experts, positions, cfg, reporter)
    full = (info.epochs + 1) * sum(sizes) * 4
    convex = len(positions) * sum(sizes) * 4 + (info.epochs + 1) * len(sizes) * 4
    return ConvexifyResult(file=str(target), experts=len(experts), positions=positions, strategy=cfg.strategy,
                           smooth=cfg.smooth, bytes_per_expert_full=full, bytes_per_expert_convex=convex,
                           ratio=full / convex)
