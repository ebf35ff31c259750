"""Terminal rendering: Rich progress on stderr, one-line errors, tables for results."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from mctool.core.progress import Reporter
from mctool.core.text import clean_text

# Not a terminal (a pipe, a file, CI): never crop lines to 80 columns.
stdout = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 250)
stderr = Console(stderr=True, soft_wrap=True)


def error_line(message: str) -> None:
    """One line on stderr, never wrapped or styled (scripts grep it); control characters from a
    file or an option never reach the terminal."""
    sys.stderr.write(f"mctool: error: {clean_text(message)}\n")
    sys.stderr.flush()


def cell(value: Any) -> str:
    """A value as tables show it (floats to 4 significant digits, '-' for none, no control characters)."""
    if value is None:  # e.g. the loss of a run of 0 iterations: not the word "None"
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return clean_text(str(value))




HEARTBEAT_MIN = 10.0  # seconds: the most often a progress line without figures is printed


class RichReporter(Reporter):
    """Progress bars on stderr when it is a terminal; one-line logs unless quiet.

    Without a terminal (a pipe, a log file, CI) the bars become progress lines: the first
    figures of a task at once, then one per epoch or every `line_every` seconds — the step
    count alone when a long epoch has no figures yet.
    """

    def __init__(self, quiet: bool = False, line_every: float = 30.0) -> None:
        self.quiet = quiet
        self.bars = (not quiet) and stderr.is_terminal
        self.progress: Progress | None = None
        self.tasks: dict[str, Any] = {}
        self.line_every = line_every
        self.lines: dict[str, _LineTask] = {}
        self.stop_signal = 0  # set by the CLI's signal handler (cli/common.py): stop at the next safe point
        self.hard_stop = 0  # a second signal: the command was stopped at once

    def should_stop(self) -> int:
        return self.stop_signal

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
        if self.hard_stop:  # a second signal whose KeyboardInterrupt Python dropped: raise it here
            raise KeyboardInterrupt
        line = self.lines.get(key)
        if line is not None:
            line.completed += advance
            # Without a terminal: the first figures at once, then at every epoch's end or every
            # `line_every` seconds, whichever comes first. Figure-less updates (steps inside a
            # long epoch) still give a line with the count every `line_every` seconds, but never
            # more often than every HEARTBEAT_MIN seconds: a long epoch is never silent for long.
            if fields:
                line.fields = fields
                due = line.due(self.line_every) or "epoch" in fields or not line.shown
            else:
                due = line.due(max(self.line_every, HEARTBEAT_MIN))
            if not self.bars and not self.quiet and due:
                line.shown = True
                total = f"/{line.total}" if line.total else ""
                shown = ", ".join(f"{_label(k)} {cell(v)}" for k, v in line.fields.items())
                # A heartbeat repeats the last figures, marked as such: they are not the current step's.
                info = "" if not shown else f", {shown}" if fields else f" (last figures: {shown})"
                self.log(f"{line.description}: {line.completed}{total}{info}")
        if self.bars and key in self.tasks:
            if fields:
                info = "  ".join(f"{_label(k)} {cell(v)}" for k, v in fields.items())
                self._progress().update(self.tasks[key], advance=advance, info=info)
            else:  # keep the figures shown until new ones arrive
                self._progress().update(self.tasks[key], advance=advance)

    def done(self, key: str) -> None:
        self.lines.pop(key, None)
        if self.bars and key in self.tasks and self.progress is not None:
            self.progress.remove_task(self.tasks.pop(key))

    def log(self, message: str) -> None:
        message = clean_text(message)
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
    shown: bool = False  # a line was printed for this task
    fields: dict[str, Any] = field(default_factory=dict)  # the latest figures, repeated on figure-less lines

    def due(self, every: float) -> bool:
        """True (and restart the clock) when `every` seconds passed since the last line."""
        now = time.monotonic()
        if now - self.last < every:
            return False
        self.last = now
        return True


def table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
    """A simple Rich table."""
    t = Table(title=Text(clean_text(title)), title_justify="left")
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*[Text(cell(v)) for v in r])  # Text: brackets in names are not markup
    return t


def pct(value: float | None, digits: int = 2) -> str:
    """An accuracy in [0, 1] as a percentage ('?' when unknown)."""
    return "?" if value is None or value != value else f"{100 * value:.{digits}f}"


def mean_std(mean: float | None, std: float | None, runs: int) -> str:
    """'77.40 ± 0.03' over several runs; one run has no spread: '77.40 (n = 1)'."""
    if runs <= 1:
        return f"{pct(mean)} (n = 1)"
    return f"{pct(mean)} ± {pct(std)}"
