"""The `mctool` entry point: the first line of a long command, written before torch is imported.

Importing torch takes a second or two on an idle machine and 20 s or more on a busy one; a
command run without a terminal (a log file, CI) would say nothing all that time. This module
imports nothing heavy (neither torch nor typer), says what started, then runs the CLI.
"""

from __future__ import annotations

import os
import sys

# Commands that load data or train: the ones worth a line before the imports.
LONG = {"experts", "import", "convexify", "distill", "evaluate", "export", "demo", "inspect"}


def first_line(argv: list[str]) -> str | None:
    """'mctool experts: starting (importing torch)' for a long command, None when nothing
    should be printed (help, --quiet, a short command, a torchrun rank other than 0)."""
    if not argv or argv[0] not in LONG:
        return None
    if any(a in ("-h", "--help", "-q", "--quiet", "--list-presets") for a in argv[1:]):
        return None
    if os.environ.get("RANK", "0") != "0":
        return None
    return f"mctool {argv[0]}: starting (importing torch)"


def announce(argv: list[str]) -> None:
    """Write the first line to stderr, if any."""
    line = first_line(argv)
    if line is not None:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


def main() -> None:
    """Console-script entry point: the first line at once, then the CLI (mctool.cli.main)."""
    announce(sys.argv[1:])
    from mctool.cli import main as cli_main

    cli_main()
