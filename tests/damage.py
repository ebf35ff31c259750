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
        "export": ["export", f, "--format", "mtt", "-o", work / "exported", *d, "--quiet"],
        "export-png": ["export", f, "--format", "png", "-o", work / "pictures", *d, "--quiet"],
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


# --------------------------------------------------------------------------- byte damage

_FUZZ_RUNNER = """
import json, sys
from typer.testing import CliRunner
from mctool.cli import app
runner = CliRunner()
png = sys.argv[1]
for line in open(sys.argv[2]):
    path = line.strip()
    rs = [runner.invoke(app, ['inspect', path, '--json']),
          runner.invoke(app, ['inspect', path, '--png', png, '--no-evaluate'])]
    print(json.dumps([{'exit_code': r.exit_code, 'stderr': r.stderr} for r in rs]), flush=True)
"""


def fuzz(bases: list[Path], per_base: int, work: Path, seed: int = 0, timeout: float = 180.0) -> dict:
    """Damage `per_base` copies of each base file (a random range of 1–512 bytes zeroed or
    scrambled), run `inspect --json` and `inspect --png --no-evaluate` on each in a child
    process, and count: read (exit 0), refused (exit 2, one line naming the file), bad
    (anything else), hung (no answer within `timeout` s: the child is killed and restarted)."""
    import json
    import os
    import select
    import subprocess
    import sys

    import numpy as np

    rng = np.random.default_rng(seed)
    files = []
    for base in bases:
        data = base.read_bytes()
        for i in range(per_base):
            damaged = bytearray(data)
            start = int(rng.integers(0, len(data)))
            size = int(rng.choice([1, 8, 64, 512]))
            block = bytes(size) if i % 2 else rng.bytes(size)
            damaged[start:start + size] = block[: len(damaged) - start]
            p = work / f"{base.stem}.{i}.h5"
            p.write_bytes(bytes(damaged))
            files.append(p)
    tally: dict = {"cases": 2 * len(files), "read": 0, "refused": 0, "bad": [], "hung": []}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    pending = list(files)
    while pending:
        listing = work / "fuzz-cases.txt"
        listing.write_text("".join(f"{p}\n" for p in pending))
        proc = subprocess.Popen([sys.executable, "-c", _FUZZ_RUNNER, str(work / "fuzz.png"), str(listing)],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                                cwd=Path(__file__).parent.parent)
        assert proc.stdout is not None
        while pending:
            ready, _, _ = select.select([proc.stdout], [], [], timeout)
            line = proc.stdout.readline() if ready else ""
            if not line:  # a hang (or a crash): note the case, go on after it
                proc.kill()
                proc.wait()
                what = "hung" if not ready else "bad"
                tally[what].append(f"{pending[0].name}: {'no answer' if not ready else 'the reader died'}")
                pending.pop(0)
                break
            p = pending.pop(0)
            for r in json.loads(line):
                lines = r["stderr"].strip().splitlines()
                if r["exit_code"] == 0:
                    tally["read"] += 1
                elif (r["exit_code"] == 2 and len(lines) == 1 and lines[0].startswith("mctool: error: ")
                      and str(p) in lines[0] and "internal error" not in lines[0]):
                    tally["refused"] += 1
                else:
                    tally["bad"].append(f"{p.name}: exit {r['exit_code']}: {r['stderr'][-300:]}")
        else:
            proc.wait()
    return tally
