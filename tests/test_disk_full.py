"""A full disk met while writing: one line, exit 1, every file already there intact.

The writers check the free space before they start (tests in test_cli, test_experts); these
tests cover what that check cannot: the disk filling up during the write. The ones marked
`tmpfs` fill a real file system — a tmpfs of known size — and run only as root (elsewhere they
are skipped); the others simulate it.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest

from mctool import store
from mctool.store import files

REPO = Path(__file__).resolve().parents[1]


def _mount(size: str) -> Iterator[Path]:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    where = Path(tempfile.mkdtemp(prefix="mctool-tmpfs-"))
    try:
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True).returncode != 0:
            pytest.skip("cannot mount a tmpfs here (a container without the privilege)")
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
        view = files._FileBytes(fh, len(data))
        for lo in range(0, 700, 7):
            for hi in (lo + 3, lo + 4, lo + 9, lo + 70, 700, 800):
                assert view.find(b"GCOL", lo, hi) == bytes(data).find(b"GCOL", lo, min(hi, 700)), (lo, hi)
        for lo, hi in ((0, 16), (60, 70), (690, 700), (695, 720)):
            assert view[lo:hi] == bytes(data[lo:min(hi, 700)])
        assert view[62] == data[62]


def test_the_heap_scan_reads_a_window_once_however_many_signatures_it_holds(tmp_path: Path) -> None:
    """A file of false signatures (one every 256 bytes) is read once per window, not once per
    signature (a crafted file made `inspect` read 64 GiB for 8 MiB)."""
    data = bytearray(8 << 20)
    data[::256] = b"G" * len(data[::256])
    for at in range(0, len(data), 256):
        data[at:at + 4] = b"GCOL"
    path = tmp_path / "gcol"
    path.write_bytes(bytes(data))

    class Counting(io.FileIO):
        reads = 0

        def read(self, n: int = -1) -> bytes:
            Counting.reads += 1
            return super().read(n)

    with Counting(path, "rb") as fh:
        view = files._FileBytes(fh, len(data))
        hits, at = 0, view.find(b"GCOL", 0, len(data))
        while at >= 0:
            hits, at = hits + 1, view.find(b"GCOL", at + 4, len(data))
    assert hits == len(data) // 256
    assert Counting.reads <= 2 * len(data) // files._FileBytes.WINDOW + 2


def test_a_file_ending_in_a_signature_opens(tmp_path: Path) -> None:
    """"GCOL" in the last 4 bytes is no collection (no room for its header): not an internal error."""
    path = tmp_path / "tail.h5"
    with store.create(path) as f:
        f["x"] = np.arange(3)
    with open(path, "ab") as fh:
        fh.write(b"GCOL")
    files._check_global_heaps(path)  # no IndexError


def test_a_write_with_another_hdf5_driver_still_works(tmp_path: Path) -> None:
    """HDF5_DRIVER picks another file driver (no POSIX descriptor to ask for): writes still work."""
    path = tmp_path / "core.h5"
    code = ("import sys; from mctool import store\n"
            "with store.create(sys.argv[1]) as f:\n    f['x'] = [1, 2, 3]\n"
            "with store.rewrite(sys.argv[1]) as f:\n    f['y'] = [4]\n")
    for driver in ("core", "stdio"):
        path.unlink(missing_ok=True)
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HDF5_DRIVER": driver}
        r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env,
                           timeout=300)
        assert r.returncode == 0, (driver, r.stderr)
        with h5py.File(path, "r") as f:
            assert list(f["x"][()]) == [1, 2, 3] and list(f["y"][()]) == [4]


def test_what_counts_as_a_full_disk() -> None:
    """ENOSPC, or HDF5's text of it on an error without an errno, itself or what it was raised
    from — not an error with another errno whose text (a file name) holds the words, nor one
    whose disk-full context was hidden (`raise ... from None`)."""
    from mctool.core.errors import is_disk_full

    hdf5 = "file write failed: errno = 28, error message = 'No space left on device', buf = 0x1"
    assert is_disk_full(OSError(28, "No space left on device"))
    assert is_disk_full(RuntimeError(hdf5)) and is_disk_full(OSError(hdf5))
    assert not is_disk_full(OSError(2, f"Unable to open file (name = '/x/{hdf5}/a.h5')"))
    assert not is_disk_full(RuntimeError("No space left on device (in a message, no errno)"))

    def raised(error: BaseException, during: BaseException, hide: bool) -> BaseException:
        try:
            try:
                raise during
            except BaseException:
                if hide:
                    raise error from None
                raise error
        except BaseException as exc:
            return exc
        raise AssertionError

    assert is_disk_full(raised(RuntimeError("enforce fail"), OSError(28, "full"), hide=False))
    assert not is_disk_full(raised(RuntimeError("a bug in a handler"), OSError(28, "full"), hide=True))
    cause = RuntimeError("wrapped")
    cause.__cause__ = OSError(28, "full")
    assert is_disk_full(cause)


def test_the_full_disk_verdict_is_per_command(monkeypatch: pytest.MonkeyPatch) -> None:
    """A command that met a full disk does not make the next one in the same process leave
    without teardown (the entry point's os._exit is for the command that met it)."""
    import typer

    from mctool.cli import common

    def full(_reporter: object) -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(typer.Exit):
        common.run(full, quiet=True, debug=False)
    assert common.ended_on_full_disk()

    def bug(_reporter: object) -> None:
        raise RuntimeError("a bug")

    with pytest.raises(typer.Exit):
        common.run(bug, quiet=True, debug=False)
    assert not common.ended_on_full_disk()


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


# --------------------------------------------------------------------------- the disk filling up while writing

# The free-space check passed (as when another process fills the disk right after it): a
# subprocess told there is plenty of room meets the full disk in HDF5's own writes.
_ROOMY = ("import shutil, sys; usage = shutil.disk_usage; "
          "shutil.disk_usage = lambda p: usage(p)._replace(free=1 << 40); "
          "sys.argv = ['mctool', *sys.argv[1:]]; from mctool.cli.launch import main; main()")


def mctool_past_the_check(*args: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", _ROOMY, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=600)


@pytest.mark.parametrize("leave", [8 << 10, 24 << 10])
def test_hdf5_meeting_a_full_disk_is_one_line_and_exit_1(tmpfs: Path, buffer: Path, leave: int) -> None:
    """HDF5 (2.0) reports a full disk as a RuntimeError with the errno in its text, prints
    tracebacks of the datasets it could not close, and crashed (SIGSEGV) at exit flushing the
    temporary again: now one line, exit 1, the input unchanged, no temporary left."""
    source = tmpfs / "b.h5"
    source.write_bytes(buffer.read_bytes())
    before = sha(source)
    fill(tmpfs, leave)
    r = mctool_past_the_check("convexify", source, "-o", tmpfs / "c.h5", "--interior", "1", "--quiet")
    assert r.returncode == 1, (r.returncode, r.stderr[-3000:])
    assert r.stderr.splitlines() == ["mctool: error: disk full while writing; free space and run the same command "
                                     "again (finished work is kept)"], r.stderr[-3000:]
    assert sha(source) == before
    assert sorted(p.name for p in tmpfs.iterdir()) == ["b.h5", "filler"]
    assert mctool("inspect", source).returncode == 0


def test_a_full_disk_met_closing_an_object_is_not_printed(capsys: pytest.CaptureFixture) -> None:
    """h5py reports a flush that fails while it closes a dataset as an unraisable error (and
    prints its traceback first through sys.excepthook); the command's one line says it all."""
    import typer

    from mctool.cli import common

    class Dataset:
        def __del__(self) -> None:
            raise RuntimeError("Can't decrement id ref count (file write failed: errno = 28, error message = "
                               "'No space left on device')")

    def body(reporter: object) -> None:
        Dataset()  # dropped at once: its error goes to the unraisable hook
        try:
            raise OSError(28, "No space left on device")
        except OSError as exc:
            sys.excepthook(type(exc), exc, exc.__traceback__)  # as Cython's full-traceback report does
            raise

    with pytest.raises(typer.Exit) as ended:
        common.run(body, quiet=True, debug=False)
    assert ended.value.exit_code == 1
    assert capsys.readouterr().err.splitlines() == [
        "mctool: error: disk full while writing; free space and run the same command again (finished work is kept)"]
    assert common.ended_on_full_disk()


def test_an_expert_row_the_disk_could_not_hold_is_not_marked_done(tmpfs: Path, data_dir: Path) -> None:
    """HDF5 keeps a small row write in the dataset's buffer until the dataset closes, and h5py
    only printed what failed then: on a full disk `experts` said "2/2 experts done" over rows
    that were holes (zeros), and crashed at exit. Now one line, exit 1, only whole rows marked
    done, and the same command finishes the buffer once there is room."""
    out = tmpfs / "b.h5"
    args = ["experts", "mnist", "--data-dir", data_dir, "-o", out, "--n", "2", "--epochs", "4", "--width", "8",
            "--batch-size", "32", "--lr", "0.05", "--quiet", "--seed", "1"]
    fill(tmpfs, 48 << 10)  # room for the file's metadata, not for its rows
    r = mctool_past_the_check(*args)
    assert r.returncode == 1, (r.returncode, r.stdout[-500:], r.stderr[-3000:])
    assert r.stderr.splitlines() == ["mctool: error: disk full while writing; free space and run the same command "
                                     "again (finished work is kept)"], r.stderr[-3000:]
    with h5py.File(out, "r") as f:
        done = f["experts/done"][()].astype(bool)
        for e in np.flatnonzero(done):  # a row marked done holds what was written, not a hole
            assert np.abs(f["experts/trajectories"][e]).sum() > 0, e
    assert not done.all()
    (tmpfs / "filler").unlink()
    r = mctool(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    with h5py.File(out, "r") as f:
        assert f["experts/done"][()].all()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("how", ["create", "rewrite"])
def test_a_write_lost_while_closing_an_object_keeps_the_file(tmp_path: Path, how: str) -> None:
    """h5py reports a full disk met while it closes a dataset (its buffered data written) only
    as an unraisable error; the write then went on and the temporary could take the file's
    place without that data. Now the create or rewrite fails and the file there is unchanged."""

    class Closing:  # what h5py's dataset does when its buffer cannot be written
        def __del__(self) -> None:
            raise OSError(28, "Write through metadata accumulator failed (file write failed: errno = 28)")

    path = tmp_path / "a.h5"
    with store.create(path) as f:
        f.create_dataset("x", data=np.arange(3.0))
    before = sha(path)
    opener = store.create(path) if how == "create" else store.rewrite(path)
    with pytest.raises(OSError, match="accumulator"):
        with opener as f:
            f.create_dataset("y", data=np.arange(5.0))
            Closing()
    assert sha(path) == before
    assert store.temporaries(path) == []
