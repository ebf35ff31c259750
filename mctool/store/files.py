"""Artifact files: open with every check, create, rewrite atomically, append rows in place.

Three ways to write, each safe against a crash at any instant (SIGKILL included):

* ``create(path)`` writes a new file under a temporary name and moves it into place
  (``os.replace``): a reader sees no file, or the whole new one.
* ``rewrite(path)`` copies the existing file to a temporary name, lets the caller change the
  copy, then moves it into place: a reader sees the old file or the new one, never a mix.
  HDF5 has no journal, so changing a file's structure in place (adding or deleting groups)
  can leave a damaged B-tree when the process dies mid-flush; a copy costs one write of the
  file and keeps the old one intact until the new one is complete. Mode and owner survive.
* ``append(path)`` opens a file for writing raw values into storage that was allocated when
  the file was created (expert rows): such writes change no HDF5 metadata, and a row counts
  only once its ``done`` flag — one byte, written after the row is flushed — is set.

A writer killed inside ``create``/``rewrite`` leaves its temporary ``.NAME.XXXX.tmp`` beside the
file (never in its place); the next write to the same file removes such leftovers, telling
them from a live writer's by a lock each writer holds on its own temporary.

Every open first refuses what an artifact must never contain: links to other files or
elsewhere (external and soft links), external raw storage, virtual datasets, filters that
HDF5 would load from a plugin, huge attributes, and more objects than an artifact could hold.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import glob
import json
import os
import platform
import shutil
import stat as stat_module
import struct
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import h5py
import numpy as np
import torch

from mctool import __version__
from mctool.core.allocator import malloc_tuned
from mctool.core.errors import ArtifactError, DiskFull, FileBusy, is_disk_full
from mctool.core.text import clean_text

FORMAT = "mctool"
FORMAT_VERSION = 1

# Sane limits: far above any real artifact, far below what would exhaust a machine.
MAX_OBJECTS = 10_000
MAX_ATTRIBUTE_BYTES = 16 << 20
MAX_ATTRIBUTES = 256  # per object; mctool writes about a dozen
# HDF5's built-in filters (deflate, shuffle, fletcher32, szip, nbit, scale-offset) and h5py's
# LZF. Any other filter id makes HDF5 search its plugin path for a shared library to load.
SAFE_FILTERS = frozenset({1, 2, 3, 4, 5, 6, 32000})

# Group -> the command that creates it, for "run X first" hints.
PRODUCERS = {
    "dataset": "mctool experts DATASET",
    "model": "mctool experts DATASET",
    "experts": "mctool experts DATASET",
    "convex": "mctool convexify FILE",
    "synsets": "mctool distill --buffer FILE",
}


def now_iso() -> str:
    """Current UTC time, ISO-8601, seconds precision."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def versions() -> dict[str, str]:
    """Versions recorded in every product (provenance)."""
    return {
        "mctool": __version__,
        "torch": torch.__version__,
        "h5py": h5py.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        # CPU float round-off depends on the thread count, so bit-exact reruns need the same one.
        "torch_threads": str(torch.get_num_threads()),
        "malloc": "tuned" if malloc_tuned() else "default",  # speed only, never the numbers
    }


def provenance(config: dict[str, Any], seed: int | None, source: dict[str, Any] | None = None) -> dict[str, Any]:
    """The attributes every product group carries: config, argv, seed, versions, source, date."""
    return {
        "config": json.dumps(config, sort_keys=True),
        "argv": json.dumps(sys.argv),
        "seed": -1 if seed is None else int(seed),
        "versions": json.dumps(versions()),
        "source": json.dumps(source or {}),
        "created": now_iso(),
    }


def shown(path: str | os.PathLike[str]) -> str:
    """A path as messages show it (cleaned: a file name can hold escape sequences too)."""
    return clean_text(str(path))


def ensure_free_space(path: str | os.PathLike[str], needed: int, what: str, metadata: bool = True) -> None:
    """Refuse to start a write that cannot fit: HDF5 fails badly (even crashes) on a full disk,
    so writers check first and stop with one line while every file is still intact.

    `metadata=False`: raw values written into storage allocated earlier (`append`), which adds
    no HDF5 metadata, so only the values' own blocks are needed."""
    folder = Path(path).resolve().parent
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    # HDF5 metadata and slack; raw rows need at most a partly filled block at either end.
    want = int(needed * 1.05) + (1 << 20) if metadata else needed + (1 << 16)
    if free < want:
        raise DiskFull(f"disk full: {what} needs about {want / 1e6:.1f} MB in {shown(folder)} but only "
                       f"{free / 1e6:.1f} MB are free; free space and run the same command again "
                       "(finished work is kept)")


# --------------------------------------------------------------------------- opening


def _os_problem(path: Path, exc: OSError) -> ArtifactError | FileBusy:
    """One line for an OSError raised while opening `path`: permission, lock or damage."""
    text = str(exc)
    if exc.errno == errno.EACCES or "Permission denied" in text:
        return ArtifactError(f"{shown(path)}: permission denied")
    if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK) or "unable to lock file" in text:
        return FileBusy(f"{shown(path)}: in use by another process (another mctool still writing it?); "
                        "wait for it to finish and run the command again")
    return ArtifactError(f"{shown(path)}: unreadable HDF5 file (truncated or damaged?): {clean_text(text)}")


@contextlib.contextmanager
def reading(path: str | os.PathLike[str]) -> Iterator[None]:
    """Around the store's own reads: what HDF5 raises on damaged metadata or data (OSError,
    KeyError, RuntimeError with HDF5's message) becomes one line naming the file."""
    try:
        yield
    except OSError as exc:
        raise _os_problem(Path(path), exc) from None
    except (KeyError, RuntimeError, UnicodeError) as exc:  # UnicodeError: a damaged name
        raise ArtifactError(f"{shown(path)}: unreadable HDF5 file (truncated or damaged?): "
                            f"{clean_text(str(exc))[:200]}") from None


def _check_root(path: Path, f: h5py.File) -> None:
    fmt = f.attrs.get("format")
    if isinstance(fmt, bytes):
        fmt = fmt.decode(errors="replace")
    if fmt != FORMAT:
        raise ArtifactError(f"{shown(path)}: an HDF5 file, but not an mctool artifact (no format='mctool' stamp)")
    version = f.attrs.get("format_version")
    if isinstance(version, (bool, np.bool_)) or not isinstance(version, (int, np.integer)):
        raise ArtifactError(f"{shown(path)}: / attribute 'format_version' must be an integer, "
                            f"got {clean_text(repr(version))[:40]}")
    if version > FORMAT_VERSION:
        raise ArtifactError(f"{shown(path)}: format_version {version} is newer than this mctool understands "
                            f"({FORMAT_VERSION}); upgrade mctool")
    if version < 1:
        raise ArtifactError(f"{shown(path)}: invalid format_version {version}")
    for key in ("mctool_version", "created", "artifact_id"):  # optional, but text when present
        if key in f.attrs and not isinstance(f.attrs[key], (str, bytes)):
            raise ArtifactError(f"{shown(path)}: / attribute '{key}' must be text, "
                                f"got {clean_text(repr(f.attrs[key]))[:40]}")


def _check_attributes(path: Path, obj: h5py.HLObject, where: str) -> None:
    if len(obj.attrs) > MAX_ATTRIBUTES:
        raise ArtifactError(f"{shown(path)}: {clean_text(where) or '/'} has {len(obj.attrs)} attributes; not an "
                            "artifact mctool wrote")
    for name in obj.attrs:
        size = h5py.h5a.open(obj.id, name.encode() if isinstance(name, str) else name).get_storage_size()
        if size > MAX_ATTRIBUTE_BYTES:
            raise ArtifactError(f"{shown(path)}: {clean_text(where)} attribute '{clean_text(name)}' takes "
                                f"{size / 1e6:.0f} MB; refusing to read it (an artifact's attributes are small)")


def _check_dataset(path: Path, ds: h5py.Dataset, where: str) -> None:
    if ds.external:
        raise ArtifactError(f"{shown(path)}: {clean_text(where)} keeps its data in other files (HDF5 external "
                            "storage); an artifact must hold its own data — refusing to read or write it")
    if ds.is_virtual:
        raise ArtifactError(f"{shown(path)}: {clean_text(where)} is a virtual dataset that maps other files; "
                            "refusing it")
    offset = ds.id.get_offset()  # contiguous data: where it starts in the file (None: chunked or unwritten)
    if offset is not None and offset + ds.id.get_storage_size() > path.stat().st_size:
        raise ArtifactError(f"{shown(path)}: {clean_text(where)} extends past the end of the file (truncated?)")
    plist = ds.id.get_create_plist()
    for i in range(plist.get_nfilters()):
        code = plist.get_filter(i)[0]
        if code not in SAFE_FILTERS:
            raise ArtifactError(f"{shown(path)}: {clean_text(where)} needs HDF5 filter {code}, which HDF5 would "
                                "load from a plugin library; refusing it")


def check_contents(path: Path, f: h5py.File) -> None:
    """Refuse links out of the file, external/virtual storage, plugin filters, huge attributes."""
    count = 0
    _check_attributes(path, f, "/")
    pending: list[tuple[str, h5py.Group]] = [("", f)]
    seen = {f.id}  # groups reached: a second hard link to one makes a cycle (or a tangle), never a tree
    while pending:
        prefix, group = pending.pop()
        for name in group:
            count += 1
            if count > MAX_OBJECTS:
                raise ArtifactError(f"{shown(path)}: holds more than {MAX_OBJECTS} objects; not an artifact "
                                    "mctool wrote")
            where = f"{prefix}/{name}"
            link = group.get(name, getlink=True)
            if isinstance(link, h5py.ExternalLink):
                raise ArtifactError(f"{shown(path)}: {clean_text(where)} is a link to another file "
                                    f"({clean_text(link.filename)}); an artifact must be self-contained — refusing it")
            if not isinstance(link, h5py.HardLink):
                raise ArtifactError(f"{shown(path)}: {clean_text(where)} is a {type(link).__name__}; artifacts "
                                    "hold only plain groups and datasets — refusing it")
            obj = group[name]
            _check_attributes(path, obj, where)
            if isinstance(obj, h5py.Group):
                if obj.id in seen:
                    raise ArtifactError(f"{shown(path)}: {clean_text(where)} links back to a group already in the "
                                        "file; artifacts are plain trees — refusing it")
                seen.add(obj.id)
                pending.append((where, obj))
            elif isinstance(obj, h5py.Dataset):
                _check_dataset(path, obj, where)


# Where `_check_global_heaps` looks: the whole file up to this size, else its first and last
# _HEAP_WINDOW bytes (where HDF5 puts the metadata of a file's creation and of later rewrites).
_HEAP_SCAN_WHOLE = 512 << 20
_HEAP_WINDOW = 64 << 20


def _check_global_heaps(path: Path) -> None:
    """Refuse a file whose HDF5 global heap collections (where variable-length strings live) are
    damaged inside: HDF5 (2.0.0) loops forever reading a string from a collection whose object
    sizes do not tile it, so each collection is walked here the way HDF5 walks it first.

    A collection is "GCOL", version 1, 3 reserved bytes, its size (8 bytes, at least 4096), then
    objects: index (2), reference count (2), reserved (4), size (8), data padded to 8 bytes —
    object 0 is the free space, its size counting its own header. Bytes that merely look like
    a collection's signature (not version 1, or a size that does not fit the file) are not one."""
    size = path.stat().st_size
    if size < 16:
        return
    with open(path, "rb") as fh:
        m = _FileBytes(fh, size)
        spans = [(0, size)] if size <= _HEAP_SCAN_WHOLE else [(0, _HEAP_WINDOW), (size - _HEAP_WINDOW, size)]
        for lo, hi in spans:
            at = m.find(b"GCOL", lo, hi)
            while at >= 0:
                length = int.from_bytes(m[at + 8:at + 16], "little") if at + 16 <= size else 0
                if at + 16 <= size and m[at + 4] == 1 and 4096 <= length <= size - at:
                    _walk_collection(path, m, at, at + length)
                at = m.find(b"GCOL", at + 4, hi)


class _FileBytes:
    """A file's bytes by offset, read through a window of plain reads, never mapped: on tmpfs a
    fault on a mapped page the file has not written yet (an expert buffer's rows to come) takes
    a page of memory, and on a full tmpfs kills the process with SIGBUS; a read returns zeros."""

    WINDOW = 4 << 20

    def __init__(self, fh: BinaryIO, size: int) -> None:
        self.fh, self.size = fh, size
        self.lo, self.buf = 0, b""

    def _load(self, lo: int, hi: int) -> int:
        """Make bytes [lo, hi) part of the window (as far as the file holds them); returns their
        offset in it."""
        if lo < self.lo or hi > self.lo + len(self.buf):
            self.fh.seek(lo)
            self.lo, self.buf = lo, self.fh.read(max(self.WINDOW, hi - lo))
        return lo - self.lo

    def __getitem__(self, key: int | slice) -> Any:
        if isinstance(key, int):
            return self[key:key + 1][0]
        lo, hi = max(key.start, 0), min(key.stop, self.size)
        at = self._load(lo, hi)
        return self.buf[at:at + max(hi - lo, 0)]

    def find(self, sub: bytes, lo: int, hi: int) -> int:
        """Where `sub` first lies wholly within [lo, hi), or -1 (as bytes.find). Searches the
        window already read while `lo` is in it: a file full of false signatures costs one read
        per window, not one per signature."""
        n = len(sub)
        if not 0 < n <= self.WINDOW:
            raise ValueError(f"cannot search for {n} bytes")
        hi = min(hi, self.size)
        while hi - lo >= n:
            if not (self.lo <= lo and lo + n <= self.lo + len(self.buf)):
                self._load(lo, min(hi, lo + self.WINDOW))
                if len(self.buf) < n:  # the file ended before its stated size (it shrank)
                    return -1
            end = min(hi, self.lo + len(self.buf))
            found = self.buf.find(sub, lo - self.lo, end - self.lo)
            if found >= 0:
                return self.lo + found
            lo = end - n + 1  # a match may straddle the window's end; lo advances by ≥ 1
        return -1


def _walk_collection(path: Path, m: Any, begin: int, end: int) -> None:
    p = begin + 16
    while end - p >= 16:  # fewer bytes left than a header: slack, as HDF5 takes it
        index = int.from_bytes(m[p:p + 2], "little")
        length = int.from_bytes(m[p + 8:p + 16], "little")
        need = 16 + (length + 7) // 8 * 8 if index else length
        if need < 16 or need > end - p:
            raise ArtifactError(f"{shown(path)}: unreadable HDF5 file (truncated or damaged?): the global heap "
                                f"collection at byte {begin} is damaged (an object of {length} bytes at byte {p})")
        p += need


def _exists(p: Path) -> bool:
    """Whether `p` exists; a folder on the way the user may not enter is a permission problem."""
    try:
        p.stat()
    except FileNotFoundError:
        return False
    except PermissionError:
        raise ArtifactError(f"{shown(p)}: permission denied (cannot reach it)") from None
    except NotADirectoryError:
        return False
    return True


def _open_h5(path: Path, mode: str) -> h5py.File:
    try:
        return h5py.File(path, mode)
    except OSError as exc:
        raise _os_problem(path, exc) from None


@contextlib.contextmanager
def open_artifact(path: str | os.PathLike[str], mode: str = "r") -> Iterator[h5py.File]:
    """Open an existing artifact read-only (or 'r+' for `append`) after checking that it is an
    mctool artifact, readable, and holds nothing that points outside it."""
    p = Path(path)
    if not _exists(p):
        raise ArtifactError(f"{shown(p)}: no such file")
    if p.is_dir():
        raise ArtifactError(f"{shown(p)}: is a directory, not an artifact file")
    if not os.access(p, os.R_OK):
        raise ArtifactError(f"{shown(p)}: permission denied (cannot read it)")
    try:
        ok = h5py.is_hdf5(p)
    except OSError as exc:
        raise _os_problem(p, exc) from None
    if not ok:
        raise ArtifactError(f"{shown(p)}: not an HDF5 file")
    _check_global_heaps(p)
    f = _open_h5(p, mode)
    try:
        with reading(p):
            _check_root(p, f)
            check_contents(p, f)
        yield f
    finally:
        f.close()


def require_group(path: str | os.PathLike[str], f: h5py.File, name: str) -> h5py.Group:
    """The group `name`, or an ArtifactError saying which command creates it."""
    if name in f and not isinstance(f[name], h5py.Group):
        raise ArtifactError(f"{shown(path)}: /{clean_text(name)} must be a group, got a dataset")
    if name not in f:
        if name in ("experts", "convex") and "synsets" in f and "experts" not in f and "convex" not in f:
            raise ArtifactError(f"{shown(path)}: a synset file (holds synthetic sets), not a buffer of experts")
        hint = PRODUCERS.get(name.split("/")[0], "")
        hint = f" — run `{hint}` first" if hint else ""
        raise ArtifactError(f"{shown(path)}: no /{name} group{hint}")
    return f[name]


def contents(f: h5py.File) -> str:
    """What an artifact holds, in words, for messages."""
    held = [words for key, words in (("experts/trajectories", "expert trajectories"),
                                     ("convex", "convexified experts"), ("synsets", "synthetic sets")) if key in f]
    return " and ".join(held) or "nothing yet"


def stamp(f: h5py.File) -> None:
    """Stamp the root of a freshly created artifact."""
    f.attrs["format"] = FORMAT
    f.attrs["format_version"] = FORMAT_VERSION
    f.attrs["mctool_version"] = __version__
    f.attrs["created"] = now_iso()
    f.attrs["artifact_id"] = uuid.uuid4().hex


def fingerprint(path: str | os.PathLike[str], f: h5py.File) -> dict[str, Any]:
    """How a product names its source: file path, the source's artifact id and what it held."""
    ident = f.attrs.get("artifact_id", "")
    info: dict[str, Any] = {"file": str(Path(path).resolve()),
                            "artifact_id": clean_text(ident.decode() if isinstance(ident, bytes) else str(ident))}
    if "experts/done" in f and isinstance(f["experts/done"], h5py.Dataset) and f["experts/done"].ndim == 1:
        info["experts_done"] = int(np.count_nonzero(f["experts/done"][()]))
    return info


# --------------------------------------------------------------------------- writing


# A byte far beyond any real file: the writers' lock covers it alone, so it never meets HDF5's
# own locks (flock on the whole file) nor a reader.
_LOCK_OFFSET = 1 << 62


# Another byte: a writer's lock on its own temporary file (see `_temporary`).
_TMP_LOCK_OFFSET = _LOCK_OFFSET - 1
# A temporary younger than this is never swept: it may be between its creation and its lock.
_TMP_GRACE_S = 2.0


def _try_lock(fd: int, offset: int) -> bool:
    """Take an exclusive OFD lock on byte `offset` of `fd`: False when another holds it.

    OFD locks (Linux) belong to this descriptor only, so opening and closing the file elsewhere
    in the process (copying it, h5py) does not drop the lock as it would a classic POSIX lock."""
    request = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, request)  # type: ignore[attr-defined]
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _have_ofd_locks() -> bool:
    return getattr(fcntl, "F_OFD_SETLK", None) is not None


# A third byte, taken by a writer that holds the file for a whole run (`holding`): a write that
# finds it taken is refused at once instead of waiting for a run that may last hours.
_HOLD_OFFSET = _LOCK_OFFSET - 2
# How long a write waits for another process's short write (one rewrite) to finish.
WAIT_S = 10.0

# Files this process holds for a run: absolute path -> the descriptor whose locks cover the file
# now at that path (None until the run first creates it). The locks move to each new file a
# rewrite puts in place (`_finish`), so they cover the path for the whole run.
_held: dict[str, int | None] = {}


def _key(target: Path) -> str:
    return os.path.abspath(target)


def _held_by_other(fd: int, offset: int) -> bool:
    """Whether another open file description holds a lock on byte `offset` (F_OFD_GETLK)."""
    request = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0)
    answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, request)  # type: ignore[attr-defined]
    return struct.unpack("hhqqi4x", answer)[0] != fcntl.F_UNLCK


def _busy(target: Path, run: bool) -> FileBusy:
    who = "another mctool run (distill or experts) is writing it" if run else "another mctool is writing it"
    return FileBusy(f"{shown(target)}: in use by another process ({who}); wait for it to finish and run the command "
                    "again (nothing was changed)")


def _acquire(target: Path, wait: float, hold: bool = False) -> int | None:
    """A descriptor of the file now at `target` holding its writer lock (and the run lock when
    `hold`), or None when there is no file. Refused (FileBusy) at once when a run holds it, after
    `wait` seconds when another write does not finish. The lock is checked to cover the file
    still at `target` (a rewrite may have replaced it in between)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            fd = os.open(target, os.O_RDWR | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ArtifactError(f"{shown(target)}: is a symbolic link; mctool writes only files it can replace "
                                    "(never through a link) — pass the real path") from None
            raise _os_problem(target, exc) from None
        try:
            if _held_by_other(fd, _HOLD_OFFSET):
                raise _busy(target, run=True)
            if _try_lock(fd, _LOCK_OFFSET) and (not hold or _try_lock(fd, _HOLD_OFFSET)):
                st, now = os.fstat(fd), _stat_or_none(target)
                if now is not None and (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino):
                    return fd
                os.close(fd)  # replaced meanwhile: lock the new file
                continue
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        if time.monotonic() >= deadline:
            raise _busy(target, run=False)
        time.sleep(0.05)


def _stat_or_none(target: Path) -> os.stat_result | None:
    try:
        return os.stat(target, follow_symlinks=False)
    except OSError:
        return None


@contextlib.contextmanager
def _writer_lock(target: Path, wait: float = 0.0) -> Iterator[None]:
    """Hold an exclusive lock on `target` while writing it: a second mctool writing the same file
    at once waits up to `wait` seconds for it, then is refused, instead of one of the two changes
    being lost. A file this process holds for a run (`holding`) is already locked. Where OFD
    locks do not exist the write goes on unlocked."""
    if _key(target) in _held or not _have_ofd_locks():
        yield
        return
    fd = _acquire(target, wait)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


@contextlib.contextmanager
def holding(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the writer lock of `path` for a whole run (distill, experts): every other mctool's
    write to the file — evaluate storing its scores, convexify, a second run — is refused with
    one line while the run lasts, even between the run's own writes, so none is lost under the
    run's next checkpoint. The lock follows the file as each rewrite replaces it."""
    target = Path(path)
    key = _key(target)
    if key in _held or not _have_ofd_locks():
        yield
        return
    _held[key] = _acquire(target, 0.0, hold=True)
    try:
        yield
    finally:
        fd = _held.pop(key, None)
        if fd is not None:
            os.close(fd)


def _move_hold(tmp: Path, target: Path) -> int | None:
    """Before `tmp` replaces a held `target`: lock `tmp` for the run (returns its descriptor)."""
    if _key(target) not in _held:
        return None
    fd = os.open(tmp, os.O_RDWR | os.O_NOFOLLOW)
    _try_lock(fd, _LOCK_OFFSET)  # a fresh file only this process knows: both locks are free
    _try_lock(fd, _HOLD_OFFSET)
    return fd


def _moved_hold(target: Path, fd: int | None) -> None:
    """After the replacement: the run's locks are those on the new file."""
    if fd is None:
        return
    old = _held.get(_key(target))
    _held[_key(target)] = fd
    if old is not None:
        os.close(old)


def refuse_link(path: str | os.PathLike[str]) -> None:
    """Refuse an output path that is a symbolic link (one line, exit 2): mctool never writes
    through a link, and replacing one someone else planted would be as surprising."""
    p = Path(path)
    if _is_link(p):
        raise ArtifactError(f"{shown(p)}: is a symbolic link; mctool writes only files it can replace (never through "
                            "a link) — pass the real path, or remove the link")


def _is_link(p: Path) -> bool:
    """Whether `p` is a symbolic link; a folder on the way the user may not enter is a permission problem."""
    try:
        return stat_module.S_ISLNK(os.lstat(p).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except PermissionError:
        raise ArtifactError(f"{shown(p)}: permission denied (cannot reach it)") from None


def check_writable(path: str | os.PathLike[str]) -> None:
    """Refuse, before any work, a target that cannot be written (the file or its folder) or that
    another mctool is writing now.

    Root may write any file, so os.access says yes to everything there; a file whose mode gives
    no one write permission (0444) is still refused, as `rm` asks before removing one: the mode
    says the file is not to be changed, and a rewrite would replace it."""
    p = Path(path)
    refuse_link(p)
    folder = p.resolve().parent
    if _exists(p):
        if p.is_dir():
            raise ArtifactError(f"{shown(p)}: is a directory, not an artifact file")
        if not os.access(p, os.W_OK):
            raise ArtifactError(f"{shown(p)}: permission denied (the file is read-only for you); nothing was changed")
        mode = p.stat().st_mode
        if os.geteuid() == 0 and not mode & 0o222:
            raise ArtifactError(f"{shown(p)}: permission denied (the file is read-only, mode {mode & 0o7777:04o}; "
                                f"mctool does not override that even as root — `chmod u+w` it first); nothing was "
                                "changed")
        with _writer_lock(p):  # held by another mctool: refused now, not after the work
            pass
    probe = folder
    while not probe.exists():  # missing folders are created: the first existing one must be writable
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ArtifactError(f"{shown(p)}: permission denied (cannot write in {shown(probe)}); nothing was changed")


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _new_file_mode() -> int:
    """0666 minus the umask: the mode `open()` gives a new file (mkstemp makes 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _finish(tmp: Path, target: Path) -> None:
    """Make `tmp` durable, give it the target's mode (and owner where allowed), move it into place."""
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    st = _stat_or_none(target)
    if st is not None and not os.path.islink(target):
        os.chmod(tmp, st.st_mode & 0o7777)
        with contextlib.suppress(OSError):  # only root may give a file to someone else
            os.chown(tmp, st.st_uid, st.st_gid)
    else:
        os.chmod(tmp, _new_file_mode())  # a new product gets ordinary permissions
    held = _move_hold(tmp, target)
    os.replace(tmp, target)
    _moved_hold(target, held)
    _fsync_dir(target.parent)


def temporaries(target: str | os.PathLike[str]) -> list[Path]:
    """The temporary files of writes to `target` in its folder (live or left by a killed writer)."""
    t = Path(target)
    return sorted(t.parent.glob(f".{glob.escape(t.name)}.*.tmp"))


def _sweep(target: Path) -> None:
    """Remove the temporaries of `target` that killed writers left behind (a rewrite of a large
    buffer leaves one as large as the buffer). A live writer holds a lock on its own."""
    if not _have_ofd_locks():
        return
    for p in temporaries(target):
        try:
            if not p.name.endswith(_LOCKED_SUFFIX) and time.time() - p.lstat().st_mtime < _TMP_GRACE_S:
                continue  # made by mkstemp: may be between its creation and its lock
            fd = os.open(p, os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            if _try_lock(fd, _TMP_LOCK_OFFSET):
                p.unlink(missing_ok=True)
        except OSError:
            pass
        finally:
            os.close(fd)


# The name ending of a temporary that was locked before it had a name (see `_new_temporary`):
# one without a live lock is always a killed writer's, whatever its age.
_LOCKED_SUFFIX = ".l.tmp"


def _new_temporary(target: Path) -> tuple[int, Path]:
    """A new temporary file beside `target` and its descriptor, holding the temporary's lock.

    Where Linux offers it, the file is created without a name (O_TMPFILE), locked, then linked
    under its name, so no instant exists where it has a name and no lock, and the next write
    removes it as soon as its writer is gone; elsewhere mkstemp, then the lock (a sweep spares
    such a file for 2 s)."""
    folder = target.parent
    if getattr(os, "O_TMPFILE", None) is not None and _have_ofd_locks():
        try:
            fd = os.open(folder, os.O_TMPFILE | os.O_RDWR, 0o600)
        except OSError:
            fd = -1
        if fd >= 0:
            _try_lock(fd, _TMP_LOCK_OFFSET)
            dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                for _ in range(16):
                    name = f".{target.name}.{uuid.uuid4().hex[:8]}{_LOCKED_SUFFIX}"
                    try:  # linkat(AT_SYMLINK_FOLLOW) of the descriptor's /proc entry names the file
                        os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=dir_fd, follow_symlinks=True)
                        return fd, folder / name
                    except FileExistsError:
                        continue
                    except OSError:
                        break  # no /proc: the plain way
            finally:
                os.close(dir_fd)
            os.close(fd)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    if _have_ofd_locks():
        _try_lock(fd, _TMP_LOCK_OFFSET)
    return fd, Path(tmp)


@contextlib.contextmanager
def _temporary(target: Path) -> Iterator[Path]:
    """A temporary file beside `target`, locked while this process writes it, removed unless it
    was moved into place (a SIGKILL leaves it; the next write to `target` sweeps it)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _sweep(target)
    fd, tmp = _new_temporary(target)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def _closing(f: h5py.File) -> Iterator[None]:
    """Close `f`, the HDF5 file of a temporary, after the body; when the body or the close fails
    (a full disk), abandon it instead: HDF5 (2.0) keeps a file whose flush failed open and
    flushes it again at exit, where a write failing once more crashes the process (SIGSEGV)
    after mctool said what went wrong. The temporary is discarded, so its descriptor is pointed
    at an anonymous file in memory first, where HDF5's last writes (metadata) cannot fail."""
    fd, inode = -1, None
    if f.driver == "sec2":  # HDF5's default; another driver (HDF5_DRIVER) has no POSIX descriptor
        with contextlib.suppress(OSError, ValueError, TypeError):
            fd = f.id.get_vfd_handle()  # asked now: after a failed flush, asking HDF5 crashes
            inode = (os.fstat(fd).st_dev, os.fstat(fd).st_ino)
    lost: list[BaseException] = []
    previous = sys.unraisablehook

    def watch(unraisable: Any) -> None:  # h5py only reports what fails while it closes an object
        if unraisable.exc_value is not None and is_disk_full(unraisable.exc_value):
            lost.append(unraisable.exc_value)
        previous(unraisable)

    sys.unraisablehook = watch
    try:
        try:
            yield
        finally:
            sys.unraisablehook = previous
        if lost:  # a write the disk could not hold: the temporary must not take the file's place
            raise lost[0]
        f.flush()  # what fails on a full disk fails here, while the file is still whole in HDF5
        f.close()
    except BaseException:
        with contextlib.suppress(Exception):
            st = os.fstat(fd)
            if inode is not None and (st.st_dev, st.st_ino) == inode:  # still HDF5's descriptor of the temporary
                spare = os.memfd_create("mctool-abandoned")  # Linux; elsewhere the plain close
                try:
                    os.dup2(spare, fd)
                finally:
                    os.close(spare)
        with contextlib.suppress(Exception):
            f.close()
        raise


@contextlib.contextmanager
def create(path: str | os.PathLike[str]) -> Iterator[h5py.File]:
    """Write a new artifact at `path` (replacing what is there: callers decide whether they may)."""
    target = Path(path)
    check_writable(target)
    with _temporary(target) as tmp, _writer_lock(target, WAIT_S):
        f = h5py.File(tmp, "w")
        with _closing(f):
            stamp(f)
            yield f
        _finish(tmp, target)


# Reading every group is the job of the layers above this module (store.summary): it registers
# its check here rather than this module importing it, so the store's imports stay one-way.
_whole_file_check: Callable[[Path], object] | None = None


def set_whole_file_check(check: Callable[[Path], object]) -> None:
    """Register the validation `rewrite` runs on a file before changing it."""
    global _whole_file_check
    _whole_file_check = check


@contextlib.contextmanager
def rewrite(path: str | os.PathLike[str], extra_bytes: int = 0) -> Iterator[h5py.File]:
    """Change an existing artifact as a whole: a copy is changed, then moved into place.

    `extra_bytes` is what the change adds (checked against the free space with the copy)."""
    target = Path(path)
    check_writable(target)
    # Ours, readable, harmless and valid throughout before anything is copied: a rewrite never
    # carries a damaged group into a file that looks freshly written.
    assert _whole_file_check is not None, "mctool.store.summary registers the check when mctool.store is imported"
    _whole_file_check(target)
    ensure_free_space(target, target.stat().st_size + extra_bytes, f"rewriting {target.name}")
    with _temporary(target) as tmp, _writer_lock(target, WAIT_S):
        shutil.copyfile(target, tmp)
        f = _open_h5(tmp, "r+")
        with _closing(f):
            yield f
        _finish(tmp, target)


@contextlib.contextmanager
def append(path: str | os.PathLike[str]) -> Iterator[h5py.File]:
    """Open an artifact to write raw values into storage allocated at creation (see the module
    docstring); callers never add or remove HDF5 objects through it."""
    target = Path(path)
    check_writable(target)
    with _writer_lock(target, WAIT_S), open_artifact(target, "r+") as f:
        yield f


def write_atomically(path: str | os.PathLike[str], data: bytes | str | Callable[[BinaryIO], object]) -> Path:
    """Write the whole file `path` so that a reader, or a kill at any instant, finds the old file
    or the new one, never a mix, and nothing is written anywhere else.

    `data` (bytes, text written as UTF-8, or a function writing to the open binary file) goes
    to a temporary file beside `path`, created exclusively (so never through a planted link),
    is fsynced, given the mode of the file it replaces (a new file: 0666 minus the umask, like
    `open`) and renamed over `path`; the folder is fsynced. A symbolic link or a folder at
    `path` is refused (ArtifactError, one line). A killed writer's temporary (``.NAME.XXXX.tmp``)
    is removed by the next write of the same path. Callers decide whether `path` may be replaced
    at all (an input, a file of another kind)."""
    target = Path(path)
    refuse_link(target)
    if target.is_dir():
        raise ArtifactError(f"{shown(target)}: is a folder, not a file; nothing was changed")
    with _temporary(target) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW)
        with os.fdopen(fd, "wb") as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data.encode("utf-8") if isinstance(data, str) else data)
        _finish(tmp, target)
    return target
