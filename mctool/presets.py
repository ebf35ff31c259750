"""Distillation presets: presets/*.toml (Table A of the MCT supplement, plus our own).

Which keys a preset may and must hold is a `Schema` its user passes (mctool.distill derives it
from DistillConfig's settings); `source` and `description` are always allowed. A `folder:PATH`
dataset in a preset file is resolved against the preset file's folder.
"""

from __future__ import annotations

import difflib
import os
import stat
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from mctool.core.errors import UsageError

_TEXT_KEYS = {"source": str, "description": str}


@dataclass(frozen=True)
class Schema:
    """The keys a preset may hold (with their types) and those it must hold."""

    keys: dict[str, Any]
    required: tuple[str, ...] = ()

    def all_keys(self) -> dict[str, Any]:
        """Every allowed key, `source` and `description` included."""
        return {**_TEXT_KEYS, **self.keys}


@dataclass(frozen=True)
class Preset:
    """A validated preset: its name, where it came from, and its values."""

    name: str
    path: str
    values: dict[str, Any]


def presets_dir() -> Path:
    """The folder of shipped presets (inside the installed package)."""
    return Path(str(resources.files("mctool") / "presets"))


def list_presets(schema: Schema) -> list[Preset]:
    """Every shipped preset, sorted by name."""
    return [load_preset(p, schema) for p in sorted(presets_dir().glob("*.toml"))]


def _coerce(key: str, want: Any, value: Any, path: str) -> Any:
    # Numbers written as ints where floats are expected are accepted (TOML `1e3` is a float, `5` an int).
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want is int and isinstance(value, bool) or not isinstance(value, want):
        raise UsageError(f"{path}: key '{key}' must be {want.__name__}, got {type(value).__name__} {value!r}")
    return value


def _find(text: str) -> Path:
    path = Path(text)
    shipped = presets_dir() / f"{text}.toml"
    if "/" not in text and not text.endswith(".toml") and shipped.exists():
        return shipped  # a shipped name wins over a stray local file of the same name
    if text.endswith(".toml") or path.exists():
        return path
    stems = [p.stem for p in sorted(presets_dir().glob("*.toml"))]
    close = difflib.get_close_matches(text, stems, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise UsageError(f"unknown preset '{text}'; {hint}shipped presets: {', '.join(stems)}")


def load_preset(name_or_path: str | Path, schema: Schema) -> Preset:
    """A preset by shipped name (e.g. 'cifar10-ipc10') or by path to a .toml file."""
    path = _find(str(name_or_path))
    if not path.is_file():
        raise UsageError(f"{path}: preset file not found")
    try:
        raw = tomllib.loads(path.read_text())
    except PermissionError:
        raise UsageError(f"{path}: permission denied (cannot read the preset file)") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the preset file ({exc.strerror or exc})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: not valid TOML ({exc})") from None
    keys = schema.all_keys()
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in keys:
            raise UsageError(f"{path}: unknown key '{key}' (allowed: {', '.join(keys)})")
        values[key] = _coerce(key, keys[key], value, str(path))
    missing = [k for k in schema.required if k not in values]
    if missing:
        raise UsageError(f"{path}: missing key(s) {', '.join(missing)}")
    dataset = values.get("dataset", "")
    if dataset.lower().startswith("folder:"):
        folder = Path(dataset[len("folder:"):]).expanduser()
        values["dataset"] = f"folder:{(path.parent / folder).resolve()}"
    return Preset(name=path.stem, path=str(path), values=values)


def preset_text(values: dict[str, Any], comment: str, schema: Schema) -> str:
    """The text of a preset file (`values`: preset keys) that `load_preset` reads back; `comment`
    becomes its header, one `#` line per line."""
    keys = schema.all_keys()
    lines = [f"# {line}" for line in comment.splitlines()]
    for key, value in values.items():
        if key not in keys:
            raise ValueError(f"not a preset key: {key}")
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str):
            text = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        else:
            text = repr(float(value)) if keys[key] is float else str(int(value))
        lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"


def is_own_preset(path: Path, mark: str) -> bool:
    """True when `path` is a plain file (not a link, FIFO or device) whose text starts with `mark`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        want = mark.encode()
        return os.read(fd, len(want)) == want
    finally:
        os.close(fd)
