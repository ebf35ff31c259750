"""A restricted, streaming reader of ``torch.save`` files holding tensors in (nested) lists.

``torch.save`` (torch >= 1.6) writes a zip archive: ``<name>/data.pkl`` is a pickle of the
object in which every tensor is a call of ``torch._utils._rebuild_tensor_v2`` on a *persistent
reference* ``('storage', <dtype class>, key, location, numel)``; the bytes of storage ``key``
are the stored member ``<name>/data/<key>``.

This module never executes anything a file asks for. The pickle is read by an Unpickler whose
``find_class`` resolves only the handful of names tensors-in-lists need, each to a function
of ours that builds an inert description (``TensorRef``) instead of a tensor:

* ``torch._utils._rebuild_tensor_v2`` / ``_rebuild_tensor`` / ``_rebuild_parameter``,
* the typed storage classes (``torch.FloatStorage`` ...), which only name a dtype,
* ``collections.OrderedDict`` (the empty backward-hooks argument of every tensor).

Any other global (``os.system``, ``builtins.exec``, a user class ...) is refused with one line
naming the file, before anything is called. Storage bytes are read on demand from the zip
member, only as far as the tensor read lies in its storage (a slice of a huge, deflated storage
inflates the slice; a storage used whole is read whole and CRC-checked), so memory is bounded by
what the caller holds, not by the file. Sizes, dtypes and offsets are checked against the member
sizes when the file is opened, so a damaged or truncated file is one line naming it.

Nothing a file declares is believed before it is checked: the unpickled structure is walked
once, iteratively, each shared list once (a list inside itself, more than MAX_DEPTH levels or
more than MAX_NODES nodes counted along every path are refused, so no later walk can hang), and
what each tensor's read would allocate is compared with half the memory available.

Legacy (non-zip, torch < 1.6) files are not streamable: their storages follow the pickle
back to back with no index. Their pickle is first read by the same restricted unpickler (torch
allocates every storage at its declared size before reading it, so the declared sizes are checked
against the file and the structure as above); then they are read whole with
``torch.load(weights_only=True)`` — torch's own restricted unpickler, which also refuses code — so
the memory bound for them is one file (the bound the import promises), and a note says so.
Refusing them outright would strand users whose only copy is such a file; re-saving it would
need the same memory anyway.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import re
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from mctool.core.errors import UsageError

# A data.pkl larger than this is not a list of tensors (10 CIFAR experts need ~0.6 MB, 100
# compressed Tiny ImageNet experts ~20 MB).
_MAX_PICKLE_BYTES = 256 << 20
# Structure limits checked before anything walks the object: the deepest real layout is
# experts → segments → points → tensors (5 levels); a list may be shared (pickle memo), so the
# count is of nodes *as walked* (a DAG of shared lists counts every path).
MAX_DEPTH = 16
MAX_NODES = 2_000_000
# Without a reading of free memory, this much is assumed available for one tensor.
_FALLBACK_MEMORY = 4 << 30
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = 0x80


class TorchFileError(UsageError):
    """A torch file that cannot be read: damaged, truncated, foreign or unsafe (one line, exit 2)."""


class UnsafeTorchFile(TorchFileError):
    """A torch file whose pickle asks for anything but tensors in lists; nothing was executed."""


# --------------------------------------------------------------------------- inert descriptions


_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


@dataclass(frozen=True)
class _StorageType:
    """What ``torch.FloatStorage`` & co. resolve to: only a dtype."""

    dtype: torch.dtype

    def __call__(self, *args: Any) -> Any:  # a pickle that calls a storage class gets nothing
        raise pickle.UnpicklingError("a storage class was called")

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError("BUILD on a storage type")


@dataclass(frozen=True)
class StorageRef:
    """One storage of the file: member ``data/<key>`` holding ``numel`` elements of ``dtype``."""

    key: str
    dtype: torch.dtype
    numel: int

    @property
    def nbytes(self) -> int:
        """Size of the storage in bytes."""
        return self.numel * _itemsize(self.dtype)

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError("BUILD on a storage")


@dataclass(frozen=True)
class TensorRef:
    """A tensor of the file, not yet read: a strided view of one storage."""

    storage: StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def dtype(self) -> torch.dtype:
        """Element type."""
        return self.storage.dtype

    @property
    def storage_id(self) -> str:
        """Identity of the memory it views (two tensors with the same id alias each other)."""
        return self.storage.key

    def numel(self) -> int:
        """Number of elements."""
        n = 1
        for s in self.shape:
            n *= s
        return n

    def extent(self) -> int:
        """One past the largest storage index the view touches (0 for an empty tensor)."""
        if any(s == 0 for s in self.shape):
            return 0
        return self.offset + sum((s - 1) * st for s, st in zip(self.shape, self.stride)) + 1

    def span(self) -> tuple[int, int]:
        """The bytes [start, end) of its storage the view lies in (start = end: none)."""
        size = _itemsize(self.dtype)
        end = self.extent()
        return (self.offset * size, end * size) if end else (0, 0)

    def overlaps_itself(self) -> bool:
        """Whether two of its elements are one stored element (a stride-0 or overlapping view)."""
        return _self_overlapping(self.shape, self.stride)

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError("BUILD on a tensor")


@dataclass(frozen=True, eq=False)
class LoadedTensor:
    """A tensor already in memory (legacy files), with the same description as TensorRef."""

    tensor: torch.Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape."""
        return tuple(self.tensor.shape)

    @property
    def dtype(self) -> torch.dtype:
        """Element type."""
        return self.tensor.dtype

    @property
    def storage_id(self) -> str:
        """Identity of the memory it views."""
        return f"ptr:{self.tensor.untyped_storage().data_ptr()}"

    def numel(self) -> int:
        """Number of elements."""
        return self.tensor.numel()

    def span(self) -> tuple[int, int]:
        """The bytes [start, end) of its storage the tensor lies in (start = end: none)."""
        t = self.tensor
        if t.numel() == 0:
            return (0, 0)
        size = t.element_size()
        end = t.storage_offset() + sum((s - 1) * st for s, st in zip(t.shape, t.stride())) + 1
        return (t.storage_offset() * size, end * size)

    def overlaps_itself(self) -> bool:
        """Whether two of its elements are one stored element (a stride-0 or overlapping view)."""
        return _self_overlapping(tuple(self.tensor.shape), tuple(self.tensor.stride()))


Leaf = TensorRef | LoadedTensor


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def _self_overlapping(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """True unless the dimensions (sorted by stride) step past each other: no element twice."""
    if any(s == 0 for s in shape):
        return False
    dims = sorted((st, s) for s, st in zip(shape, stride) if s > 1)
    reach = 1  # elements spanned by the dimensions taken so far
    for st, s in dims:
        if st < reach:
            return True
        reach = st * (s - 1) + reach
    return False


def memory_limit() -> int:
    """Bytes one read may allocate: half the memory available now (a fixed 4 GiB when unknown)."""
    from mctool.matching.memory import free_bytes

    free = free_bytes("cpu")
    return max(free // 2, 1 << 20) if free is not None else _FALLBACK_MEMORY


# --------------------------------------------------------------------------- the restricted unpickler


class _Refused(Exception):
    """A global the file asked for that we do not resolve."""


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                               for v in value):
        raise pickle.UnpicklingError(f"tensor {what} must be a tuple of non-negative ints, got {value!r}")
    return value


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                    hooks: Any = None, metadata: Any = None) -> TensorRef:
    """Stand-in for torch._utils._rebuild_tensor_v2: checks the arguments, reads nothing."""
    if not isinstance(storage, StorageRef):
        raise pickle.UnpicklingError("a tensor without a storage reference")
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise pickle.UnpicklingError(f"bad storage offset {offset!r}")
    shape, strides = _ints(size, "size"), _ints(stride, "stride")
    if len(shape) != len(strides):
        raise pickle.UnpicklingError(f"size {shape} and stride {strides} differ in length")
    if hooks not in (None, {}) or metadata not in (None, {}):
        raise pickle.UnpicklingError("a tensor with backward hooks or Python attributes")
    if not isinstance(requires_grad, bool):
        raise pickle.UnpicklingError("bad requires_grad flag")
    return TensorRef(storage, offset, shape, strides)


def _rebuild_parameter(data: Any, requires_grad: Any = False, hooks: Any = None) -> TensorRef:
    """Stand-in for torch._utils._rebuild_parameter: an nn.Parameter is read as its tensor."""
    if not isinstance(data, TensorRef):
        raise pickle.UnpicklingError("a parameter without a tensor")
    if hooks not in (None, {}):
        raise pickle.UnpicklingError("a parameter with backward hooks")
    return data


def _empty_hooks() -> dict[Any, Any]:
    """Stand-in for collections.OrderedDict(): only the empty hooks dict is ever built."""
    return {}


_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): _empty_hooks,
    **{("torch", name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


class _Unpickler(pickle.Unpickler):
    """Resolves only the names in _ALLOWED; storages become StorageRefs (persistent ids)."""

    def __init__(self, file: BinaryIO, legacy: bool = False) -> None:
        super().__init__(file)
        self.storages: dict[str, StorageRef] = {}
        self.legacy = legacy  # pre-1.6 references carry a sixth field: a view of the storage, or None

    def find_class(self, module: str, name: str) -> Any:
        target = _ALLOWED.get((module, name))
        if target is None:
            raise _Refused(f"{module}.{name}")
        return target

    def persistent_load(self, pid: Any) -> StorageRef:
        if not (isinstance(pid, tuple) and len(pid) == 5 + self.legacy and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent reference {pid!r:.80}")
        _, kind, key, location, numel = pid[:5]
        if not isinstance(kind, _StorageType) or not isinstance(key, str) or not isinstance(location, str):
            raise pickle.UnpicklingError(f"malformed storage reference {pid!r:.80}")
        if not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
            raise pickle.UnpicklingError(f"storage {key} has a bad size {numel!r}")
        ref = StorageRef(key, kind.dtype, numel)
        seen = self.storages.setdefault(key, ref)
        if seen != ref:
            raise pickle.UnpicklingError(f"storage {key} is described twice, differently")
        return ref


@contextlib.contextmanager
def _pickle_problems(path: Path) -> Iterator[None]:
    """Whatever unpickling a file raises, as one line about `path`: a class outside tensors in
    lists is refused (nothing of it ran), too deep a nesting and any damage are said as such."""
    try:
        yield
    except TorchFileError:
        raise
    except _Refused as exc:
        raise UnsafeTorchFile(
            f"{path}: refused: the file asks to load '{exc}', which is not part of tensors in lists "
            "(nothing from the file was run; mctool reads only lists of tensors)") from None
    except RecursionError:
        raise TorchFileError(f"{path}: not a list of tensors (nesting too deep)") from None
    except Exception as exc:  # noqa: BLE001 - a damaged pickle can raise almost anything
        raise TorchFileError(f"{path}: damaged or not a torch file of tensors ({_one_line(exc)})") from None


def _unpickle(data: bytes, path: Path) -> tuple[Any, dict[str, StorageRef]]:
    """The pickled object with TensorRefs for tensors, and every storage it references."""
    unpickler = _Unpickler(io.BytesIO(data))
    with _pickle_problems(path):
        root = unpickler.load()
        check_tensors_in_lists(root, path)
    return root, unpickler.storages


def _gb(nbytes: int) -> str:
    if nbytes >= 1e9:
        return f"{nbytes / 1e9:.1f} GB"
    return f"{nbytes / 1e6:.1f} MB" if nbytes >= 1e6 else f"{nbytes:,} bytes"


def _one_line(exc: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # torch colours some messages
    return " ".join(text.split())[:200] or type(exc).__name__


_LEAVES = (TensorRef, LoadedTensor, torch.Tensor)


def check_tensors_in_lists(root: Any, path: Path) -> None:
    """Refuse anything but lists (or tuples) nested around tensors, and structures that would
    not end or not fit: a list inside itself, nesting deeper than MAX_DEPTH, more than MAX_NODES
    nodes as walked (shared lists counted on every path). One line naming the file.

    Iterative, and each distinct list is visited once (sizes of shared ones are remembered),
    so the check itself takes time linear in the pickle, whatever the structure."""
    if isinstance(root, _LEAVES):
        return
    walked: dict[int, int] = {}  # id(list) -> nodes below it, as walked; kept alive by `root`
    on_path: set[int] = set()
    stack: list[tuple[Any, int, str, bool]] = [(root, 0, "the file", False)]
    while stack:
        node, depth, where, finished = stack.pop()
        key = id(node)
        if finished:
            on_path.discard(key)
            total = 1 + sum(walked.get(id(child), 1) for child in node)
            if total > MAX_NODES:
                raise TorchFileError(f"{path}: not a list of tensors: {where} holds more than {MAX_NODES:,} "
                                     "lists and tensors (counting shared lists on every path)")
            walked[key] = total
            continue
        if isinstance(node, _LEAVES) or key in walked:
            continue
        if not isinstance(node, (list, tuple)):
            raise UnsafeTorchFile(f"{path}: holds a {type(node).__name__} at {where}; mctool reads only tensors "
                                  "in lists")
        if key in on_path:
            raise TorchFileError(f"{path}: not a list of tensors: {where} is a list that contains itself")
        if depth >= MAX_DEPTH:
            raise TorchFileError(f"{path}: not a list of tensors (nested more than {MAX_DEPTH} lists deep)")
        on_path.add(key)
        stack.append((node, depth, where, True))
        stack.extend((child, depth + 1, f"{where}[{i}]", False) for i, child in enumerate(node)
                     if not isinstance(child, _LEAVES))


# --------------------------------------------------------------------------- files


class _CountingFile(io.RawIOBase):
    """A read-only file that counts the bytes read through it (to prove reads are bounded)."""

    def __init__(self, raw: BinaryIO) -> None:
        super().__init__()
        self._raw = raw
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self.bytes_read += len(data)
        return data

    def readinto(self, b: Any) -> int:
        n = self._raw.readinto(b)
        self.bytes_read += n or 0
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()

    def close(self) -> None:
        self._raw.close()
        super().close()


class TorchFile:
    """An open torch file: ``root`` (tensors as Leaf descriptions) and ``read(leaf)``."""

    path: Path
    root: Any
    streaming: bool

    def read(self, leaf: Leaf) -> torch.Tensor:
        """The tensor `leaf` describes, as a contiguous CPU tensor that owns its memory."""
        raise NotImplementedError

    @property
    def bytes_read(self) -> int:
        """Bytes read from disk so far."""
        return 0

    def drop_cache(self) -> None:
        """Forget any storage kept for the next read."""

    def close(self) -> None:
        """Release the file."""

    def __enter__(self) -> "TorchFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _ZipTorchFile(TorchFile):
    """The torch >= 1.6 zip format, read lazily: one storage at a time."""

    streaming = True

    def __init__(self, path: Path) -> None:
        self.path = path
        self._raw = _CountingFile(open(path, "rb"))
        try:
            try:
                self._zip = zipfile.ZipFile(self._raw)
            except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
                raise TorchFileError(f"{path}: damaged or truncated (not a complete zip archive: "
                                     f"{_one_line(exc)})") from None
            self._prefix = self._find_prefix()
            info = self._zip.getinfo(self._prefix + "data.pkl")
            if info.file_size > _MAX_PICKLE_BYTES:
                raise TorchFileError(f"{path}: its data.pkl is {info.file_size} bytes: not a list of tensors")
            self.root, self._storages = _unpickle(self._member(info.filename), path)
            self._big_endian = self._byteorder() == "big"
            self._check_storages()
            self._cache: tuple[str, int, int, torch.Tensor] | None = None
        except BaseException:
            self.close()
            raise

    def _find_prefix(self) -> str:
        pickles = [n for n in self._zip.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise TorchFileError(f"{self.path}: a zip archive but not a torch.save file (no single */data.pkl)")
        return pickles[0][: -len("data.pkl")]

    def _member(self, name: str) -> bytes:
        try:
            return self._zip.read(name)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, KeyError) as exc:
            raise TorchFileError(f"{self.path}: damaged: cannot read {name} ({_one_line(exc)})") from None
        except Exception as exc:  # noqa: BLE001 - zlib errors for a deflated member
            raise TorchFileError(f"{self.path}: damaged: cannot read {name} ({_one_line(exc)})") from None

    def _byteorder(self) -> str:
        name = self._prefix + "byteorder"
        if name not in self._zip.NameToInfo:
            return "little"  # written since torch 2.1; older files are little-endian
        order = self._member(name).decode("ascii", "replace").strip()
        if order not in ("little", "big"):
            raise TorchFileError(f"{self.path}: unknown byte order {order!r}")
        return order

    def _check_storages(self) -> None:
        self._limit = limit = memory_limit()
        for ref in self._storages.values():
            name = f"{self._prefix}data/{ref.key}"
            info = self._zip.NameToInfo.get(name)
            if info is None:
                raise TorchFileError(f"{self.path}: damaged: storage {ref.key} is referenced but missing")
            if info.file_size != ref.nbytes:
                raise TorchFileError(f"{self.path}: damaged: storage {ref.key} holds {info.file_size} bytes, "
                                     f"its description says {ref.nbytes}")
        for leaf in _leaves(self.root):
            if isinstance(leaf, TensorRef) and leaf.extent() > leaf.storage.numel:
                raise TorchFileError(f"{self.path}: damaged: a tensor of shape {list(leaf.shape)} reaches element "
                                     f"{leaf.extent()} of storage {leaf.storage.key}, which has {leaf.storage.numel}")
            # What a read allocates (the bytes of the storage it inflates, then the tensor), from the
            # description alone: refused before anything is read or allocated.
            start, end = leaf.span()
            need = max(end - start, leaf.numel() * _itemsize(leaf.dtype))
            if need > limit:
                raise TorchFileError(f"{self.path}: a tensor of shape {list(leaf.shape)} would take {_gb(need)} to "
                                     f"read, more than the {_gb(limit)} a read may use (half the memory available)")

    def _window(self, ref: StorageRef, start: int, end: int) -> torch.Tensor:
        """Bytes [start, end) of a storage as a flat tensor of its dtype; a storage is inflated only
        as far as `end` (a slice of a huge storage reads the slice). The CRC is checked whenever a
        read reaches the end of the member."""
        cached = self._cache
        if cached is not None and cached[0] == ref.key and cached[1] <= start and end <= cached[2]:
            a = (start - cached[1]) // _itemsize(ref.dtype)
            return cached[3][a: a + (end - start) // _itemsize(ref.dtype)]
        name = f"{self._prefix}data/{ref.key}"
        try:
            with self._zip.open(name) as member:
                if start:
                    member.seek(start)
                data = member.read(end - start)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, KeyError) as exc:
            raise TorchFileError(f"{self.path}: damaged: cannot read {name} ({_one_line(exc)})") from None
        except Exception as exc:  # noqa: BLE001 - zlib errors for a deflated member
            raise TorchFileError(f"{self.path}: damaged: cannot read {name} ({_one_line(exc)})") from None
        if len(data) != end - start:
            raise TorchFileError(f"{self.path}: damaged: {name} ends after {start + len(data)} bytes")
        if not data:
            flat = torch.empty(0, dtype=ref.dtype)
        else:
            with warnings.catch_warnings():  # a read-only buffer: we only ever copy out of it
                warnings.simplefilter("ignore", UserWarning)
                raw = torch.frombuffer(data, dtype=torch.uint8)
            if self._big_endian and _itemsize(ref.dtype) > 1:
                raw = raw.view(-1, _itemsize(ref.dtype)).flip(1).reshape(-1)
            flat = raw.view(ref.dtype)
        self._cache = (ref.key, start, end, flat)
        return flat

    def read(self, leaf: Leaf) -> torch.Tensor:
        """The tensor `leaf` describes (only the bytes of its storage it lies in), as an owned copy."""
        if isinstance(leaf, LoadedTensor):
            return leaf.tensor.contiguous().clone()
        if leaf.numel() == 0:
            return torch.empty(leaf.shape, dtype=leaf.dtype)
        start, end = leaf.span()
        # A storage used whole (every tensor torch.save writes from a parameter) is read whole,
        # so its CRC is checked; a storage larger than a read may take never is.
        if end - start > leaf.storage.nbytes // 2 and leaf.storage.nbytes <= self._limit:
            start, end = 0, leaf.storage.nbytes
        flat = self._window(leaf.storage, start, end)
        # as_strided counts from the start of the memory `flat` views, not from `flat` itself.
        offset = flat.storage_offset() + leaf.offset - start // _itemsize(leaf.dtype)
        return flat.as_strided(leaf.shape, leaf.stride, offset).clone(memory_format=torch.contiguous_format)

    def drop_cache(self) -> None:
        """Forget the last storage read (memory back to the caller's)."""
        self._cache = None

    @property
    def bytes_read(self) -> int:
        """Bytes read from disk so far (pickle, directory and every storage read)."""
        return self._raw.bytes_read

    def close(self) -> None:
        """Close the archive."""
        self._cache = None
        if getattr(self, "_zip", None) is not None:
            self._zip.close()
        self._raw.close()


class _LegacyTorchFile(TorchFile):
    """The pre-1.6 format, read whole by torch.load(weights_only=True) (torch's restricted unpickler)."""

    streaming = False

    def __init__(self, path: Path) -> None:
        self.path = path
        self._size = path.stat().st_size
        _legacy_prescan(path, self._size)
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            found = re.search(r"GLOBAL ([\w.]+)", str(exc))
            asked = f"asks to load '{found.group(1)}', which is not part of tensors in lists" if found else \
                f"is refused by torch's weights-only loader ({_one_line(exc)})"
            raise UnsafeTorchFile(f"{path}: refused: the file {asked} (nothing from the file was run; "
                                  "mctool reads only lists of tensors)") from None
        except RecursionError:
            raise TorchFileError(f"{path}: not a list of tensors (nesting too deep)") from None
        except MemoryError:
            raise TorchFileError(f"{path}: damaged or not a list of tensors (it declares more than memory "
                                 "holds)") from None
        except Exception as exc:  # noqa: BLE001 - truncated legacy files raise EOFError, RuntimeError, ...
            raise TorchFileError(f"{path}: damaged or not a torch file ({_one_line(exc)})") from None
        check_tensors_in_lists(obj, path)  # before anything walks it: no cycle, bounded depth and size
        self.root = _wrap(obj)
        limit = memory_limit()
        for leaf in _leaves(self.root):
            need = leaf.numel() * leaf.tensor.element_size()
            if need > limit:
                raise TorchFileError(f"{path}: a tensor of shape {list(leaf.shape)} would take {_gb(need)} to read, "
                                     f"more than the {_gb(limit)} a read may use (half the memory available)")

    def read(self, leaf: Leaf) -> torch.Tensor:
        """The tensor, copied out of the loaded file."""
        if not isinstance(leaf, LoadedTensor):
            raise TypeError("not a leaf of this file")
        return leaf.tensor.contiguous().clone()

    @property
    def bytes_read(self) -> int:
        """The whole file (it was loaded at once)."""
        return self._size


class _PlainUnpickler(pickle.Unpickler):
    """For the legacy format's header pickles (numbers, a dict of flags): no global at all."""

    def find_class(self, module: str, name: str) -> Any:
        raise _Refused(f"{module}.{name}")


def _legacy_prescan(path: Path, size: int) -> None:
    """What a legacy file declares, read with our restricted unpickler before torch.load sees it:
    torch.load allocates every storage at its declared size before reading its bytes, so a few
    bytes could ask for terabytes. The structure (cycles, depth, size), the storages' declared
    bytes against the file's, and each tensor's size against memory are checked here."""
    with _pickle_problems(path), open(path, "rb") as f:
        for _ in range(3):  # magic number, protocol version, system info
            _PlainUnpickler(f).load()
        unpickler = _Unpickler(f, legacy=True)
        root = unpickler.load()
        check_tensors_in_lists(root, path)
        _PlainUnpickler(f).load()  # the storage keys
        data_start = f.tell()
    # Each storage follows as an 8-byte element count and its bytes.
    declared = sum(8 + ref.nbytes for ref in unpickler.storages.values())
    if declared > size - data_start:
        raise TorchFileError(f"{path}: damaged or truncated: its storages declare {declared:,} bytes, the file holds "
                             f"{size - data_start:,} after its pickle")
    limit = memory_limit()
    for leaf in _leaves(root):
        need = leaf.numel() * _itemsize(leaf.dtype)
        if need > limit:
            raise TorchFileError(f"{path}: a tensor of shape {list(leaf.shape)} would take {_gb(need)} to read, "
                                 f"more than the {_gb(limit)} a read may use (half the memory available)")


def _wrap(obj: Any) -> Any:
    """A checked torch.load result (tensors in lists, no cycle) with tensors wrapped as
    LoadedTensor; iterative, a shared list is wrapped once (and stays shared)."""
    if isinstance(obj, torch.Tensor):
        return LoadedTensor(obj)
    done: dict[int, list[Any]] = {}
    stack: list[tuple[Any, bool]] = [(obj, False)]
    while stack:
        node, finished = stack.pop()
        if finished:
            done[id(node)] = [LoadedTensor(c) if isinstance(c, torch.Tensor) else done[id(c)] for c in node]
        elif id(node) not in done:
            stack.append((node, True))
            stack.extend((c, False) for c in node if not isinstance(c, torch.Tensor) and id(c) not in done)
    return done[id(obj)]


def _leaves(root: Any) -> Iterator[Leaf]:
    stack = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, (TensorRef, LoadedTensor)):
            yield node
        elif isinstance(node, (list, tuple)):
            stack.extend(node)


def open_torch_file(path: str | Path) -> TorchFile:
    """Open a torch.save file for reading tensors in lists; TorchFileError (one line) if it cannot be."""
    p = Path(path)
    if not p.is_file():
        raise TorchFileError(f"{p}: no such file")
    try:
        with open(p, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise TorchFileError(f"{p}: cannot read ({exc.strerror or exc})") from None
    if head == _ZIP_MAGIC:
        tf: TorchFile = _ZipTorchFile(p)
    elif head[:1] == bytes([_PICKLE_PROTO]):
        tf = _LegacyTorchFile(p)
    elif not head:
        raise TorchFileError(f"{p}: empty file")
    else:
        raise TorchFileError(f"{p}: not a torch.save file")
    try:
        check_tensors_in_lists(tf.root, p)
    except BaseException:
        tf.close()
        raise
    return tf
