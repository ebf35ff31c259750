"""The error types the CLI turns into one clear line and an exit code."""

import errno


class MctoolError(Exception):
    """A failure the user can act on; the CLI prints the message, not a traceback."""

    exit_code = 1


class UsageError(MctoolError):
    """Bad input: a missing or unreadable file, a wrong option, an unknown name (exit 2)."""

    exit_code = 2


class ArtifactError(UsageError):
    """An artifact file that is missing, not ours, too new, or inconsistent."""


class DatasetNotFound(UsageError):
    """A dataset that is not on disk; the message says what to download and where."""


class TrainingDiverged(MctoolError):
    """Training produced a non-finite value and could not continue."""


class DiskFull(MctoolError):
    """Not enough free space for a write; checked before writing, so nothing is damaged (exit 1)."""


class FileBusy(MctoolError):
    """A file another process is writing (HDF5's lock or mctool's writer lock); retry later (exit 1)."""


class Interrupted(MctoolError):
    """Stopped by a signal at a safe point (Ctrl-C, SIGTERM, SIGHUP); finished work is saved.

    The exit code follows the shell convention 128 + signal number: 130, 143, 129."""

    def __init__(self, message: str, signum: int = 2) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` (or an error it was raised from) says the disk is full: an OSError with
    errno ENOSPC, or what HDF5 (through h5py) and torch.save raise when a write fails there —
    an OSError or RuntimeError whose text alone holds the errno ("Can't close file (file write
    failed: ..., errno = 28, error message = 'No space left on device', ...)"). An OSError with
    another errno is not, whatever its text (a file name may hold those words)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno is not None:
            if current.errno == errno.ENOSPC:
                return True
        elif isinstance(current, (OSError, RuntimeError)):
            text = str(current)
            if f"errno = {errno.ENOSPC}, error message = 'No space left on device'" in text:
                return True
        # what it was raised from: its cause, or the error being handled unless hidden (`from None`)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return False
