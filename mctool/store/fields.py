"""Reading attributes and datasets with their type, shape, dtype and range checked.

Every value the store hands out passes through a `Fields` reader, so a malformed file gives
one line naming the file and the field (exit 2) instead of an error deep in the maths.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from mctool.core.errors import ArtifactError
from mctool.store.files import clean_text, shown

_MISSING: Any = object()

# Sane limits: far above any real artifact, far below what would exhaust a machine.
MAX_EXPERTS = 1_000_000
MAX_EPOCHS = 100_000

# A single read never allocates more than this (values are read row by row where they are large).
MAX_READ_BYTES = 2 << 30
# A read may not exceed what the file stores for the dataset: a small file declaring a huge
# shape (unwritten chunks read as fill values) would otherwise make a reader allocate it.
# Filtered (compressed) data may expand up to this ratio; mctool itself never compresses.
MAX_COMPRESSION = 1000
MAX_TEXT_BYTES = 16 << 20
_SLACK_BYTES = 64 << 10  # a small dataset may be read before it is written (its fill values)


class Fields:
    """Typed, checked access to one HDF5 group's attributes and datasets, for one file."""

    def __init__(self, path: str | os.PathLike[str], group: h5py.Group) -> None:
        self.path = Path(path)
        self.group = group
        self.where = group.name if group.name != "/" else ""

    # ------------------------------------------------------------------ errors

    def problem(self, key: str, what: str, attribute: bool = True) -> ArtifactError:
        """The one-line error for field `key` of this group."""
        field = f"{self.where or '/'} attribute '{key}'" if attribute else f"{self.where}/{key}"
        return ArtifactError(f"{shown(self.path)}: {clean_text(field)}: {what}")

    def _raw(self, key: str, default: Any) -> Any:
        if key not in self.group.attrs:
            if default is _MISSING:
                raise self.problem(key, "missing")
            return default
        try:
            value = self.group.attrs[key]
        except (OSError, TypeError, ValueError) as exc:  # an attribute h5py cannot decode
            raise self.problem(key, f"unreadable ({clean_text(str(exc))})") from None
        # Variable-length text is stored apart from the attribute (the open checks see only its
        # pointer); it cannot exceed the file, but no attribute mctool writes comes near this.
        if isinstance(value, (str, bytes)) and len(value) > MAX_TEXT_BYTES:
            raise self.problem(key, f"holds {len(value) / 1e6:.0f} MB of text; refusing it")
        return value

    # ------------------------------------------------------------------ attributes

    def int(self, key: str, lo: int | None = None, hi: int | None = None, default: Any = _MISSING) -> int:
        """An integer attribute in [lo, hi]."""
        v = self._raw(key, default)
        if v is default and default is not _MISSING:
            return v
        if isinstance(v, np.ndarray) and v.shape == ():
            v = v[()]
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise self.problem(key, f"must be an integer, got {_brief(v)}")
        v = int(v)
        self._range(key, v, lo, hi)
        return v

    def float(self, key: str, lo: float | None = None, hi: float | None = None, default: Any = _MISSING,
              positive: bool = False) -> float:
        """A finite number attribute in [lo, hi] (> 0 when `positive`)."""
        v = self._raw(key, default)
        if v is default and default is not _MISSING:
            return v
        if isinstance(v, np.ndarray) and v.shape == ():
            v = v[()]
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise self.problem(key, f"must be a number, got {_brief(v)}")
        v = float(v)
        if not math.isfinite(v):
            raise self.problem(key, f"must be finite, got {v}")
        if positive and not v > 0:
            raise self.problem(key, f"must be > 0, got {v:g}")
        self._range(key, v, lo, hi)
        return v

    def bool(self, key: str, default: Any = _MISSING) -> bool:
        """A boolean attribute."""
        v = self._raw(key, default)
        if v is default and default is not _MISSING:
            return v
        if isinstance(v, np.ndarray) and v.shape == ():
            v = v[()]
        if not isinstance(v, (bool, np.bool_)):
            raise self.problem(key, f"must be true or false, got {_brief(v)}")
        return bool(v)

    def str(self, key: str, default: Any = _MISSING, choices: Sequence[str] | None = None, raw: bool = False) -> str:
        """A text attribute (control characters removed), optionally one of `choices`.

        `raw`: exactly as stored, for names that are data (a dataset's path, class names): they
        must reach the file system as they are; the CLI cleans whatever it prints."""
        v = self._raw(key, default)
        if v is default and default is not _MISSING:
            return v
        if isinstance(v, bytes):
            v = v.decode("utf-8", errors="replace")
        if not isinstance(v, str):
            raise self.problem(key, f"must be text, got {_brief(v)}")
        if not raw:
            v = clean_text(v)
        if choices is not None and v not in choices:
            raise self.problem(key, f"must be one of {', '.join(choices)}, got '{v[:40]}'")
        return v

    def json(self, key: str, kind: type, default: Any = _MISSING, raw: bool = False) -> Any:
        """A JSON-encoded text attribute whose document is a `kind` (dict or list); strings inside
        are cleaned of control characters (`raw`: kept exactly, see `str`)."""
        stored = self._raw(key, default)
        if stored is default and default is not _MISSING:
            return stored
        text = self.str(key, raw=raw)
        try:
            value = json.loads(text)
        except ValueError:
            raise self.problem(key, "is not valid JSON") from None
        except RecursionError:  # e.g. 100,000 '[': Python's parser recurses once per level
            raise self.problem(key, "is not valid JSON (nested too deeply)") from None
        if value is None and default is not _MISSING:
            return default
        if not isinstance(value, kind):
            raise self.problem(key, f"must be a JSON {'object' if kind is dict else 'list'}, got {_brief(value)}")
        return value if raw else _clean_json(value)

    def ints(self, key: str, lo: int | None = None, hi: int | None = None) -> list[int]:
        """A 1-D integer array attribute, each value in [lo, hi]."""
        v = self._raw(key, _MISSING)
        arr = np.asarray(v)
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise self.problem(key, f"must be a list of integers, got {_brief(v)}")
        out = [int(x) for x in arr]
        for x in out:
            self._range(key, x, lo, hi)
        return out

    def provenance(self) -> None:
        """Check the provenance attributes a product group may carry (each optional): config,
        argv, versions, source (JSON), seed (integer), created (text)."""
        for key, kind in (("config", dict), ("argv", list), ("versions", dict), ("source", dict)):
            self.json(key, kind, None)
        self.int("seed", default=None)
        self.str("created", default=None)

    def _range(self, key: str, v: float, lo: float | None, hi: float | None) -> None:
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            span = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
            raise self.problem(key, f"must be in {span}, got {v:g}")

    # ------------------------------------------------------------------ datasets

    def has(self, name: str) -> bool:
        """Whether this group holds a dataset or group `name`."""
        return name in self.group

    def dataset(self, name: str, kinds: str, shape: Sequence[int | None]) -> h5py.Dataset:
        """Dataset `name` whose dtype kind is in `kinds` ('f', 'b', 'iu') and whose shape matches
        `shape` (None: any size); not read."""
        if name not in self.group:
            raise self.problem(name, "missing", attribute=False)
        ds = self.group[name]
        if not isinstance(ds, h5py.Dataset):
            raise self.problem(name, "must be a dataset, got a group", attribute=False)
        if ds.dtype.kind not in kinds:
            want = {"f": "floating-point", "b": "boolean", "iu": "integer", "u": "unsigned integer",
                    "iuf": "numeric"}.get(kinds, kinds)
            raise self.problem(name, f"must hold {want} values, got {ds.dtype}", attribute=False)
        if len(ds.shape) != len(shape) or any(w is not None and w != s for w, s in zip(shape, ds.shape)):
            want_shape = "[" + ", ".join("*" if w is None else str(w) for w in shape) + "]"
            raise self.problem(name, f"has shape {list(ds.shape)}, expected {want_shape}", attribute=False)
        return ds

    def stored(self, name: str, ds: h5py.Dataset, nbytes: int) -> None:
        """Refuse to read `nbytes` of dataset `name` beyond the sane limit or beyond what the file
        actually stores for it (checked before any allocation)."""
        if nbytes > MAX_READ_BYTES:
            raise self.problem(name, f"would take {nbytes / 1e9:.1f} GB to read; refusing", attribute=False)
        stored = int(ds.id.get_storage_size())
        ratio = MAX_COMPRESSION if ds.id.get_create_plist().get_nfilters() else 1
        if nbytes > stored * ratio + _SLACK_BYTES:
            raise self.problem(name, f"declares {nbytes / 1e6:.1f} MB of values but the file stores "
                                     f"{stored / 1e6:.1f} MB of them (truncated, or a forged shape); refusing",
                               attribute=False)

    def array(self, name: str, kinds: str, shape: Sequence[int | None], finite: bool = False,
              rows: Any = None) -> np.ndarray:
        """Read dataset `name` (checked as `dataset`), or only `rows` of it; `finite` refuses NaN/inf."""
        ds = self.dataset(name, kinds, shape)
        return read_checked(self, name, ds, rows, finite)


def read_checked(fields: Fields, name: str, ds: h5py.Dataset, rows: Any, finite: bool) -> np.ndarray:
    """Read `ds` (or `ds[rows]`) after a size check, then check the values are finite if asked."""
    count = math.prod(ds.shape[1:]) * ds.dtype.itemsize  # Python ints: a forged shape cannot overflow
    n = ds.shape[0] if ds.ndim and rows is None else (1 if np.isscalar(rows) else len(np.atleast_1d(rows)))
    if ds.ndim == 0:
        n, count = 1, ds.dtype.itemsize
    fields.stored(name, ds, n * count)
    try:
        if rows is None:
            data = ds[()]
        elif np.isscalar(rows):
            data = ds[int(rows)]
        else:
            idx = np.atleast_1d(rows)
            data = ds[np.sort(idx)] if len(idx) else np.zeros((0, *ds.shape[1:]), ds.dtype)
            if len(idx) and not np.array_equal(np.sort(idx), idx):  # h5py wants increasing indices
                data = data[np.argsort(np.argsort(idx))]
    except (OSError, ValueError, TypeError) as exc:
        raise fields.problem(name, f"unreadable ({clean_text(str(exc))})", attribute=False) from None
    if finite and data.dtype.kind == "f" and not np.isfinite(data).all():
        raise fields.problem(name, "holds NaN or infinite values", attribute=False)
    return data


def _brief(v: Any) -> str:
    text = clean_text(repr(v.decode(errors="replace") if isinstance(v, bytes) else v))
    return text if len(text) <= 40 else text[:37] + "..."


def _clean_json(value: Any) -> Any:
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, list):
        return [_clean_json(v) for v in value]
    if isinstance(value, dict):
        return {clean_text(str(k)): _clean_json(v) for k, v in value.items()}
    return value
