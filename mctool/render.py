"""Terminal rendering: Rich progress on stderr, one-line errors, tables for results."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from mctool.progress import Reporter

# Not a terminal (a pipe, a file, CI): never crop lines to 80 columns.
stdout = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 250)
stderr = Console(stderr=True, soft_wrap=True)


def error_line(message: str) -> None:
    """One line on stderr, never wrapped or styled (scripts grep it)."""
    sys.stderr.write(f"mctool: error: {message}\n")
    sys.stderr.flush()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class RichReporter(Reporter):
    """Progress bars on stderr when it is a terminal; one-line logs unless quiet.

    Without a terminal (a pipe, a log file, CI) the bars become a progress line per task at
    most every `line_every` seconds, so a long run is never silent for long.
    """

    def __init__(self, quiet: bool = False, line_every: float = 30.0) -> None:
        self.quiet = quiet
        self.bars = (not quiet) and stderr.is_terminal
        self.progress: Progress | None = None
        self.tasks: dict[str, Any] = {}
        self.line_every = line_every
        self.lines: dict[str, _LineTask] = {}
        self.interrupted = False  # set by the CLI's SIGINT handler (see cli.run)

    def _progress(self) -> Progress:
        if self.progress is None:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                console=stderr, transient=True,
            )
            self.progress.start()
        return self.progress

    def task(self, key: str, description: str, total: int | None) -> None:
        self.lines[key] = _LineTask(description, total, time.monotonic())
        if self.bars:
            p = self._progress()
            if key in self.tasks:
                p.remove_task(self.tasks[key])
            self.tasks[key] = p.add_task(description, total=total, info="")

    def update(self, key: str, advance: int = 0, **fields: Any) -> None:
        if self.interrupted:  # a Ctrl-C whose KeyboardInterrupt Python dropped: raise it here
            raise KeyboardInterrupt
        line = self.lines.get(key)
        if line is not None:
            line.completed += advance
            if fields and not self.bars and not self.quiet and line.due(self.line_every):
                total = f"/{line.total}" if line.total else ""
                info = ", ".join(f"{_label(k)} {_fmt(v)}" for k, v in fields.items())
                self.log(f"{line.description}: {line.completed}{total}, {info}")
        if self.bars and key in self.tasks:
            if fields:
                info = "  ".join(f"{_label(k)} {_fmt(v)}" for k, v in fields.items())
                self._progress().update(self.tasks[key], advance=advance, info=info)
            else:  # keep the figures shown until new ones arrive
                self._progress().update(self.tasks[key], advance=advance)

    def done(self, key: str) -> None:
        self.lines.pop(key, None)
        if self.bars and key in self.tasks and self.progress is not None:
            self.progress.remove_task(self.tasks.pop(key))

    def log(self, message: str) -> None:
        if not self.quiet:
            if self.progress is not None:
                self.progress.console.print(message, markup=False, highlight=False)
            else:
                stderr.print(message, markup=False, highlight=False)

    def close(self) -> None:
        """Stop the live display."""
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _label(field: str) -> str:
    """How a progress field is shown: rates passed as `img_s=` read `img/s`."""
    return field[:-2] + "/s" if field.endswith("_s") else field


@dataclass
class _LineTask:
    """A task's progress for the plain-text lines (no terminal)."""

    description: str
    total: int | None
    last: float  # time.monotonic() of the start or of the last line
    completed: int = 0

    def due(self, every: float) -> bool:
        """True (and restart the clock) when `every` seconds passed since the last line."""
        now = time.monotonic()
        if now - self.last < every:
            return False
        self.last = now
        return True


def table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
    """A simple Rich table."""
    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*[_fmt(v) for v in r])
    return t
