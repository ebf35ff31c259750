"""The MCT authors' compressed experts (waypoint_buffer*_{n}.pt + step_buffer*_{n}.pt) as /convex rows.

File formats (method.md §5.5), one pair per original replay_buffer_{n}.pt:

* waypoint file: list over experts → list of J waypoints → list of L parameter tensors;
* step file, ``ip ≥ 3``: list over experts → list over the J−1 segments → list over the segment's
  points (both ends included) → list of L 0-d tensors s_l(k) ∈ [0, 1];
* step file, ``ip 2`` and the ablations (uni/dec/proj): list over experts → list over the K+1
  points → list of L 0-d tensors.

Conversion to mctool's /convex convention (docs/format.md): positions p_0 = 0, p_{j+1} = p_j +
(points in segment j) − 1; waypoints [J, P] flat in layout order; β [K+1, L] with the value
j + s_j(k) at p_j ≤ k ≤ p_{j+1}, where the later segment's value (exactly j + 0) is kept at a
shared waypoint, as mctool.convexify.trajectory.convexify does. ``ip ≥ 3`` waypoints are the authors'
smoothed points (§5.3), recorded as smoothing "authors-code"; ``ip 2`` and the ablations are
raw. The ablations' fractions are kept as the authors stored them (the decreasing one has
β(0) ≠ 0, the projected one is not clamped), so reconstructions reproduce their runs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mctool.core.errors import UsageError
from mctool.interop.buffers import (
    BufferLayoutError, Layout, NonFiniteError, Shape, as_list, check_snapshot, flat_snapshot, location,
    missing_numbers, require_folder,
)
from mctool.interop.torchfile import Leaf, TorchFile, TorchFileError, open_torch_file

PAIR_PATTERN = re.compile(r"^(waypoint|step)_buffer_(?:(ip\d+|uni|dec|proj)_)?(\d+)\.pt$")
ANY_WAYPOINT = re.compile(r"^waypoint_buffer_(?:(?:ip\d+|uni|dec|proj)_)?(\d+)\.pt$")

# File-name variant -> the β strategy it used.
VARIANT_STRATEGY = {"uni": "uniform", "dec": "decreasing", "proj": "projected"}


def variant_name(prefix: str | None) -> str:
    """'ip4', 'ip2' (no prefix), 'uni', 'dec' or 'proj'."""
    return prefix or "ip2"


def _file_names(variant: str, number: int) -> tuple[str, str]:
    infix = "" if variant == "ip2" else f"{variant}_"
    return f"waypoint_buffer_{infix}{number}.pt", f"step_buffer_{infix}{number}.pt"


def authors_positions(K: int, ip: int) -> list[int]:
    """Waypoint indices the authors' compression writes for num_interpolation = ip (method.md §5.3)."""
    if ip <= 2:
        return [0, K]
    step = (K + 1) // (ip - 1)
    idx = list(range(0, K + 1, step))
    if idx[-1] != K:
        idx.append(K)
    return idx


@dataclass(frozen=True)
class CompressedPair:
    """One waypoint/step file pair."""

    number: int
    waypoint: Path
    step: Path
    experts: int
    bytes: int


@dataclass(frozen=True)
class CompressedScan:
    """A checked folder of compressed pairs of one variant."""

    folder: Path
    variant: str
    pairs: tuple[CompressedPair, ...]
    gaps: tuple[int, ...]
    positions: tuple[int, ...]
    shapes: tuple[Shape, ...]
    names: tuple[str, ...] | None
    notes: tuple[str, ...] = ()

    @property
    def strategy(self) -> str:
        """The β strategy: 'mct' for the ip variants, the ablation's otherwise."""
        return VARIANT_STRATEGY.get(self.variant, "mct")

    @property
    def smooth(self) -> bool:
        """Whether the waypoints are the authors' smoothed ones (ip ≥ 3)."""
        return self.variant.startswith("ip") and int(self.variant[2:]) >= 3

    @property
    def epochs(self) -> int:
        """K."""
        return self.positions[-1]

    @property
    def num_experts(self) -> int:
        """Experts in all pairs together."""
        return sum(p.experts for p in self.pairs)

    @property
    def num_params(self) -> int:
        """P."""
        return sum(math.prod(s) for s in self.shapes)

    def listing(self) -> list[dict[str, Any]]:
        """Names, sizes and expert counts: a resumed import must find the same."""
        return [{"names": [p.waypoint.name, p.step.name], "number": p.number, "bytes": p.bytes, "experts": p.experts}
                for p in self.pairs]


def find_pairs(folder: Path, variant: str | None = None) -> tuple[str, list[tuple[int, Path, Path]], list[int]]:
    """The variant (given, or the only one present), its complete pairs by number, and missing numbers."""
    require_folder(folder, "waypoint_buffer*_{n}.pt", ANY_WAYPOINT)
    found: dict[str, dict[str, dict[int, Path]]] = {}
    for p in folder.iterdir():
        m = PAIR_PATTERN.match(p.name)
        if m and p.is_file():
            found.setdefault(variant_name(m.group(2)), {}).setdefault(m.group(1), {})[int(m.group(3))] = p
    if variant is None:
        if len(found) != 1:
            raise UsageError(f"{folder}: holds compressed experts of several kinds ({', '.join(sorted(found))}); "
                             "choose one with --variant")
        variant = next(iter(found))
    if variant not in found:
        raise UsageError(f"{folder}: no compressed experts of kind '{variant}' (has: {', '.join(sorted(found))})")
    kinds = found[variant]
    waypoints, steps = kinds.get("waypoint", {}), kinds.get("step", {})
    for n in sorted(set(waypoints) ^ set(steps)):
        have, missing = (_file_names(variant, n) if n in waypoints else _file_names(variant, n)[::-1])
        raise UsageError(f"{folder / have}: has no partner {missing} (the pair must be complete)")
    numbers = sorted(waypoints)
    if not numbers:
        raise UsageError(f"{folder}: no waypoint_buffer files of kind '{variant}'")
    gaps = missing_numbers(numbers, folder)
    return variant, [(n, waypoints[n], steps[n]) for n in numbers], gaps


def _scalar(leaf: Any, where: str) -> Leaf:
    if isinstance(leaf, (list, tuple)) or tuple(leaf.shape) != ():
        shape = "a list" if isinstance(leaf, (list, tuple)) else f"shape {list(leaf.shape)}"
        raise BufferLayoutError(f"{where}: a step value must be a 0-d tensor, found {shape}")
    if not leaf.dtype.is_floating_point:
        raise BufferLayoutError(f"{where}: a step value of dtype {leaf.dtype}")
    return leaf


def _segments(steps: Any, num_layers: int, path: Path, e: int) -> list[list[list[Leaf]]]:
    """An expert's step entries as segments → points → L scalars (ip 2 files: one segment)."""
    top = as_list(steps, "segments or points", location(path, e))
    if not top:
        raise BufferLayoutError(f"{location(path, e)}: no step values")
    first = as_list(top[0], "points or step values", f"{location(path, e)}, entry 0")
    segmented = bool(first) and isinstance(first[0], (list, tuple))
    raw_segments = top if segmented else [top]
    out = []
    for j, seg in enumerate(raw_segments):
        points = as_list(seg, "points", f"{location(path, e)}, segment {j}")
        if len(points) < 2:
            raise BufferLayoutError(f"{location(path, e)}, segment {j}: {len(points)} point(s), need at least 2")
        rows = []
        for k, point in enumerate(points):
            where = f"{location(path, e)}, segment {j}, point {k}"
            values = as_list(point, "step values", where)
            if len(values) != num_layers:
                raise BufferLayoutError(f"{where}: {len(values)} step values, expected one per layer ({num_layers})")
            rows.append([_scalar(v, f"{where}, tensor {i}") for i, v in enumerate(values)])
        out.append(rows)
    return out


def positions_of(segments: Sequence[Sequence[Any]]) -> list[int]:
    """Waypoint positions from the segments' point counts (both ends included)."""
    positions = [0]
    for seg in segments:
        positions.append(positions[-1] + len(seg) - 1)
    return positions


def scan_compressed(folder: Path, variant: str | None = None, layout: Layout | None = None) -> CompressedScan:
    """Find and check every pair of one variant from the pickles (shapes, counts, positions)."""
    variant, pairs, gaps = find_pairs(folder, variant)
    reference: list[Shape] | None = [tuple(s) for _, s in layout] if layout is not None else None
    names = [n for n, _ in layout] if layout is not None else None
    positions: list[int] | None = None
    checked: list[CompressedPair] = []
    for number, wpath, spath in pairs:
        with open_torch_file(wpath) as wtf, open_torch_file(spath) as stf:
            wexperts = as_list(wtf.root, "experts", str(wpath))
            sexperts = as_list(stf.root, "experts", str(spath))
            if len(wexperts) != len(sexperts):
                raise BufferLayoutError(f"{wpath}: {len(wexperts)} experts, but {spath.name} has {len(sexperts)}")
            for e, (wexp, sexp) in enumerate(zip(wexperts, sexperts)):
                wps = as_list(wexp, "waypoints", location(wpath, e))
                if reference is None:
                    first = as_list(wps[0], "parameter tensors", location(wpath, e, 0)) if wps else []
                    reference = [tuple(leaf.shape) for leaf in first if not isinstance(leaf, (list, tuple))]
                for k, w in enumerate(wps):
                    check_snapshot(w, reference, wpath, e, k, names)
                segs = _segments(sexp, len(reference), spath, e)
                mine = positions_of(segs)
                if len(wps) != len(mine):
                    raise BufferLayoutError(f"{location(wpath, e)}: {len(wps)} waypoints, but its step entries make "
                                            f"{len(mine) - 1} segment(s) (positions {mine})")
                if positions is not None and mine != positions:
                    raise BufferLayoutError(f"{location(spath, e)}: waypoint positions {mine}, the other experts have "
                                            f"{positions}")
                positions = mine
            checked.append(CompressedPair(number, wpath, spath, len(wexperts),
                                          wpath.stat().st_size + spath.stat().st_size))
    if positions is None or reference is None:
        raise BufferLayoutError(f"{folder}: the compressed files hold no experts")
    notes = []
    if variant.startswith("ip") and int(variant[2:]) >= 3:
        ip = int(variant[2:])
        if positions != authors_positions(positions[-1], ip):
            notes.append(f"positions {positions} are not those the authors' code writes for ip{ip} "
                         f"({authors_positions(positions[-1], ip)}); importing them as found")
        if len(positions) != ip:
            notes.append(f"ip{ip} files hold {len(positions)} waypoints: the authors' reader used only the first "
                         f"{ip - 1} segment(s) (positions up to {positions[ip - 1]}); mctool keeps all of them")
    if variant == "dec":
        K = positions[-1]
        notes.append(f"the decreasing ablation starts at β(0) = {(K + 1) / sum(range(1, K + 2)):.4g}, not 0: the first "
                     "waypoint is stored as the point the authors start from, lerp(θ_0, θ_K, β(0)) (docs/interop.md)")
    return CompressedScan(folder, variant, tuple(checked), tuple(gaps), tuple(positions), tuple(reference),
                          tuple(names) if names else None, tuple(notes))


def read_expert(wtf: TorchFile, stf: TorchFile, e: int, scan: CompressedScan) -> tuple[torch.Tensor, torch.Tensor]:
    """Waypoints [J, P] and β [K+1, L] (float32, mctool's convention) of expert `e` of a pair."""
    wps = as_list(wtf.root, "experts", str(wtf.path))[e]
    rows = [flat_snapshot(wtf, w, e, k, scan.names) for k, w in enumerate(wps)]
    segs = _segments(as_list(stf.root, "experts", str(stf.path))[e], len(scan.shapes), stf.path, e)
    fractions = segment_fractions(segs, stf, e)
    sizes = [math.prod(s) for s in scan.shapes]
    return to_convex(torch.stack(rows), fractions, sizes, location(stf.path, e))


def segment_fractions(segments: Sequence[Sequence[Sequence[Leaf]]], stf: TorchFile, e: int) -> list[torch.Tensor]:
    """The stored fractions s_j(k) of each segment, [points, L] float64, checked finite."""
    out = []
    for j, seg in enumerate(segments):
        rows = []
        for k, point in enumerate(seg):
            try:
                values = torch.stack([stf.read(v).to(torch.float64).reshape(()) for v in point])
            except TorchFileError as exc:
                detail = str(exc).split(": ", 1)[-1]
                raise TorchFileError(f"{location(stf.path, e)}, segment {j}, point {k}: {detail}") from None
            if not bool(torch.isfinite(values).all()):
                raise NonFiniteError(f"{location(stf.path, e)}, segment {j}, point {k}: a step value is NaN or "
                                     "infinite: not a trajectory mctool can use")
            rows.append(values)
        out.append(torch.stack(rows))
    return out


# How far a stored fraction may be from the 0 or 1 a segment starts or ends at (float32 rounding of
# the authors' cumulative sums; the store accepts positions this close, mctool.store.convex).
_END_TOL = 1e-4


def to_convex(waypoints: torch.Tensor, fractions: Sequence[torch.Tensor], layer_sizes: Sequence[int],
              where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' waypoints [J, P] and per-segment fractions as mctool's (waypoints, global β).

    The authors reconstruct θ_l(n) = lerp(W_j,l, W_j+1,l, lerp(s_j(k), s_j(k+1), frac)) on segment
    j; mctool stores one β row per epoch, j + s_j(k), exactly j at waypoint j (the later
    segment's value at a shared waypoint). Two things the authors' code writes do not fit as they
    are, and are rewritten so that θ̂(c) stays the authors' θ(c) at every c:

    * a layer that does not move in a segment (the first convolution's bias before instance
      norm, whose gradient is zero) gets s ≡ 0 there, so the segment "ends" at 0, not 1. Its
      two waypoints are equal for that layer, so every position gives the same θ: it gets the
      uniform ramp, as mctool's own convexify gives such a layer. (Were the waypoints different —
      only possible for smoothed waypoints of a layer that stopped moving part-way — the
      authors' θ would jump at the waypoint, which no continuous β reproduces: refused.)
    * a one-segment β that does not start at 0 or end at 1 (the "decreasing" ablation has
      β(0) = (K+1)/S, 0.4 for K = 3): the end waypoints are moved to the points the authors
      reach there, W'_0 = lerp(W_0, W_1, β(0)), W'_1 = lerp(W_0, W_1, β(K)) (float64, one
      rounding), and β' = (β − β(0)) / (β(K) − β(0)); then lerp(W'_0, W'_1, β') = lerp(W_0, W_1, β)
      exactly in real arithmetic.

    Anything else that would not be a position along the waypoints is refused with one line, so
    an import never writes a /convex that distill refuses.
    """
    J = waypoints.shape[0]
    if len(fractions) != J - 1:
        raise BufferLayoutError(f"{where}: {J} waypoints but {len(fractions)} segment(s) of step values")
    starts = [0]
    for f in fractions:
        starts.append(starts[-1] + f.shape[0] - 1)
    L = len(layer_sizes)
    bounds = [0]
    for size in layer_sizes:
        bounds.append(bounds[-1] + size)
    out = waypoints.clone()
    segs = [f.clone() for f in fractions]
    for j, s in enumerate(segs):
        n = s.shape[0] - 1
        for l in range(L):
            col = s[:, l]
            a, b = bounds[l], bounds[l + 1]
            if bool((col == 0).all()):  # the authors' S_l = 0: the layer did not move
                if not torch.equal(waypoints[j, a:b], waypoints[j + 1, a:b]):
                    raise BufferLayoutError(
                        f"{where}: layer {l} does not move in segment {j} but its waypoints {j} and {j + 1} differ "
                        "(smoothed): the authors' reconstruction jumps there, which mctool's β cannot follow")
                s[:, l] = torch.arange(n + 1, dtype=torch.float64) / n
                continue
            b0, b1 = float(col[0]), float(col[-1])
            if abs(b0) <= _END_TOL and abs(b1 - 1) <= _END_TOL:
                continue
            if J != 2:
                raise BufferLayoutError(f"{where}: segment {j}, layer {l}: step values run from {b0:.4g} to {b1:.4g}, "
                                        "not from 0 to 1 (the authors' code writes that only for one segment)")
            if b1 == b0:
                raise BufferLayoutError(f"{where}: layer {l}: every step value is {b0:.4g}: no direction to follow")
            rescaled = (col - b0) / (b1 - b0)
            lo, hi = float(rescaled.min()), float(rescaled.max())
            if lo < -_END_TOL or hi > 1 + _END_TOL:
                raise BufferLayoutError(f"{where}: layer {l}: step values from {float(col.min()):.4g} to "
                                        f"{float(col.max()):.4g} leave the segment between its end points "
                                        f"({b0:.4g}, {b1:.4g}); mctool keeps every position between its waypoints")
            w0, w1 = waypoints[0, a:b].to(torch.float64), waypoints[1, a:b].to(torch.float64)
            out[0, a:b] = torch.lerp(w0, w1, b0).to(waypoints.dtype)
            out[1, a:b] = torch.lerp(w0, w1, b1).to(waypoints.dtype)
            s[:, l] = rescaled.clamp(0.0, 1.0)
            s[0, l], s[-1, l] = 0.0, 1.0
    beta = torch.empty(starts[-1] + 1, L, dtype=torch.float64)
    for j, s in enumerate(segs):
        if j > 0 and float(s[0].abs().max()) > _END_TOL:
            raise BufferLayoutError(f"{where}: segment {j} does not start at 0 (step values {s[0].tolist()[:3]}...)")
        if bool((s < -_END_TOL).any()) or bool((s > 1 + _END_TOL).any()):
            bad = float(s[(s < -_END_TOL) | (s > 1 + _END_TOL)][0])
            raise BufferLayoutError(f"{where}: segment {j}: a step value {bad:.4g} outside [0, 1] (mctool keeps every "
                                    "position between its waypoints)")
        beta[starts[j]: starts[j + 1] + 1] = j + s  # float64 sum, one rounding to float32 below (as convexify)
    return out, beta.to(torch.float32)
