"""The settings of `mctool convexify`; no torch."""

from __future__ import annotations

from dataclasses import dataclass

from mctool.configs.choices import STRATEGIES
from mctool.core.errors import UsageError
from mctool.core.settings import at_least, first_problem, one_of, setting

# --beta of `convexify` and of `experts --convexify`.
BETA = one_of(*STRATEGIES, message="unknown --beta '{value}'; choose from " + ", ".join(STRATEGIES))


@dataclass(frozen=True)
class ConvexifyConfig:
    """Options of `mctool convexify` (positions: explicit, else `interior` uniform points)."""

    interior: int = setting(2, "Interior waypoints I, placed at round(i*K/(I+1)).", check=at_least(0))
    positions: str | None = setting(None, "Explicit waypoint positions, e.g. 0,17,34,50 (overrides --interior).")
    strategy: str = setting("mct", "Step-size strategy: mct (Algorithm A), uniform, decreasing, projected.",
                            flags=("--beta",), check=BETA)
    smooth: bool = setting(False, "Smooth interior waypoints as the authors' released code does (off in the "
                           "paper's algorithm).")

    def validate(self) -> None:
        """Refuse settings that cannot run (one line, exit 2); each setting's check is declared with
        it. The positions are checked against the buffer's epochs (`resolve_positions`)."""
        found = first_problem(self)
        if found is not None:
            raise UsageError(found.message("{option} must be {words}, got {value}"))

    def resolve_positions(self, epochs: int) -> list[int]:
        """The waypoint positions p_0=0 < ... < p_{I+1}=K for K = `epochs`."""
        from mctool.convexify.trajectory import parse_positions, uniform_positions

        self.validate()
        if self.positions:
            return parse_positions(self.positions, epochs)
        return uniform_positions(epochs, self.interior)
