"""How the library reports progress without printing: a small protocol the CLI renders."""

from __future__ import annotations

from typing import Any


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


SILENT = Reporter()
