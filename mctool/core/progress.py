"""How the library reports progress and learns that it should stop, without printing or
touching signals: a small protocol the CLI implements (rendering, and its signal handlers)."""

from __future__ import annotations

import signal
from typing import Any

from mctool.core.errors import Interrupted

SIGNAL_NAMES = {int(signal.SIGINT): "Ctrl-C", int(signal.SIGTERM): "SIGTERM", int(getattr(signal, "SIGHUP", 1)): "SIGHUP"}


class Reporter:
    """Receives progress events; this base class ignores them (library use, tests, non-zero ranks)."""

    def task(self, key: str, description: str, total: int | None) -> None:
        """A long loop starts; `total` steps (None when unknown)."""

    def update(self, key: str, advance: int = 0, **fields: Any) -> None:
        """The loop advanced; `fields` are figures worth showing (loss, accuracy, ...)."""

    def done(self, key: str) -> None:
        """The loop finished."""

    def log(self, message: str) -> None:
        """A one-line message for the user (stderr in the CLI)."""

    def should_stop(self) -> int:
        """0, or the number of the signal (Ctrl-C, SIGTERM, SIGHUP) that asked the run to stop at
        its next safe point. Long loops poll it between units of work."""
        return 0


def stop_if_asked(reporter: Reporter, saved: str) -> None:
    """Raise Interrupted when the run was asked to stop; `saved` says what was kept and how to go on."""
    signum = reporter.should_stop()
    if signum:
        raise Interrupted(f"interrupted ({SIGNAL_NAMES.get(signum, f'signal {signum}')}); {saved}", signum)


class Muted(Reporter):
    """Shows nothing but still passes on stop requests (for torchrun ranks other than 0)."""

    def __init__(self, inner: Reporter) -> None:
        self.inner = inner

    def should_stop(self) -> int:
        return self.inner.should_stop()


SILENT = Reporter()


class Pace:
    """Seconds per step and time left of a loop, measured over its last `window` steps (the
    speed of a busy machine changes; the first step, which pays for warm-up, soon drops out)."""

    def __init__(self, window: int = 20, clock: Any = None) -> None:
        import collections
        import time

        self.clock = clock or time.perf_counter
        self.times: collections.deque[float] = collections.deque(maxlen=window + 1)

    def step(self) -> None:
        """One step ended now."""
        self.times.append(self.clock())

    def start(self) -> None:
        """The loop (re)starts now: earlier steps no longer count (a resume, a pause)."""
        self.times.clear()
        self.times.append(self.clock())

    def per_step(self) -> float | None:
        """Seconds per step over the window (None before two time points)."""
        if len(self.times) < 2:
            return None
        return (self.times[-1] - self.times[0]) / (len(self.times) - 1)

    def text(self, remaining: int) -> str | None:
        """'0.52 s/it, 3.1 min left' for `remaining` more steps (None before the first step)."""
        each = self.per_step()
        if each is None:
            return None
        return f"{each:.3g} s/it, {duration(each * max(0, remaining))} left"


def duration(seconds: float) -> str:
    """A duration for progress lines: '42 s', '3.1 min', '2.4 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
