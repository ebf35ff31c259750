"""The settings of `mctool convexify`; no torch."""

from __future__ import annotations

from dataclasses import dataclass

from mctool.configs.choices import STRATEGIES
from mctool.core.errors import UsageError
from mctool.core.settings import setting


@dataclass(frozen=True)
class ConvexifyConfig:
    """Options of `mctool convexify` (positions: explicit, else `interior` uniform points)."""

    interior: int = setting(2, "Interior waypoints I, placed at round(i*K/(I+1)).")
    positions: str | None = setting(None, "Explicit waypoint positions, e.g. 0,17,34,50 (overrides --interior).")
    strategy: str = setting("mct", "Step-size strategy: mct (Algorithm A), uniform, decreasing, projected.",
                            flags=("--beta",))
    smooth: bool = setting(False, "Smooth interior waypoints as the authors' released code does (off in the "
                           "paper's algorithm).")

    def resolve_positions(self, epochs: int) -> list[int]:
        """The waypoint positions p_0=0 < ... < p_{I+1}=K for K = `epochs`."""
        from mctool.convexify.trajectory import parse_positions, uniform_positions

        if self.strategy not in STRATEGIES:
            raise UsageError(f"unknown --beta '{self.strategy}'; choose from {', '.join(STRATEGIES)}")
        if self.positions:
            return parse_positions(self.positions, epochs)
        if self.interior < 0:
            raise UsageError(f"--interior must be >= 0, got {self.interior}")
        return uniform_positions(epochs, self.interior)
