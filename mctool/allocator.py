"""Keep large CPU tensors' memory in the process: glibc malloc tuning for PyTorch on Linux.

glibc serves every allocation above 32 MiB with a fresh mmap and returns it with munmap on
free. A ConvNet step on 100 CIFAR-sized images makes dozens of 50 MB temporaries, so each
one paid ~13,000 page faults plus the kernel zeroing its pages: on this project's 2-core
machine a new 50 MB tensor cost ~15 ms where the arithmetic on it costs ~1 ms, and training
and matching steps ran ~1.7× slower than they need to (bench/distill.py, ``--system-malloc``
to compare). PyTorch's CPU allocator does not cache, so the fix is the
C allocator's: serve big blocks from the heap and never trim it, so freed blocks are reused.
The price: memory freed after the peak stays with the process until it exits, and the peak
itself is somewhat higher (heap fragmentation: +~75 MiB, +14 %, on bench/distill.py's
matching iteration, which runs ~1.7× faster).

Applied once at start-up by the CLI. Skipped when the user already tunes malloc
(``MALLOC_*`` environment variables, a preloaded jemalloc/tcmalloc) or sets
``MCTOOL_SYSTEM_MALLOC=1``, and on anything that is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

_applied: bool | None = None


def _user_tunes_malloc() -> bool:
    if os.environ.get("MCTOOL_SYSTEM_MALLOC", "") not in ("", "0"):
        return True
    if any(key.startswith(("MALLOC_", "GLIBC_TUNABLES")) for key in os.environ):
        return True
    preload = os.environ.get("LD_PRELOAD", "")
    return "jemalloc" in preload or "tcmalloc" in preload


def tune_malloc() -> bool:
    """Switch glibc malloc to heap-only, never-trimmed big blocks; True if it was applied.

    Idempotent; a no-op (False) off Linux/glibc or when the user opted out (module docstring).
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if not sys.platform.startswith("linux") or _user_tunes_malloc():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # Order matters: never trimming first, so that a failure of the second leaves the
    # default (mmap) behaviour intact rather than half of the change.
    _applied = bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)) and bool(mallopt(_M_MMAP_MAX, 0))
    return _applied


def malloc_tuned() -> bool:
    """Whether tune_malloc has been applied in this process (recorded in provenance)."""
    return bool(_applied)
