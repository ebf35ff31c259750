"""Keep large CPU tensors' memory in the process: glibc malloc tuning for PyTorch on Linux.

glibc serves every allocation above 32 MiB with a fresh mmap and returns it with munmap on
free. A ConvNet step on 100 CIFAR-sized images makes dozens of 50 MB temporaries, so each
one paid ~13,000 page faults plus the kernel zeroing its pages: on this project's 2-core
machine a new 50 MB tensor cost ~15 ms where the arithmetic on it costs ~1 ms, and training
and matching steps ran ~1.7× slower than they need to (bench/distill.py, ``--system-malloc``
to compare). PyTorch's CPU allocator does not cache, so the fix is the C allocator's: serve
big blocks from the main heap and do not trim it, so freed blocks are reused.

The price: memory freed after a peak stays with the process (reused by later allocations,
not returned to the system), and the peak itself is somewhat higher (heap fragmentation:
+~75 MiB, +14 %, on bench/distill.py's matching iteration). ``release_free_memory`` hands
the free heap back after one-off peaks such as data preparation. Only the main thread's
allocations are affected (glibc's other arenas still mmap big blocks); torch allocates
tensors from the calling thread, which is the main thread in every command.

Applied once at start-up by the CLI. Skipped when the user already tunes malloc
(``MALLOC_*``/``GLIBC_TUNABLES`` environment variables, a preloaded jemalloc/tcmalloc) or
sets ``MCTOOL_SYSTEM_MALLOC=1``, and on anything that is not glibc.
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt parameter numbers and glibc's defaults, from <malloc.h> / malloc(3).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_DEFAULT_MMAP_MAX = 65536

_applied: bool | None = None


def _user_tunes_malloc() -> bool:
    if os.environ.get("MCTOOL_SYSTEM_MALLOC", "") not in ("", "0"):
        return True
    if any(key.startswith(("MALLOC_", "GLIBC_TUNABLES")) for key in os.environ):
        return True
    preload = os.environ.get("LD_PRELOAD", "")
    return "jemalloc" in preload or "tcmalloc" in preload


def _libc() -> ctypes.CDLL | None:
    """The C library already loaded in this process (no ldconfig lookup), if it has mallopt."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim.restype = ctypes.c_int
    except (OSError, AttributeError):  # musl, macOS and others have no mallopt/malloc_trim
        return None
    return libc


def tune_malloc() -> bool:
    """Switch glibc malloc to heap-only, untrimmed big blocks; True if it was applied.

    Idempotent; a no-op (False) off Linux/glibc or when the user opted out (module docstring).
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if not sys.platform.startswith("linux") or _user_tunes_malloc():
        return False
    libc = _libc()
    if libc is None or not libc.mallopt(_M_MMAP_MAX, 0):
        return False
    if not libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1):
        libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)  # all or nothing
        return False
    _applied = True
    return True


def release_free_memory() -> None:
    """Return the heap's free pages to the system after a one-off peak (no-op when not tuned)."""
    if _applied:
        libc = _libc()
        if libc is not None:
            libc.malloc_trim(0)


def malloc_tuned() -> bool:
    """Whether tune_malloc has been applied in this process (recorded with the versions)."""
    return bool(_applied)
