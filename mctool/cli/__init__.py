"""The command line: the app (mctool.cli.app), shared plumbing (common), rendering (render),
and one module per command (commands/)."""

from mctool.cli.app import app, main

__all__ = ["app", "main"]
