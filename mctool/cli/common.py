"""What every command shares: options, signals, running a body, exit codes, JSON output.

Exit codes (README, "For scripts"): 0 ok, 1 runtime failure, 2 usage error or bad input,
128 + N when stopped by signal N at a safe point — 130 Ctrl-C, 143 SIGTERM, 129 SIGHUP.

Signals are the CLI's alone: the first Ctrl-C, SIGTERM or SIGHUP only asks the command to stop,
and the library, which polls `Reporter.should_stop()` between units of work, saves what it has
and raises `Interrupted`; a second one stops at once (KeyboardInterrupt).
"""

from __future__ import annotations

import dataclasses
import errno
import inspect
import json
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer

from mctool.cli.render import RichReporter, error_line
from mctool.core.errors import DiskFull, Interrupted, MctoolError, is_disk_full
from mctool.core.progress import SIGNAL_NAMES
from mctool.core.settings import option_settings

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
_STOP_SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None)

QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bars or log lines on stderr.")
DebugOpt = typer.Option(False, "--debug", help="Show the full traceback on errors.")
JsonOpt = typer.Option(False, "--json", help="Print the result as one JSON document on stdout.")
DeviceOpt = typer.Option("auto", "--device", help="auto (CUDA when present), cpu, cuda or cuda:N.")
DataDirOpt = typer.Option(None, "--data-dir", help="Where datasets live (default: $MCTOOL_DATA or ~/.cache/mctool/data).")


class StopSignals:
    """The CLI's handlers for Ctrl-C, SIGTERM and SIGHUP while a command runs.

    Only Python's own defaults are replaced, from the main thread: a signal a caller ignores
    (a job started in the background) stays ignored, one a caller handles stays theirs."""

    def __init__(self, reporter: RichReporter) -> None:
        self.reporter = reporter
        self.previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.reporter.stop_signal:
            self.reporter.hard_stop = signum
            raise KeyboardInterrupt  # the second request: stop now
        self.reporter.stop_signal = signum
        self.reporter.log(f"{SIGNAL_NAMES.get(signum, f'signal {signum}')}: stopping at the next safe point "
                          "(send it again to stop at once)")

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in _STOP_SIGNALS:
            current = signal.getsignal(sig)
            ours = current is signal.default_int_handler if sig == signal.SIGINT else current is signal.SIG_DFL
            if ours:
                self.previous[sig] = signal.signal(sig, self._handler)
        return self

    def ignore(self) -> None:
        """Ignore further signals while the command reports its end."""
        for sig in self.previous:
            signal.signal(sig, signal.SIG_IGN)

    def __exit__(self, *exc: Any) -> None:
        # Restore, or in-process callers (and child processes, which inherit an ignored
        # signal) could never be interrupted again.
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _silence_dropped_interrupts(previous: Callable[[Any], None]) -> Callable[[Any], None]:
    """An unraisable hook that keeps quiet about a KeyboardInterrupt Python dropped (one raised
    while a `__del__` ran), and about a full disk met there (h5py closing a dataset whose flush
    failed): the command reports either in its one line."""

    def hook(unraisable: Any) -> None:
        if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
            return
        if unraisable.exc_value is not None and is_disk_full(unraisable.exc_value):
            _full_disk.set()
            return
        previous(unraisable)

    return hook


def _quiet_about_full_disk(previous: Callable[..., None]) -> Callable[..., None]:
    """An excepthook that keeps quiet about a full disk: h5py (through Cython) prints the
    traceback of an error met while closing a dataset with it, before the unraisable hook."""

    def hook(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
        if is_disk_full(exc):
            _full_disk.set()
            return
        previous(exc_type, exc, tb)

    return hook


# Set once a command met a full disk: the entry point then leaves without interpreter teardown,
# where HDF5 (2.0) flushes again a file whose close failed and crashes (SIGSEGV) after the line.
_full_disk = threading.Event()


def ended_on_full_disk() -> bool:
    """Whether a command of this process stopped on a full disk."""
    return _full_disk.is_set()


def run(body: Callable[[RichReporter], Any], quiet: bool, debug: bool, interrupt_hint: str = "") -> Any:
    """Run a command body; turn every expected failure into one line and an exit code."""
    reporter = RichReporter(quiet=quiet)
    code = EXIT_OK
    signals = StopSignals(reporter)
    _full_disk.clear()  # a verdict on this command only (tests run several in one process)
    original_hook, original_excepthook = sys.unraisablehook, sys.excepthook
    sys.unraisablehook = _silence_dropped_interrupts(original_hook)
    sys.excepthook = _quiet_about_full_disk(original_excepthook)
    try:
        with signals:
            try:
                return body(reporter)
            except Interrupted as exc:
                signals.ignore()
                reporter.close()
                if debug:
                    raise
                error_line(str(exc))
                code = exc.exit_code
            except MctoolError as exc:
                reporter.close()
                if debug:
                    raise
                if isinstance(exc, DiskFull):  # met after HDF5 may have failed a write: leave without teardown
                    _full_disk.set()
                error_line(str(exc))
                code = exc.exit_code
            except KeyboardInterrupt:
                signals.ignore()
                reporter.close()
                signum = reporter.hard_stop or reporter.stop_signal or int(signal.SIGINT)
                name = SIGNAL_NAMES.get(signum, f"signal {signum}")
                error_line(f"interrupted ({name}){'; ' + interrupt_hint if interrupt_hint else ''}")
                code = 128 + signum
            except OSError as exc:
                reporter.close()
                if debug:
                    raise
                if is_disk_full(exc):
                    _full_disk.set()
                    error_line(_disk_full_line(exc))
                    code = EXIT_FAILURE
                elif exc.errno in (errno.EACCES, errno.EPERM):  # a path the user named: exit 2, as the store's
                    error_line(f"permission denied{': ' + str(exc.filename) if exc.filename else ''}")
                    code = EXIT_USAGE
                else:
                    error_line(f"{exc.strerror or exc}{': ' + str(exc.filename) if exc.filename else ''}")
                    code = EXIT_FAILURE
            except Exception as exc:  # a bug: still one line, the traceback only with --debug
                reporter.close()
                if debug:
                    raise
                if is_disk_full(exc):  # HDF5 and torch.save report a full disk as a RuntimeError
                    _full_disk.set()
                    error_line(_disk_full_line(exc))
                else:
                    error_line(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the "
                               "traceback and please report it)")
                code = EXIT_FAILURE
    finally:
        reporter.close()
        sys.unraisablehook, sys.excepthook = original_hook, original_excepthook
    raise typer.Exit(code)


def _disk_full_line(exc: BaseException) -> str:
    """The one line for a write that met a full disk (HDF5's own text names only a temporary)."""
    name = getattr(exc, "filename", None) if isinstance(exc, OSError) and exc.errno == errno.ENOSPC else None
    return (f"disk full while writing{' ' + str(name) if name else ''}; free space and run the same command again "
            "(finished work is kept)")


def _finite(data: Any) -> Any:
    if isinstance(data, float) and (data != data or data in (float("inf"), float("-inf"))):
        return None  # strict JSON has no NaN/inf
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(v) for v in data]
    return data


def as_data(result: Any) -> Any:
    """A result dataclass (or anything JSON-like) as plain JSON data."""
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        return as_data(dataclasses.asdict(result))
    if isinstance(result, dict):
        return {str(k): as_data(v) for k, v in result.items()}
    if isinstance(result, (list, tuple)):
        return [as_data(v) for v in result]
    if isinstance(result, Path):
        return str(result)
    return result


def emit_json(data: Any) -> None:
    """One JSON document on stdout, nothing else (NaN/inf become null)."""
    sys.stdout.write(json.dumps(_finite(as_data(data)), indent=2, default=str, allow_nan=False) + "\n")


def with_settings(cls: type, optional: bool, exclude: tuple[str, ...] = ()) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add one option per command-line setting of config class `cls` to a command function's
    signature (its help and flags come from the field's metadata). The function receives them
    as keyword arguments; with `optional` every one defaults to None, "not given" (so a preset
    or a stored config can supply it), else to the setting's default."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(fn)
        fixed = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        added = []
        for s in option_settings(cls):
            if s.name in exclude:
                continue
            kind = s.value_type
            is_tuple = getattr(kind, "__origin__", None) is tuple
            annotation = Optional[str] if is_tuple else Optional[kind]
            default = None if optional else (",".join(s.default) if is_tuple else s.default)
            shown_default = not optional and s.default is not None
            text = s.info.help
            if optional and not s.info.preset and s.default is not None and kind is not bool \
                    and "default" not in text.lower():
                # No preset sets it: its built-in default is what a new run uses (a resume keeps its own).
                text = f"{text.rstrip('.')} (default {','.join(s.default) if is_tuple else s.default})."
            option = typer.Option(default, *s.flags, help=text, show_default=shown_default,
                                  metavar=s.info.metavar)
            added.append(inspect.Parameter(s.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=option,
                                           annotation=annotation))
        # The settings go after the command's own options, before the shared ones (--data-dir …).
        shared = {"data_dir", "device", "json_out", "quiet", "debug"}
        cut = next((i for i, p in enumerate(fixed) if p.name in shared), len(fixed))
        fn.__signature__ = sig.replace(parameters=fixed[:cut] + added + fixed[cut:])  # type: ignore[attr-defined]
        return fn

    return decorate


def settings_from(cls: type, values: dict[str, Any], drop_none: bool = True) -> dict[str, Any]:
    """The keyword arguments of `with_settings` options as config values (tuples split at commas)."""
    out = {}
    for s in option_settings(cls):
        if s.name not in values:
            continue
        v = values[s.name]
        if v is None and drop_none:
            continue
        if getattr(s.value_type, "__origin__", None) is tuple and isinstance(v, str):
            v = tuple(part.strip() for part in v.split(",") if part.strip())
        out[s.name] = v
    return out
