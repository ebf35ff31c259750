"""`mctool convexify`: Algorithm A on a buffer's trajectories."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mctool.cli import DebugOpt, JsonOpt, QuietOpt, app, emit_json, run
from mctool.render import stdout, table


@app.command(
    epilog="Examples:\n\n  mctool convexify buffer.h5                      (adds /convex in place)\n\n"
    "  mctool convexify buffer.h5 -o small.h5 --interior 2   (compact file to share)\n\n"
    "  mctool convexify buffer.h5 --positions 0,17,34,50 --beta uniform",
)
def convexify(
    buffer: Path = typer.Argument(Path("buffer.h5"), metavar="BUFFER", help="Buffer written by `mctool experts`."),
    interior: int = typer.Option(2, "--interior", min=0, help="Interior waypoints I, placed at round(i*K/(I+1))."),
    positions: Optional[str] = typer.Option(None, "--positions", help="Explicit waypoint positions, e.g. 0,17,34,50 (overrides --interior)."),
    beta: str = typer.Option("mct", "--beta", help="Step-size strategy: mct (Algorithm A), uniform, decreasing, projected."),
    smooth: bool = typer.Option(False, "--smooth", help="Smooth interior waypoints as the authors' released code does (off in the paper's algorithm)."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Write a compact artifact (no trajectories) instead of adding /convex in place."),
    json_out: bool = JsonOpt,
    quiet: bool = QuietOpt,
    debug: bool = DebugOpt,
) -> None:
    """Turn each expert trajectory into I+2 waypoints plus per-layer step sizes beta (Algorithm A)."""

    def body(reporter):
        from mctool.convex import ConvexifyConfig, convexify_file

        result = convexify_file(buffer, ConvexifyConfig(interior, positions, beta, smooth), out, reporter)
        if json_out:
            emit_json(result)
            return
        stdout.print(table(
            f"{result['file']}: /convex", ["experts", "positions", "beta", "smoothing", "bytes/expert full",
                                           "bytes/expert convex", "ratio"],
            [[result["experts"], ",".join(map(str, result["positions"])), result["strategy"],
              "authors' code" if result["smooth"] else "none", result["bytes_per_expert_full"],
              result["bytes_per_expert_convex"], f"{result['ratio']:.2f}x"]]))

    run(body, quiet, debug, interrupt_hint="the buffer's /convex is marked incomplete: run the command again")
