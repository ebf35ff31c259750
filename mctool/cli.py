"""The `mctool` command line: parse options, resolve presets, call the library, render.

No maths here. Results go to stdout (`--json` for scripts), progress and logs to stderr.
Exit codes: 0 ok, 1 runtime failure, 2 usage error or bad input, 130 interrupted.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer

from mctool import __version__
from mctool.errors import MctoolError
from mctool.render import RichReporter, error_line, stdout


def _hide_flag_types() -> None:
    """Typer 0.29's help shows `<bool>` after on/off flags as if they took a value (and
    `--json true` then fails); show nothing there. Left alone if Typer's internals change."""
    option = getattr(getattr(typer, "core", None), "TyperOption", None)
    shown = getattr(option, "display_type_rich", None)
    if shown is None:
        return

    def display_type_rich(self: Any, ctx: Any) -> Any:
        return None if getattr(self, "is_flag", False) and not getattr(self, "count", False) else shown(self, ctx)

    option.display_type_rich = display_type_rich


_hide_flag_types()

app = typer.Typer(
    help="mctool: distill an image dataset into a few synthetic images per class with MCT "
    "(Matching Convexified Trajectory).\n\nPipeline: experts -> convexify -> distill -> evaluate; "
    "`inspect` shows any artifact.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bars or log lines on stderr.")
DebugOpt = typer.Option(False, "--debug", help="Show the full traceback on errors.")
JsonOpt = typer.Option(False, "--json", help="Print the result as one JSON document on stdout.")
DeviceOpt = typer.Option("auto", "--device", help="auto (CUDA when present), cpu, cuda or cuda:N.")
DataDirOpt = typer.Option(None, "--data-dir", help="Where datasets live (default: $MCTOOL_DATA or ~/.cache/mctool/data).")


def _take_sigint(handler: Any) -> Any:
    """Install `handler` for SIGINT and return the previous one, or None to leave SIGINT alone.

    Only Python's own default is replaced, from the main thread: an ignored SIGINT (a job
    started in the background by a script) stays ignored, and a handler installed by a caller
    or a C library stays in charge.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return None
    return signal.signal(signal.SIGINT, handler)


def _remembering_interrupts(reporter: RichReporter) -> Callable[[int, Any], None]:
    """A SIGINT handler that raises KeyboardInterrupt as usual and also tells the reporter.

    Python drops an exception raised while a ``__del__`` or a callback runs ("Exception
    ignored in …"), and a signal handler may run just then: the Ctrl-C would be lost and the
    command go on. The reporter raises it again at the loop's next progress update.
    """

    def handler(signum: int, frame: Any) -> None:
        reporter.interrupted = True
        raise KeyboardInterrupt

    return handler


def _silence_dropped_interrupts(previous: Callable[[Any], None]) -> Callable[[Any], None]:
    """An unraisable hook that keeps quiet about a dropped KeyboardInterrupt (see above): the
    command reports the interrupt in its one line; anything else goes to `previous`."""

    def hook(unraisable: Any) -> None:
        if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
            return
        previous(unraisable)

    return hook


def run(body: Callable[[RichReporter], Any], quiet: bool, debug: bool, interrupt_hint: str = "") -> Any:
    """Run a command body; turn every expected failure into one line and an exit code."""
    import signal

    reporter = RichReporter(quiet=quiet)
    code = EXIT_OK
    original_handler = _take_sigint(_remembering_interrupts(reporter))
    original_hook = sys.unraisablehook
    sys.unraisablehook = _silence_dropped_interrupts(original_hook)
    try:
        return body(reporter)
    except MctoolError as exc:
        reporter.close()
        if debug:
            raise
        error_line(str(exc))
        code = exc.exit_code
    except KeyboardInterrupt:
        if original_handler is not None:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not break the exit
        reporter.close()
        error_line(f"interrupted{'; ' + interrupt_hint if interrupt_hint else ''}")
        code = EXIT_INTERRUPTED
    except OSError as exc:
        reporter.close()
        if debug:
            raise
        if exc.errno == errno.ENOSPC:
            error_line(f"disk full while writing{' ' + exc.filename if exc.filename else ''}; "
                       "free space and run the same command again (finished work is kept)")
        else:
            error_line(f"{exc.strerror or exc}{': ' + str(exc.filename) if exc.filename else ''}")
        code = EXIT_FAILURE
    except Exception as exc:  # a bug: still one line, the traceback only with --debug
        reporter.close()
        if debug:
            raise
        error_line(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback "
                   "and please report it)")
        code = EXIT_FAILURE
    finally:
        reporter.close()
        sys.unraisablehook = original_hook
        if original_handler is not None:
            # Restore, or in-process callers (and child processes, which inherit an ignored
            # SIGINT) could never be interrupted again.
            signal.signal(signal.SIGINT, original_handler)
    raise typer.Exit(code)


def _finite(data: Any) -> Any:
    if isinstance(data, float) and data != data or data in (float("inf"), float("-inf")):
        return None  # strict JSON has no NaN/inf
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(v) for v in data]
    return data


def emit_json(data: Any) -> None:
    """One JSON document on stdout, nothing else (NaN/inf become null)."""
    sys.stdout.write(json.dumps(_finite(data), indent=2, default=str, allow_nan=False) + "\n")


def _version(value: bool) -> None:
    if value:
        stdout.print(f"mctool {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """mctool: dataset distillation with MCT."""


def main() -> None:
    """Console-script entry point: usage errors (unknown option, bad value) become one line too."""
    import mctool.commands  # noqa: F401  (registers the subcommands)
    from mctool.allocator import tune_malloc
    from typer.exceptions import TyperException

    tune_malloc()  # before the command allocates its tensors (see mctool/allocator.py)

    if len(sys.argv) <= 1:
        app()  # no arguments: show the help
        return
    try:
        code = app(standalone_mode=False)
    except TyperException as exc:
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        error_line(f"{message} (see `mctool --help`)")
        sys.exit(getattr(exc, "exit_code", EXIT_USAGE))
    except KeyboardInterrupt:  # outside a command body (e.g. while importing)
        error_line("interrupted")
        code = EXIT_INTERRUPTED
    if code == EXIT_INTERRUPTED:
        # Every file is closed by now; leave without interpreter teardown, where a late
        # interrupt would turn the documented exit code 130 into death by SIGINT.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)
    sys.exit(code if isinstance(code, int) else EXIT_OK)
