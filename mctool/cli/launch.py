"""The `mctool` entry point: the first line of a long command, written before torch is imported.

Importing torch takes a second or two on an idle machine and 20 s or more on a busy one; a
command run without a terminal (a log file, CI) would say nothing all that time. This module
imports nothing heavy (neither torch nor typer) and, when the imports take longer than a
second, says what started; then it runs the CLI.
"""

from __future__ import annotations

import os
import sys
import threading

# Commands that load data or train: the ones worth a line before the imports (`inspect` only
# with --png, which may evaluate networks).
LONG = {"experts", "import", "convexify", "distill", "evaluate", "export", "demo"}
DELAY = 1.0  # seconds: an import faster than this needs no line (usage errors stay one line)


def first_line(argv: list[str]) -> str | None:
    """'mctool experts: starting (importing torch)' for a long command, None when nothing
    should be printed (help, --quiet, a short command, a torchrun rank other than 0)."""
    if not argv or not (argv[0] in LONG or (argv[0] == "inspect" and "--png" in argv)):
        return None
    if any(a in ("-h", "--help", "-q", "--quiet", "--list-presets") for a in argv[1:]):
        return None
    if os.environ.get("RANK", "0") != "0":
        return None
    return f"mctool {argv[0]}: starting (importing torch)"


def announce(argv: list[str], delay: float = DELAY) -> threading.Timer | None:
    """Write the first line to stderr after `delay` seconds unless cancelled (the returned
    timer: cancel it once the imports are done)."""
    line = first_line(argv)
    if line is None:
        return None

    def write() -> None:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()

    timer = threading.Timer(delay, write)
    timer.daemon = True
    timer.start()
    return timer


def main() -> None:
    """Console-script entry point: the first line if the imports are slow, then the CLI."""
    timer = announce(sys.argv[1:])
    from mctool.cli.application import main as cli_main

    if timer is not None:
        timer.cancel()
    cli_main()
