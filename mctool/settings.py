"""One list of settings per command: a config dataclass whose fields say everything else.

A field made with `setting(...)` carries its help text and how it is exposed: as a command-line
option (and under which flags), as a preset key, as a column of `--list-presets`, and whether
a resumed run may change it. The CLI builds its options from these fields, the preset loader
its allowed keys, resume its list of keys that may differ — so adding a setting is one line.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

_KEY = "mctool"
_NO_LEGACY: Any = type("NoLegacy", (), {"__repr__": lambda self: "<none>"})()


@dataclass(frozen=True)
class Info:
    """How one setting is exposed (the metadata of a `setting` field)."""

    help: str
    flags: tuple[str, ...] = ()  # option flags; () = not an option (the CLI derives --name-with-dashes)
    option: bool = True  # exposed as a command-line option
    preset: bool = False  # allowed as a preset key
    column: bool = False  # a column of `mctool distill --list-presets`
    required: bool = False  # a preset must set it
    resume_safe: bool = False  # a resumed run may change it
    legacy: Any = _NO_LEGACY  # value implied when a stored config (older release) lacks it
    metavar: str | None = None


def setting(default: Any, help: str, **info: Any) -> Any:
    """A dataclass field with its `Info` (see the module docstring)."""
    meta = {_KEY: Info(help=help, **info)}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class Setting:
    """One setting of a config class: name, type, default and its `Info`."""

    name: str
    type: Any
    default: Any
    info: Info

    @property
    def flags(self) -> tuple[str, ...]:
        """The option's flags (default: --name-with-dashes)."""
        return self.info.flags or ("--" + self.name.replace("_", "-"),)

    @property
    def option_name(self) -> str:
        """The flag messages name it by (the first)."""
        return self.flags[0].split("/")[0]

    @property
    def value_type(self) -> Any:
        """The field's type without `| None`."""
        args = [a for a in typing.get_args(self.type) if a is not type(None)]
        return args[0] if len(args) == 1 else self.type


def settings(cls: type) -> list[Setting]:
    """Every `setting` field of config class `cls`, in declaration order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        info = f.metadata.get(_KEY)
        if info is None:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        out.append(Setting(f.name, hints[f.name], default, info))
    return out


def option_settings(cls: type) -> list[Setting]:
    """The settings that are command-line options."""
    return [s for s in settings(cls) if s.info.option]


def preset_keys(cls: type) -> dict[str, Any]:
    """Preset key -> value type, for the keys a preset may set."""
    return {s.name: s.value_type for s in settings(cls) if s.info.preset}


def required_keys(cls: type) -> list[str]:
    """Keys every preset must set."""
    return [s.name for s in settings(cls) if s.info.required]


def resume_safe(cls: type) -> set[str]:
    """Keys a resumed run may change."""
    return {s.name for s in settings(cls) if s.info.resume_safe}


def columns(cls: type) -> list[str]:
    """The settings shown as columns of the presets table."""
    return [s.name for s in settings(cls) if s.info.column]


def option_name(cls: type, key: str) -> str:
    """The command-line flag of setting `key` (for messages)."""
    for s in settings(cls):
        if s.name == key:
            return s.option_name
    return "--" + key.replace("_", "-")


def legacy_values(cls: type) -> dict[str, Any]:
    """Values implied for keys that configs stored by older releases lack."""
    return {s.name: s.info.legacy for s in settings(cls) if s.info.legacy is not _NO_LEGACY}
