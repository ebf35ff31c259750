"""The error types the CLI turns into one clear line and an exit code."""


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
