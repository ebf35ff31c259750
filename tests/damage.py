"""Helpers shared by the corruption, hostile-file and fault tests: the commands that read an
artifact, and the one-line refusal every malformed file must get."""

from __future__ import annotations

import hashlib
from pathlib import Path

ESC = "\x1b"

# Tiny settings: a command that wrongly accepts a damaged file still finishes in seconds.
DISTILL_TINY = ("--iterations", "2", "--ipc", "1", "--syn-steps", "2", "--expert-epochs", "1", "--max-start-epoch",
                "1", "--lr-img", "100", "--lr-lr", "1e-5", "--lr-init", "0.01", "--quiet")
EXPERTS_TINY = ("--epochs", "4", "--width", "8", "--batch-size", "32", "--lr", "0.05", "--quiet", "--seed", "1")


def digest(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def command(name: str, f: Path, work: Path, data_dir: Path, buffer: Path | None = None,
            synset: str = "") -> list[str]:
    """The argv of command `name` reading artifact `f` (outputs go to `work`).

    `buffer` and `synset` are the undamaged buffer and the synset name `distill --resume` continues."""
    d = ["--data-dir", str(data_dir)]
    table = {
        "inspect": ["inspect", f],
        "inspect-json": ["inspect", f, "--json"],
        "inspect-png": ["inspect", f, "--png", work / "ov.png", "--no-evaluate", *d, "--quiet"],
        "convexify": ["convexify", f, "--interior", "1", "--quiet"],
        "convexify-o": ["convexify", f, "-o", work / "compact.h5", "--interior", "1", "--quiet"],
        "distill": ["distill", "--buffer", f, "-o", work / "synset.h5", *d, *DISTILL_TINY],
        "distill-mtt": ["distill", "--buffer", f, "-o", work / "synset.h5", "--method", "mtt", *d, *DISTILL_TINY],
        "distill-resume": ["distill", "--buffer", buffer, "-o", f, "--resume", "--name", synset, "--iterations", "5", *d,
                           "--quiet"],
        "evaluate": ["evaluate", f, "--runs", "1", "--epochs", "1", *d, "--quiet"],
        "experts": ["experts", "mnist", "--n", "3", "-o", f, *d, *EXPERTS_TINY],
        "experts-stream": ["experts", "mnist", "--n", "3", "-o", f, "--convexify", "--interior", "1", *d,
                           *EXPERTS_TINY],
    }
    return [str(a) for a in table[name]]


def one_line_refusal(result, path: Path, field: str = "", code: int = 2) -> str:
    """Assert exit `code`, exactly one stderr line `mctool: error: …` naming `path` and `field`,
    no internal error, no traceback, no escape byte anywhere; return the line."""
    err = result.stderr.splitlines()
    context = f"exit {result.exit_code}\nstdout: {result.stdout[-2000:]}\nstderr: {result.stderr[-2000:]}"
    assert result.exit_code == code, context
    assert len(err) == 1 and err[0].startswith("mctool: error: "), context
    line = err[0]
    assert "internal error" not in line and "Traceback" not in result.output, context
    assert ESC not in result.stdout and ESC not in result.stderr, context
    assert str(path) in line, f"the line does not name the file {path}: {line}"
    assert field in line, f"the line does not name the field {field!r}: {line}"
    return line


class Watch:
    """Linux inotify on one file: records any open, read, write or metadata change of it while
    the block runs (so a test can show that a command never touched a file outside the artifact)."""

    # IN_ACCESS | IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_CLOSE_NOWRITE | IN_OPEN
    MASK = 0x1 | 0x2 | 0x4 | 0x8 | 0x10 | 0x20

    def __init__(self, path: Path) -> None:
        import ctypes
        import os

        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK)
        if self.fd < 0 or self.libc.inotify_add_watch(self.fd, str(path).encode(), self.MASK) < 0:
            raise OSError(ctypes.get_errno(), "inotify unavailable")
        self.touched = False

    def __enter__(self) -> "Watch":
        self._drain()
        self.touched = False
        return self

    def _drain(self) -> int:
        """Bytes of pending events (read and dropped)."""
        import os

        n = 0
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                return n
            if not chunk:
                return n
            n += len(chunk)

    def __exit__(self, *exc: object) -> None:
        self.touched = self._drain() > 0

    def close(self) -> None:
        """Stop watching."""
        import os

        os.close(self.fd)
