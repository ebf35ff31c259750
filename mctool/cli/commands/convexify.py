"""`mctool convexify`: Algorithm A on a buffer's trajectories."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from mctool.cli.common import DebugOpt, JsonOpt, QuietOpt, emit_json, run, settings_from, with_settings
from mctool.cli.render import stdout, table
from mctool.configs.convexify import ConvexifyConfig

EPILOG = ("Examples:\n\n  mctool convexify buffer.h5                      (adds /convex: the buffer is rewritten)\n\n"
          "  mctool convexify buffer.h5 -o small.h5 --interior 2   (compact file to share)\n\n"
          "  mctool convexify buffer.h5 --positions 0,17,34,50 --beta uniform")


@with_settings(ConvexifyConfig, optional=False)
def convexify(
    buffer: Path = typer.Argument(Path("buffer.h5"), metavar="BUFFER", help="Buffer written by `mctool experts` (or `mctool import`)."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Write a compact artifact (no trajectories) instead of adding /convex to the buffer."),
    json_out: bool = JsonOpt,
    quiet: bool = QuietOpt,
    debug: bool = DebugOpt,
    **settings: Any,
) -> None:
    """Turn each expert trajectory into I+2 waypoints plus per-layer step sizes beta (Algorithm A)."""

    def body(reporter):
        from mctool.convexify.runner import convexify_file

        result = convexify_file(buffer, ConvexifyConfig(**settings_from(ConvexifyConfig, settings)), out, reporter)
        if json_out:
            emit_json(result)
            return
        stdout.print(table(
            f"{result.file}: /convex", ["experts", "positions", "beta", "smoothing", "bytes/expert full",
                                        "bytes/expert convex", "ratio"],
            [[result.experts, ",".join(map(str, result.positions)), result.strategy,
              "authors' code" if result.smooth else "none", result.bytes_per_expert_full,
              result.bytes_per_expert_convex, f"{result.ratio:.2f}x"]]))

    run(body, quiet, debug, interrupt_hint="nothing was changed; run the command again")
