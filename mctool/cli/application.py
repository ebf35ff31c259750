"""The `mctool` command line: builds the Typer app and registers every command.

Only mctool.cli imports typer and rich; command modules (mctool/cli/commands) define plain
functions and never import this module.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import typer

from mctool import __version__
from mctool.cli.commands import convexify, demo, distill, evaluate, experts, export, import_, inspect
from mctool.cli.common import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, ended_on_full_disk
from mctool.cli.render import error_line, stdout


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

for module in (experts, import_, convexify, distill, evaluate, export, inspect, demo):
    name = module.__name__.rsplit(".", 1)[1]
    app.command(name.rstrip("_"), epilog=module.EPILOG)(getattr(module, name))


def _version(value: bool) -> None:
    if value:
        stdout.print(f"mctool {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """mctool: dataset distillation with MCT."""


def _help_command(exc: Exception) -> str:
    """The help that answers a usage error: the subcommand's (`mctool distill --help`) when the
    error is in a subcommand's options, else `mctool --help`."""
    names = []
    ctx = getattr(exc, "ctx", None)
    while ctx is not None and ctx.parent is not None:  # the root is `mctool` however it was started
        names.append(ctx.info_name)
        ctx = ctx.parent
    return " ".join(["mctool", *reversed(names), "--help"])


def main() -> None:
    """Console-script entry point: usage errors (unknown option, bad value) become one line too."""
    from typer.exceptions import TyperException

    from mctool.core.allocator import tune_malloc

    tune_malloc()  # before the command allocates its tensors (see mctool/core/allocator.py)

    if len(sys.argv) <= 1:
        app()  # no arguments: show the help
        return
    try:
        code = app(standalone_mode=False)
    except TyperException as exc:
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        error_line(f"{message} (see `{_help_command(exc)}`)")
        sys.exit(getattr(exc, "exit_code", EXIT_USAGE))
    except KeyboardInterrupt:  # outside a command body (e.g. while importing)
        error_line("interrupted")
        code = 130
    if isinstance(code, int) and (code >= 128 or (code == EXIT_FAILURE and ended_on_full_disk())):
        # Every file is closed by now; leave without interpreter teardown, where a late signal
        # would turn the documented exit code into death by that signal, and where HDF5 crashes
        # flushing again a temporary it could not close on a full disk (the temporary is gone).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code if isinstance(code, int) else EXIT_OK)
