"""The command line: the app (mctool.cli.application), shared plumbing (common), rendering
(render), one module per command (commands/), and the entry point (launch).

`app` and `main` are imported on first use, so that `mctool.cli.launch` can write its first
line before typer, rich and torch are imported.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["app", "main"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        value = getattr(importlib.import_module("mctool.cli.application"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mctool.cli' has no attribute {name!r}")
