"""One list of settings per command: a config dataclass whose fields say everything else.

A field made with `setting(...)` carries its help text and how it is exposed: as a command-line
option (and under which flags), as a preset key, as a column of `--list-presets`, and whether
a resumed run may change it, and what its value must be (`check=`, from the small vocabulary
below: `at_least`, `above`, `between`, `one_of`, or a `Check` of its own). The CLI builds its
options from these fields, the preset loader its allowed keys, resume its list of keys that may
differ, validation its checks — so adding a setting is one line.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_KEY = "mctool"
_NO_LEGACY: Any = type("NoLegacy", (), {"__repr__": lambda self: "<none>"})()


@dataclass(frozen=True)
class Check:
    """What a setting's value must be: `ok(value)`, and the words that follow "must be" in the
    message naming the setting. `message`, when given, is the whole message instead: a template
    (formatted with {option}, {value} and {words}) or a function of the value, for a message that
    names what in the value is wrong. A value `ok` cannot compare (a wrong type) fails."""

    ok: Callable[[Any], bool]
    words: str
    message: str | Callable[[Any], str] | None = None


def _number(v: Any) -> bool:
    """An int, or a float that is neither NaN nor infinite (so NaN fails every numeric check)."""
    if isinstance(v, bool):
        return False
    return isinstance(v, int) or (isinstance(v, float) and math.isfinite(v))


def _show(x: Any) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def at_least(lo: float, words: str | None = None) -> Check:
    """A finite number >= lo."""
    return Check(lambda v: _number(v) and v >= lo, words or f">= {_show(lo)}")


def above(lo: float, words: str | None = None) -> Check:
    """A finite number > lo."""
    return Check(lambda v: _number(v) and v > lo, words or f"> {_show(lo)}")


def between(lo: float, hi: float, words: str | None = None, top_open: bool = False) -> Check:
    """A finite number in [lo, hi] (or [lo, hi) with `top_open`)."""
    if top_open:
        return Check(lambda v: _number(v) and lo <= v < hi, words or f"in [{_show(lo)}, {_show(hi)})")
    return Check(lambda v: _number(v) and lo <= v <= hi, words or f"in [{_show(lo)}, {_show(hi)}]")


def one_of(*choices: Any, words: str | None = None, message: str | None = None) -> Check:
    """One of `choices` ("a or b"; "one of a, b, c")."""
    names = [str(c) for c in choices]
    default = " or ".join(names) if len(names) == 2 else "one of " + ", ".join(names)
    return Check(lambda v: v in choices, words or default, message)


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
    check: Check | None = None  # what the value must be (None: anything of its type); None values are not checked


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


@dataclass(frozen=True)
class Problem:
    """A setting whose value fails its check."""

    setting: Setting
    value: Any

    @property
    def key(self) -> str:
        """The setting's name (its preset key)."""
        return self.setting.name

    def message(self, template: str) -> str:
        """The one-line message: the check's own, else `template` ({option}, {key}, {value}, {words})."""
        check = self.setting.info.check
        assert check is not None
        if callable(check.message):
            return check.message(self.value)
        return (check.message or template).format(option=self.setting.option_name, key=self.key, value=self.value,
                                                  words=check.words)


def first_problem(config: Any) -> Problem | None:
    """The first setting of `config` (in declaration order) whose value fails its check; a value
    of None (not stated) is not checked."""
    for s in settings(type(config)):
        check = s.info.check
        value = getattr(config, s.name)
        if check is None or value is None:
            continue
        try:
            ok = bool(check.ok(value))
        except (TypeError, ValueError, AttributeError):  # a value of the wrong type
            ok = False
        if not ok:
            return Problem(s, value)
    return None
