"""Helpers the test modules share: running the CLI in-process, the one-line error contract,
and a Reporter that records what the library reports."""

from __future__ import annotations

from typing import Any

from typer.testing import CliRunner

from mctool.core.progress import Reporter


def cli(*args: Any) -> Any:
    """Run the mctool CLI in-process; returns click's Result (exit_code, stdout, stderr)."""
    from mctool.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def assert_one_line_error(result: Any, code: int = 2, contains: str = "", after_progress: bool = False) -> None:
    """Exit `code` and one `mctool: error:` line holding `contains`, no traceback. Bad input is
    refused before any work, so stderr holds nothing else; a failure met while working
    (`after_progress`) may follow the progress lines, and must be the last line."""
    assert result.exit_code == code, (result.exit_code, result.output)
    err = result.stderr.strip().splitlines()
    errors = [line for line in err if line.startswith("mctool: error: ")]
    assert len(errors) == 1 and err[-1] == errors[0], result.stderr
    assert after_progress or len(err) == 1, result.stderr
    assert contains in errors[0]
    assert "Traceback" not in result.output


class Recorder(Reporter):
    """Keeps every log line and task the library reports (library calls in tests)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.tasks: list[str] = []

    def task(self, key: str, description: str, total: int | None) -> None:
        self.tasks.append(description)

    def log(self, message: str) -> None:
        self.lines.append(message)
