"""Convexified expert trajectories (MCT): waypoints, per-layer step fractions β, reconstruction.

An expert trajectory is a tensor [K+1, P] of flat parameter vectors θ_0..θ_K. The flat vector
is cut into L consecutive "layers" (parameter tensors) of sizes ``layer_sizes``. Waypoint
positions 0 = p_0 < p_1 < ... < p_{I+1} = K (I interior points) cut it into I+1 segments.

For segment i (a = p_i, b = p_{i+1}, n = b - a steps) each strategy yields fractions
s_l(k) in [0, 1] for k = a..b with s(a) = 0 and s(b) = 1:

* ``mct`` (Algorithm A): cumulative per-layer path length,
  s_l(k) = Σ_{a<=j<k} ||θ_{j+1,l} - θ_{j,l}|| / Σ_{a<=j<b} ||θ_{j+1,l} - θ_{j,l}||.
* ``uniform`` (ablation eq. C, per segment): s(k) = (k - a)/n.
* ``decreasing`` (ablation eq. A, per segment): increments proportional to n, n-1, ..., 1.
* ``projected`` (ablation eq. B, per segment): one scalar for all layers,
  s(k) = <θ_k - θ_a, θ_b - θ_a> / ||θ_b - θ_a||², over the whole flat vector.

β is stored as a GLOBAL position [K+1, L]: β[k, l] = i + s_l(k) for p_i <= k <= p_{i+1}
(exactly i at p_i; the two segments meeting at p_i agree there). The convexified point at
a real position c in [0, K] is, with segment i such that p_i <= c <= p_{i+1}, k = floor(c)
and frac = c - k:  b_l = lerp(β[k, l], β[k+1, l], frac) - i,  θ̂_l = lerp(W_{i,l}, W_{i+1,l}, b_l).
So θ̂ is linear in c between integers, continuous, and equals waypoint i exactly at c = p_i.

``smooth=True`` reproduces the authors' waypoint smoothing (method.md §5.3): β is computed
from the RAW snapshots; then, in index order and in place, each interior waypoint θ_{p_i}
becomes (θ_{p_i-1} + θ_{p_i+1})/2 (θ_{p_i-1} already smoothed if it is itself an interior
waypoint), and finally θ_K becomes (θ_{K-1} + θ_K)/2 (again using a smoothed θ_{K-1}).
θ_0 never changes.

Documented deviations from the paper / the authors' code:

* ``decreasing``: the printed formula and the code give β(0) = (n+1)/Σ ≠ 0 (off by one), so
  position p_i would not be the waypoint. We use s(k) = Σ_{j<k}(n - j) / Σ_{j<n}(n - j),
  which has s(0) = 0, s(n) = 1 and strictly decreasing increments.
* ``projected``: the printed formula can leave [0, 1] (overshoot, or going backwards); we
  clamp to [0, 1] and force s(a) = 0, s(b) = 1. It is still not necessarily monotone.
* A degenerate segment (``mct``: a layer with zero total path length; ``projected``:
  θ_b == θ_a) uses s(k) = (k - a)/n instead of dividing by zero (the authors' code divides
  by 1 there, leaving β at 0 until the jump at the segment's end).
* The ablation strategies are generalised from one segment (the authors only run them with
  no interior waypoints) to every segment.
* The authors' code never smooths when there are no interior waypoints; here ``smooth=True``
  always applies the rule above (with I = 0 only θ_K changes). Use ``smooth=False`` to
  reproduce their I = 0 runs.

Norms and dot products are computed in float64; waypoints and β are returned as float32.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

import torch

from mctool.configs.choices import STRATEGIES  # defined without torch for the CLI
from mctool.core.errors import UsageError

# Tolerance for a reconstruction position just outside [0, K] (float round-off of callers).
_POSITION_TOL = 1e-9


# ---------------------------------------------------------------------------------------------
# Waypoint positions


def uniform_positions(K: int, interior: int) -> list[int]:
    """Evenly spaced waypoint positions p_i = round(i·K/(I+1)), i = 0..I+1 (halves round up)."""
    if K < 1:
        raise UsageError(f"a trajectory needs at least 1 epoch, got K={K}")
    if interior < 0:
        raise UsageError(f"the number of interior waypoints must be >= 0, got {interior}")
    if interior + 1 > K:
        raise UsageError(
            f"{interior} interior waypoints need at least {interior + 1} epochs, got K={K}"
        )
    m = interior + 1
    # floor(i*K/m + 1/2) in exact integer arithmetic: Python's round() is banker's rounding
    # (K=50, I=2 would give 16.67 -> 17 either way, but 2.5 -> 2 would surprise users).
    return [(2 * i * K + m) // (2 * m) for i in range(m + 1)]


def parse_positions(text: str, K: int) -> list[int]:
    """Parse "0,17,34,50" into waypoint positions (strictly increasing, from 0 to K)."""
    items = [t.strip() for t in text.split(",")]
    try:
        positions = [int(t) for t in items]
    except ValueError:
        example = ",".join(map(str, uniform_positions(K, min(2, K - 1)))) if K >= 1 else "0,1"
        raise UsageError(
            f"waypoint positions must be comma-separated integers like '{example}', got {text!r}"
        ) from None
    check_positions(positions, K)
    return positions


def check_positions(positions: list[int], K: int) -> None:
    """Raise UsageError unless positions are ints 0 = p_0 < ... < p_last = K with K >= 1.

    The message names every problem at once (start, order, range, end), so one fix is enough.
    """
    if K < 1:
        raise UsageError(f"a trajectory needs at least 1 epoch, got K={K}")
    if any(isinstance(p, bool) or not isinstance(p, int) for p in positions):
        raise UsageError(f"waypoint positions must be integers, got {positions}")
    shown = ",".join(map(str, positions))
    if len(positions) < 2:
        raise UsageError(f"need at least 2 waypoint positions (0 and K={K}), got '{shown}'")
    problems = []
    if positions[0] != 0:
        problems.append(f"it starts at {positions[0]}, not 0")
    problems += [f"{a} is followed by {b}" for a, b in zip(positions, positions[1:]) if b <= a]
    outside = [p for p in positions if p < 0 or p > K]
    if outside:
        problems.append(f"{', '.join(map(str, outside))} {'is' if len(outside) == 1 else 'are'} outside 0..K={K}")
    if positions[-1] != K:
        problems.append(f"it ends at {positions[-1]}, not K={K}")
    if problems:
        raise UsageError(
            f"waypoint positions must increase strictly from 0 to K={K}; in '{shown}': "
            + "; ".join(problems)
        )


def _check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise UsageError(
            f"unknown β strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}"
        )


def _check_layer_sizes(layer_sizes: list[int], P: int) -> None:
    if not layer_sizes or any(s <= 0 for s in layer_sizes):
        raise ValueError(f"layer sizes must be positive, got {layer_sizes}")
    if sum(layer_sizes) != P:
        raise ValueError(f"layer sizes sum to {sum(layer_sizes)}, but vectors have P={P}")


# ---------------------------------------------------------------------------------------------
# Per-segment fractions s (shared by the batch and streaming paths so both agree bit for bit)


def _layer_norms(prev: torch.Tensor, cur: torch.Tensor, layer_sizes: list[int]) -> torch.Tensor:
    """Per-layer L2 norms of cur - prev, computed in float64, as [L]."""
    diff = cur.to(torch.float64) - prev.to(torch.float64)
    # A loop over L (≈ 14 tensors) rather than over P: cheap and exact per layer.
    return torch.stack([torch.linalg.vector_norm(t) for t in diff.split(layer_sizes)])


def _ramp(n: int, L: int, device: torch.device | None) -> torch.Tensor:
    """Uniform fractions k/n for k = 0..n, [n+1, L] float64."""
    s = torch.arange(n + 1, dtype=torch.float64, device=device) / n
    return s.unsqueeze(1).expand(n + 1, L).clone()


def _mct_fractions(steps: torch.Tensor) -> torch.Tensor:
    """Fractions from per-step per-layer lengths [n, L] (float64) -> [n+1, L]."""
    n, L = steps.shape
    cum = torch.cat([steps.new_zeros(1, L), steps.cumsum(0)])
    total = cum[-1]  # the last cumulative sum itself, so s(n) = total/total = 1 exactly
    safe = torch.where(total > 0, total, torch.ones_like(total))
    # A layer that does not move in this segment gets the uniform ramp, not 0/0.
    return torch.where(total > 0, cum / safe, _ramp(n, L, steps.device))


def _fixed_fractions(n: int, L: int, strategy: str, device: torch.device | None) -> torch.Tensor:
    """Data-independent fractions (uniform, decreasing) for an n-step segment, [n+1, L]."""
    if strategy == "uniform":
        return _ramp(n, L, device)
    # decreasing: increments n, n-1, ..., 1; integer cumulative sums are exact in float64.
    inc = torch.arange(n, 0, -1, dtype=torch.float64, device=device)
    cum = torch.cat([inc.new_zeros(1), inc.cumsum(0)])
    return (cum / cum[-1]).unsqueeze(1).expand(n + 1, L).clone()


def _projected_fractions(segment: torch.Tensor, L: int) -> torch.Tensor:
    """One clamped projection fraction per snapshot of segment [n+1, P], broadcast to [n+1, L]."""
    n = segment.shape[0] - 1
    a = segment[0].to(torch.float64)
    v = segment[-1].to(torch.float64) - a
    vv = torch.dot(v, v)
    # Row by row so memory stays O(P) in float64 rather than O(n·P).
    dots = torch.stack([torch.dot(segment[k].to(torch.float64) - a, v) for k in range(n + 1)])
    s = (dots / torch.where(vv > 0, vv, torch.ones_like(vv))).clamp(0.0, 1.0)
    s[0], s[-1] = 0.0, 1.0  # true by the formula up to round-off; make it exact
    s = torch.where(vv > 0, s, torch.arange(n + 1, dtype=torch.float64, device=s.device) / n)
    return s.unsqueeze(1).expand(n + 1, L).clone()


def segment_beta(segment: torch.Tensor, layer_sizes: list[int], strategy: str) -> torch.Tensor:
    """Fractions s [n+1, L] (float64, s[0]=0, s[n]=1) for the snapshots θ_a..θ_b of one segment."""
    _check_strategy(strategy)
    if segment.dim() != 2 or segment.shape[0] < 2:
        raise ValueError(f"a segment must be [n+1, P] with n >= 1, got {tuple(segment.shape)}")
    _check_layer_sizes(layer_sizes, segment.shape[1])
    n, L = segment.shape[0] - 1, len(layer_sizes)
    if strategy == "mct":
        steps = torch.stack(
            [_layer_norms(segment[j], segment[j + 1], layer_sizes) for j in range(n)]
        )
        return _mct_fractions(steps)
    if strategy == "projected":
        return _projected_fractions(segment, L)
    return _fixed_fractions(n, L, strategy, segment.device)


# ---------------------------------------------------------------------------------------------
# Whole trajectory


def convexify(
    trajectory: torch.Tensor,
    layer_sizes: list[int],
    positions: list[int],
    strategy: str = "mct",
    smooth: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Waypoints [I+2, P] and global β [K+1, L] (both float32) of a trajectory [K+1, P]."""
    _check_strategy(strategy)
    if trajectory.dim() != 2:
        raise ValueError(f"a trajectory must be [K+1, P], got {tuple(trajectory.shape)}")
    K = trajectory.shape[0] - 1
    check_positions(positions, K)
    _check_layer_sizes(layer_sizes, trajectory.shape[1])
    trajectory = trajectory.detach()

    beta = torch.empty(K + 1, len(layer_sizes), dtype=torch.float64, device=trajectory.device)
    for i, (a, b) in enumerate(zip(positions, positions[1:])):
        # Always from the raw snapshots, also when smoothing (as the authors do).
        beta[a : b + 1] = i + segment_beta(trajectory[a : b + 1], layer_sizes, strategy)

    if smooth:
        smoothed: dict[int, torch.Tensor] = {}  # index -> smoothed float64 snapshot

        def current(j: int) -> torch.Tensor:
            # The value at index j after the in-place updates done so far.
            return smoothed.get(j, trajectory[j].to(torch.float64))

        for w in positions[1:-1]:  # index order; w+1 is never yet modified
            smoothed[w] = (current(w - 1) + trajectory[w + 1].to(torch.float64)) / 2
        smoothed[K] = (current(K - 1) + trajectory[K].to(torch.float64)) / 2
        rows = [trajectory[0]] + [smoothed[p] for p in positions[1:]]
        waypoints = torch.stack([r.to(torch.float32) for r in rows])
    else:
        waypoints = trajectory[positions].to(torch.float32)
    return waypoints.contiguous(), beta.to(torch.float32)


class StreamingConvexifier:
    """Feed snapshots θ_0, θ_1, ... one at a time (e.g. while an expert trains); memory O((I+2)·P).

    Never holds the whole trajectory: it keeps the waypoints, the previous snapshot and, when
    smoothing, one pending neighbour. The ``projected`` strategy needs whole segments (its dot
    products involve the segment's end point), so it additionally buffers the current segment:
    O(segment·P). ``result()`` equals ``convexify`` on the full trajectory.
    """

    def __init__(
        self,
        layer_sizes: list[int],
        positions: list[int],
        strategy: str = "mct",
        smooth: bool = False,
    ) -> None:
        _check_strategy(strategy)
        check_positions(list(positions), positions[-1] if positions else 0)
        _check_layer_sizes(list(layer_sizes), sum(layer_sizes))
        self.layer_sizes = list(layer_sizes)
        self.positions = list(positions)
        self.strategy = strategy
        self.smooth = smooth
        self.K = self.positions[-1]
        self._P = sum(self.layer_sizes)
        self._waypoint_of = {p: i for i, p in enumerate(self.positions)}
        self._count = 0  # snapshots pushed so far (index of the next one)
        self._segment = 0  # index i of the segment [p_i, p_{i+1}] being filled
        self._waypoints: list[torch.Tensor | None] = [None] * len(self.positions)
        self._beta: torch.Tensor | None = None
        self._prev: torch.Tensor | None = None  # raw θ_{k-1}
        self._steps: list[torch.Tensor] = []  # mct: per-layer step lengths in this segment
        self._buffer: list[torch.Tensor] = []  # projected: raw snapshots of this segment
        self._pending_left: torch.Tensor | None = None  # smoothing: value at p_i - 1 (float64)

    def push(self, snapshot: torch.Tensor) -> None:
        """Add the next snapshot θ_k (flat [P]); it is copied, so the caller may reuse it."""
        k = self._count
        if k > self.K:
            raise ValueError(f"all K+1={self.K + 1} snapshots were already pushed")
        if snapshot.dim() != 1 or snapshot.shape[0] != self._P:
            raise ValueError(f"a snapshot must be flat [{self._P}], got {tuple(snapshot.shape)}")
        x = snapshot.detach().clone()
        L = len(self.layer_sizes)
        if self._beta is None:
            self._beta = torch.empty(self.K + 1, L, dtype=torch.float64, device=x.device)

        # β from the raw snapshots.
        if k > 0 and self.strategy == "mct":
            self._steps.append(_layer_norms(self._prev, x, self.layer_sizes))
        if self.strategy == "projected":
            self._buffer.append(x)
        if k > 0 and k == self.positions[self._segment + 1]:
            i = self._segment
            a = self.positions[i]
            n = k - a
            if self.strategy == "mct":
                s = _mct_fractions(torch.stack(self._steps))
            elif self.strategy == "projected":
                s = _projected_fractions(torch.stack(self._buffer), L)
            else:
                s = _fixed_fractions(n, L, self.strategy, x.device)
            self._beta[a : k + 1] = i + s
            self._steps = []
            self._buffer = [x] if self.strategy == "projected" else []
            self._segment += 1

        # Waypoints.
        if not self.smooth:
            if k in self._waypoint_of:
                self._waypoints[self._waypoint_of[k]] = x.to(torch.float32, copy=True)
        else:
            self._smooth_step(k, x)

        self._prev = x
        self._count += 1

    def _smooth_step(self, k: int, x: torch.Tensor) -> None:
        # Reproduces convexify's in-place, index-order smoothing as snapshots arrive.
        last = len(self.positions) - 1
        if k == 0:
            self._waypoints[0] = x.to(torch.float32, copy=True)
            return
        # Value at index k-1 after smoothing: an interior waypoint at k-1 is finished now
        # that its right neighbour θ_k has arrived; anything else keeps its raw value.
        j = self._waypoint_of.get(k - 1)
        if j is not None and 0 < j < last:
            done = (self._pending_left + x.to(torch.float64)) / 2
            self._waypoints[j] = done.to(torch.float32)
            self._pending_left = None
            value_before = done
        else:
            value_before = self._prev.to(torch.float64)
        w = self._waypoint_of.get(k)
        if w is not None and 0 < w < last:
            self._pending_left = value_before  # its left neighbour, as seen in index order
        if k == self.K:
            self._waypoints[last] = ((value_before + x.to(torch.float64)) / 2).to(torch.float32)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Waypoints [I+2, P] and β [K+1, L] (float32), once all K+1 snapshots were pushed."""
        if self._count != self.K + 1:
            raise ValueError(f"pushed {self._count} of {self.K + 1} snapshots")
        waypoints = torch.stack(self._waypoints)  # type: ignore[arg-type]
        return waypoints, self._beta.to(torch.float32)  # type: ignore[union-attr]


# ---------------------------------------------------------------------------------------------
# Reconstruction


@dataclass(eq=False)  # tensors have no boolean ==
class ConvexTrajectory:
    """One expert's convexified trajectory: waypoints + global per-layer β."""

    waypoints: torch.Tensor  # [I+2, P]
    beta: torch.Tensor  # [K+1, L]
    positions: list[int]
    layer_sizes: list[int]
    _layer_index: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.positions = [int(p) for p in self.positions]
        self.layer_sizes = [int(s) for s in self.layer_sizes]
        check_positions(self.positions, self.positions[-1] if self.positions else 0)
        if self.waypoints.dim() != 2 or self.waypoints.shape[0] != len(self.positions):
            raise ValueError(
                f"waypoints must be [{len(self.positions)}, P], got {tuple(self.waypoints.shape)}"
            )
        _check_layer_sizes(self.layer_sizes, self.waypoints.shape[1])
        if tuple(self.beta.shape) != (self.K + 1, len(self.layer_sizes)):
            raise ValueError(
                f"beta must be [{self.K + 1}, {len(self.layer_sizes)}], "
                f"got {tuple(self.beta.shape)}"
            )
        device = self.waypoints.device
        self.beta = self.beta.to(device)
        # Flat entry -> layer, so a per-layer scalar expands to [P] with one gather.
        self._layer_index = torch.repeat_interleave(
            torch.arange(len(self.layer_sizes), device=device),
            torch.tensor(self.layer_sizes, device=device),
        )

    @property
    def K(self) -> int:
        """Number of epochs (the last position)."""
        return self.positions[-1]

    @property
    def num_waypoints(self) -> int:
        """Number of waypoints including both ends (I+2)."""
        return len(self.positions)

    def at(self, c: float | torch.Tensor) -> torch.Tensor:
        """The convexified parameters θ̂(c), flat [P], at a real position c in [0, K]."""
        if isinstance(c, torch.Tensor):
            if c.numel() != 1:
                raise ValueError(f"position must be a scalar, got shape {tuple(c.shape)}")
            c = c.item()
        c = float(c)
        K = self.K
        if not (-_POSITION_TOL <= c <= K + _POSITION_TOL):  # also rejects NaN
            raise ValueError(f"position {c} is outside [0, {K}]")
        c = min(max(c, 0.0), float(K))
        # Segment: the last p_i <= c, but the final position belongs to the last segment.
        i = min(bisect.bisect_right(self.positions, c) - 1, len(self.positions) - 2)
        k = min(math.floor(c), K - 1)
        frac = c - k  # 1.0 at c = K
        # torch.lerp is exact at weight 0 and 1, so c = p_i gives waypoint i bit for bit.
        b = torch.lerp(
            self.beta[k].to(torch.float64), self.beta[k + 1].to(torch.float64), frac
        ) - i
        weight = b.to(self.waypoints.dtype)[self._layer_index]
        return torch.lerp(self.waypoints[i], self.waypoints[i + 1], weight)

    def to(self, device: torch.device | str) -> "ConvexTrajectory":
        """A copy with waypoints and β on `device`."""
        return ConvexTrajectory(
            self.waypoints.to(device), self.beta.to(device), self.positions, self.layer_sizes
        )
