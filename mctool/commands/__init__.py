"""The subcommands; importing this package registers them on `mctool.cli.app`."""

from mctool.commands import convexify, demo, distill, evaluate, experts, inspect  # noqa: F401
