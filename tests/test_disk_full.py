"""A full disk met while writing: one line, exit 1, every file already there intact.

The writers check the free space before they start (tests in test_cli, test_experts); these
tests cover what that check cannot: the disk filling up during the write. The ones marked
`tmpfs` fill a real file system — a tmpfs of known size — and run only as root (elsewhere they
are skipped); the others simulate it.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mctool import store
from mctool.store import files

REPO = Path(__file__).resolve().parents[1]


def _mount(size: str) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where = Path(f"/mnt/mctool-test-{uuid.uuid4().hex[:8]}")
    where.mkdir(parents=True)
    try:
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True).returncode != 0:
            pytest.skip("cannot mount a tmpfs here")
        try:
            yield where
        finally:
            subprocess.run(["umount", str(where)], check=False)
    finally:
        where.rmdir()


@pytest.fixture
def tmpfs() -> Iterator[Path]:
    """A 4 MiB tmpfs (root only)."""
    yield from _mount("4m")


def fill(folder: Path, leave: int = 0) -> None:
    """Take all the free space of `folder`'s file system but `leave` bytes."""
    st = os.statvfs(folder)
    with open(folder / "filler", "wb") as fh:
        fh.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))


def mctool(*args: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "mctool", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- opening a sparse file


@pytest.mark.parametrize("window", [5, 8, 64, 4 << 20])
def test_the_heap_scan_finds_what_bytes_find_finds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   window: int) -> None:
    """The scan reads a file through a window (not a memory map); a signature across the
    window's edge is found all the same."""
    rng = np.random.default_rng(0)
    data = bytearray(rng.integers(0, 4, 700, dtype=np.uint8).tobytes())
    for at in (0, 61, 62, 63, 64, 127, 300, 696):
        data[at:at + 4] = b"GCOL"
    path = tmp_path / "bytes"
    path.write_bytes(bytes(data))
    monkeypatch.setattr(files._FileBytes, "WINDOW", window)
    with open(path, "rb") as fh:
        view = files._FileBytes(fh.fileno(), len(data))
        for lo in range(0, 700, 7):
            for hi in (lo + 3, lo + 4, lo + 9, lo + 70, 700, 800):
                assert view.find(b"GCOL", lo, hi) == bytes(data).find(b"GCOL", lo, min(hi, 700)), (lo, hi)
        for lo, hi in ((0, 16), (60, 70), (690, 700), (695, 720)):
            assert view[lo:hi] == bytes(data[lo:min(hi, 700)])
        assert view[62] == data[62]


def test_a_sparse_artifact_opens_on_a_full_tmpfs(tmpfs: Path) -> None:
    """An expert buffer's rows to come are a hole in the file; on a full tmpfs, mapping such a
    file and reading the hole killed mctool with SIGBUS (even `mctool inspect`, and `mctool
    experts` resuming into the buffer)."""
    path = tmpfs / "a.h5"
    with store.create(path) as f:
        f.create_dataset("x", data=np.arange(10.0))
    os.truncate(path, path.stat().st_size + (1 << 20))  # a hole of 1 MiB, as unwritten rows leave
    fill(tmpfs)
    r = mctool("inspect", path)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
