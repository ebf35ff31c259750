"""Distillation presets: presets/*.toml (Table A of the MCT supplement, plus our own)."""

from __future__ import annotations

import difflib
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from mctool.errors import UsageError

# Every key a preset may hold, with its type. Numbers written as ints where floats are
# expected are accepted (TOML `1e3` is a float, `5` an int).
PRESET_KEYS: dict[str, type] = {
    "source": str,
    "description": str,
    "dataset": str,
    "ipc": int,
    "syn_steps": int,
    "expert_epochs": float,
    "max_start_epoch": float,
    "lr_img": float,
    "lr_lr": float,
    "lr_init": float,
    "zca": bool,
    "iterations": int,
    "batch_syn": int,
    "interior": int,
}
REQUIRED = ("dataset", "ipc", "syn_steps", "expert_epochs", "max_start_epoch", "lr_img", "lr_lr", "lr_init")


@dataclass(frozen=True)
class Preset:
    """A validated preset: its name, where it came from, and its values."""

    name: str
    path: str
    values: dict[str, Any]


def presets_dir() -> Path:
    """The folder of shipped presets (inside the installed package)."""
    return Path(str(resources.files("mctool") / "presets"))


def list_presets() -> list[Preset]:
    """Every shipped preset, sorted by name."""
    return [load_preset(p) for p in sorted(presets_dir().glob("*.toml"))]


def _coerce(key: str, value: Any, path: str) -> Any:
    want = PRESET_KEYS[key]
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want is int and isinstance(value, bool) or not isinstance(value, want):
        raise UsageError(f"{path}: key '{key}' must be {want.__name__}, got {type(value).__name__} {value!r}")
    return value


def load_preset(name_or_path: str | Path) -> Preset:
    """A preset by shipped name (e.g. 'cifar10-ipc10') or by path to a .toml file."""
    text = str(name_or_path)
    path = Path(text)
    shipped = presets_dir() / f"{text}.toml"
    if "/" not in text and not text.endswith(".toml") and shipped.exists():
        path = shipped  # a shipped name wins over a stray local file of the same name
    elif not (text.endswith(".toml") or path.exists()):
        path = shipped
        if not path.exists():
            stems = [p.stem for p in sorted(presets_dir().glob("*.toml"))]
            close = difflib.get_close_matches(text, stems, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise UsageError(f"unknown preset '{text}'; {hint}shipped presets: {', '.join(stems)}")
    if not path.is_file():
        raise UsageError(f"{path}: preset file not found")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: not valid TOML ({exc})") from None
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in PRESET_KEYS:
            raise UsageError(f"{path}: unknown key '{key}' (allowed: {', '.join(PRESET_KEYS)})")
        values[key] = _coerce(key, value, str(path))
    missing = [k for k in REQUIRED if k not in values]
    if missing:
        raise UsageError(f"{path}: missing key(s) {', '.join(missing)}")
    return Preset(name=path.stem, path=str(path), values=values)
