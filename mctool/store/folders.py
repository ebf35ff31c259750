"""Write a folder as a whole: build it beside its place, then swap it in at once.

A folder of several files (an export: images, labels, lr and the JSON describing them) cannot be
replaced file by file without a moment where new images sit beside old labels. So the new
folder is built as a private *stage* beside the target (``.NAME.XXXX.stage``, mode 0700 until it
is complete, files created exclusively and fsynced), then exchanged with the old folder in one
``renameat2(RENAME_EXCHANGE)`` (Linux; a fresh target is a plain rename), and the old folder —
now at the stage's name — is removed. A kill at any instant leaves the old folder or the new
one at the target's name; a stage left by a killed writer is removed by the next write of the
same target (a live writer holds an ``flock`` on its stage, which tells them apart).

Where the file system cannot exchange two names, the old folder is first renamed aside
(``.NAME.XXXX.old``) and the new one renamed in: a kill between the two leaves no folder at the
target's name, and the next write of the same target puts the old one back before anything else.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from mctool.store.files import _fsync_dir, _is_link, shown
from mctool.core.errors import ArtifactError, FileBusy

STAGE_SUFFIX = ".stage"
OLD_SUFFIX = ".old"
_MARK = ".mctool-stage"  # the first file of every stage: a folder without it is not one of ours
_AT_FDCWD = -100
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """rename(2) with `flags`; False where the C library or the file system does not offer them."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(dst))


def _pattern(target: Path, suffix: str) -> re.Pattern[str]:
    return re.compile(rf"^\.{re.escape(target.name)}\.[A-Za-z0-9_]+{re.escape(suffix)}$")


def _leftovers(target: Path, suffix: str) -> list[Path]:
    pat = _pattern(target, suffix)
    try:
        names = os.listdir(target.parent)
    except OSError:
        return []
    return sorted(target.parent / n for n in names if pat.match(n))


def _real_dir(p: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(p).st_mode)
    except OSError:
        return False


def sweep(target: Path, is_ours: Callable[[Path], bool]) -> None:
    """Before writing `target`: put back an old folder a killed swap left aside, and remove the
    stages killed writers left (never a live writer's, never a folder that is not ours)."""
    if not os.path.lexists(target):
        aside = [p for p in _leftovers(target, OLD_SUFFIX) if _real_dir(p) and is_ours(p)]
        if len(aside) == 1:
            with contextlib.suppress(OSError):
                os.rename(aside[0], target)
    for p in _leftovers(target, STAGE_SUFFIX) + _leftovers(target, OLD_SUFFIX):
        if not _real_dir(p):
            continue
        try:
            fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # a live writer's stage
        try:
            # Marked: its writer locked it before marking it, and holds the lock no more, so it died
            # (an old folder being removed is marked first too). Empty: nothing to lose (a writer
            # that created it but has not locked it yet fails with one line). Otherwise: an earlier
            # export a killed writer swapped out — or someone else's folder, which stays.
            if (p / _MARK).is_file() or is_ours(p):
                _remove(p)
            else:
                with contextlib.suppress(OSError):
                    os.rmdir(p)  # only when empty
        finally:
            os.close(fd)


def _remove(folder: Path) -> None:
    """Remove a folder of ours so that a kill at any point leaves it removable by `sweep`: marked
    first, then emptied, the mark last."""
    with contextlib.suppress(OSError):
        os.close(os.open(folder / _MARK, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600))
    for entry in os.scandir(folder):
        if entry.name == _MARK:
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
    with contextlib.suppress(OSError):
        os.unlink(folder / _MARK)
    with contextlib.suppress(OSError):
        os.rmdir(folder)


class Stage:
    """A folder being built privately beside its target (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._folders: set[Path] = {path}
        self.written: list[str] = []  # the caller's files, relative, in the order written

    def folder(self, rel: str) -> Path:
        """Sub-folder `rel` of the stage (created 0777 minus the umask)."""
        p = self.path / rel
        if p not in self._folders:
            p.mkdir(mode=0o777, parents=False, exist_ok=False)
            self._folders.add(p)
        return p

    def write(self, rel: str, data: bytes | Callable[[BinaryIO], object]) -> Path:
        """Create file `rel` (0666 minus the umask, exclusively, never through a link), write it, fsync it."""
        p = self.path / rel
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
        with os.fdopen(fd, "wb") as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if rel != _MARK:
            self.written.append(Path(rel).as_posix())
        return p

    def sync(self) -> None:
        """fsync every folder of the stage (deepest first), so the entries are durable too."""
        for p in sorted(self._folders, key=lambda q: len(q.parts), reverse=True):
            _fsync_dir(p)


def _swap(stage: Path, target: Path) -> Path | None:
    """Put `stage` at `target`; returns where the old folder now is (None: there was none)."""
    if not os.path.lexists(target):
        if _renameat2(stage, target, _RENAME_NOREPLACE):
            return None
        os.rename(stage, target)  # no renameat2: a plain rename onto nothing
        return None
    if _renameat2(stage, target, _RENAME_EXCHANGE):
        return stage
    aside = Path(tempfile.mktemp(prefix=f".{target.name}.", suffix=OLD_SUFFIX, dir=target.parent))
    os.rename(target, aside)
    os.rename(stage, target)
    return aside


@contextlib.contextmanager
def staged_folder(target: str | os.PathLike[str], is_ours: Callable[[Path], bool],
                  check: Callable[[], object] | None = None) -> Iterator[Stage]:
    """Build the folder `target` as a whole: the caller writes into the yielded stage; on a
    normal exit the stage replaces `target` at once (keeping an existing folder's mode), and
    the old folder is removed. On an exception the stage is removed and `target` is untouched.

    The caller has checked that an existing `target` is a real folder whose every entry may go
    (`is_ours` says so for leftovers found beside it); `check` repeats that check just before
    the swap (the folder may have changed while the stage was built) and raises to keep it."""
    t = Path(target)
    if _is_link(t):
        raise ArtifactError(f"{shown(t)}: is a symbolic link; mctool writes only folders it can replace (never "
                            "through a link) — pass the real path, or remove the link")
    t.parent.mkdir(parents=True, exist_ok=True)
    sweep(t, is_ours)
    stage = Path(tempfile.mkdtemp(prefix=f".{t.name}.", suffix=STAGE_SUFFIX, dir=t.parent))
    fd = os.open(stage, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # tells a sweep that this stage is alive
        s = Stage(stage)
        try:
            s.write(_MARK, b"")
        except FileNotFoundError:  # swept between its creation and its lock by another writer starting
            raise FileBusy(f"{shown(t)}: another mctool is writing it; wait for it to finish and run the command "
                           "again (nothing was changed)") from None
        yield s
        if check is not None:
            check()
        os.unlink(stage / _MARK)
        s.sync()
        st = os.lstat(t) if _real_dir(t) else None
        os.chmod(stage, stat.S_IMODE(st.st_mode) if st is not None else 0o777 & ~_umask())
        old = _swap(stage, t)
        _fsync_dir(t.parent)
        if old is not None:
            _remove(old)
    except BaseException:
        if _real_dir(stage):
            shutil.rmtree(stage, ignore_errors=True)
        raise
    finally:
        os.close(fd)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask
