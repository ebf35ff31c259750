"""Permissions, locks and damage (issue 14 items 5 and 7): rewrites keep a file's mode and owner,
a file the user may not change is refused with one line before any work, and "permission
denied", "in use by another process" and "damaged" are three different lines."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import cli
from tests.damage import DISTILL_TINY, EXPERTS_TINY, digest, one_line_refusal

RELEASE = Path(__file__).parent / "data" / "release-0.1.0"
ROOT = os.geteuid() == 0
NOBODY = 65534


def _writers(f: dict[str, Path], d: Path, work: Path) -> dict[str, tuple[Path, list]]:
    """Each command that rewrites (or appends to) an existing file: (the file, argv) — no --quiet:
    any work done before a refusal would show as progress lines."""
    data = ["--data-dir", d]
    return {
        "evaluate": (f["synset"], ["evaluate", f["synset"], "--runs", "1", "--epochs", "1", *data]),
        "distill-new-synset": (f["synset"], ["distill", "--buffer", f["compact"], "-o", f["synset"], "--name", "other",
                                             *data, *DISTILL_TINY[:-1]]),
        "distill-resume": (f["synset"], ["distill", "--buffer", f["compact"], "-o", f["synset"], "--resume", "--name",
                                         "mct-ipc2", "--iterations", "4", *data]),
        "convexify": (f["buffer"], ["convexify", f["buffer"], "--interior", "1"]),
        "convexify-o": (f["compact"], ["convexify", f["buffer"], "-o", f["compact"], "--interior", "1"]),
        "experts": (f["buffer"], ["experts", "mnist", "--n", "3", "-o", f["buffer"], *data, *EXPERTS_TINY[:-3],
                                  "--seed", "1"]),
        "experts-regrow": (f["release"], ["experts", "mnist", "--n", "3", "-o", f["release"], *data,
                                          *EXPERTS_TINY[:-3], "--seed", "1"]),
    }


def _files(tmp: Path, buffer: Path) -> dict[str, Path]:
    out = {"buffer": tmp / "buffer.h5", "compact": tmp / "compact.h5", "synset": tmp / "synset.h5",
           "release": tmp / "release-buffer.h5"}
    shutil.copyfile(buffer, out["buffer"])
    shutil.copyfile(RELEASE / "compact.h5", out["compact"])
    shutil.copyfile(RELEASE / "synset.h5", out["synset"])
    shutil.copyfile(RELEASE / "buffer.h5", out["release"])
    return out


WRITERS = ["evaluate", "distill-new-synset", "distill-resume", "convexify", "convexify-o", "experts", "experts-regrow"]


@pytest.mark.parametrize("writer", WRITERS)
def test_rewrites_keep_mode_and_owner(writer: str, tmp_path: Path, buffer: Path, data_dir: Path) -> None:
    files = _files(tmp_path, buffer)
    target, argv = _writers(files, data_dir, tmp_path)[writer]
    before = digest(target)
    os.chmod(target, 0o600)
    if ROOT:
        os.chown(target, NOBODY, NOBODY)  # someone else's file, changed by root: still theirs
    r = cli(*argv, "--quiet")
    assert r.exit_code == 0, r.output
    assert digest(target) != before, "the command changed nothing: the test proves nothing"
    st = target.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)
    if ROOT:
        assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY)


@pytest.mark.parametrize("writer", WRITERS)
def test_a_read_only_file_is_refused_before_any_work(writer: str, tmp_path: Path, buffer: Path,
                                                     data_dir: Path) -> None:
    """0444: refused with one line (also as root, where os.access would allow it), unchanged."""
    files = _files(tmp_path, buffer)
    target, argv = _writers(files, data_dir, tmp_path)[writer]
    os.chmod(target, 0o444)
    before = digest(target)
    started = time.perf_counter()
    line = one_line_refusal(cli(*argv), target, "permission denied")
    assert "read-only" in line
    assert digest(target) == before and stat.S_IMODE(target.stat().st_mode) == 0o444
    assert time.perf_counter() - started < 60  # no training, no evaluation (generous: the machine is shared)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers


# --------------------------------------------------------------------------- three distinct lines


def _holder(code: str) -> Iterator[subprocess.Popen]:
    """A second process running `code`, which prints 'ready' once it holds its lock."""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).parent.parent, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready", proc.stderr.read()
        yield proc
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def hdf5_lock_holder(tmp_path: Path) -> Iterator[Path]:
    """A file another process holds open for writing with h5py (HDF5's own file lock)."""
    f = tmp_path / "held.h5"
    shutil.copyfile(RELEASE / "synset.h5", f)
    yield from (f for _ in _holder(f"import h5py, time\nf = h5py.File({str(f)!r}, 'r+')\nprint('ready', flush=True)\n"
                                   "time.sleep(600)\n"))


@pytest.fixture
def writer_lock_holder(tmp_path: Path) -> Iterator[Path]:
    """A file another mctool is writing (mctool's writer lock held by a second process)."""
    f = tmp_path / "writing.h5"
    shutil.copyfile(RELEASE / "synset.h5", f)
    code = ("import time\nfrom pathlib import Path\nfrom mctool.store.files import _writer_lock\n"
            f"with _writer_lock(Path({str(f)!r})):\n    print('ready', flush=True)\n    time.sleep(600)\n")
    yield from (f for _ in _holder(code))


def test_locked_by_hdf5_in_another_process(hdf5_lock_holder: Path, data_dir: Path) -> None:
    f = hdf5_lock_holder
    for argv in (["inspect", f], ["evaluate", f, "--data-dir", data_dir]):
        line = one_line_refusal(cli(*argv), f, "in use by another process", code=1)
        assert "damaged" not in line and "permission" not in line


def test_locked_by_another_mctool_writer(writer_lock_holder: Path, data_dir: Path) -> None:
    f = writer_lock_holder
    before = digest(f)
    line = one_line_refusal(cli("evaluate", f, "--data-dir", data_dir, "--runs", "1", "--epochs", "1"), f,
                            "in use by another process", code=1)
    assert "damaged" not in line and "permission" not in line
    assert cli("inspect", f).exit_code == 0  # readers are not held up by a writer
    assert digest(f) == before


@pytest.mark.parametrize("how", ["truncated", "zeroed-superblock", "zeroed-middle"])
def test_damaged_file(how: str, tmp_path: Path) -> None:
    f = tmp_path / "damaged.h5"
    data = bytearray((RELEASE / "synset.h5").read_bytes())
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "zeroed-superblock":
        data[8:64] = bytes(56)
    else:
        data[1024:len(data) - 1024] = bytes(len(data) - 2048)
    f.write_bytes(bytes(data))
    for argv in (["inspect", f], ["inspect", f, "--json"], ["evaluate", f]):
        r = cli(*argv)
        line = one_line_refusal(r, f, code=2)
        assert "permission" not in line and "in use" not in line
        assert any(w in line for w in ("damaged", "truncated", "not an HDF5 file", "unreadable")), line


# --------------------------------------------------------------------------- as another user


def _as_nobody(argvs: list[list], data_dir: Path) -> list[dict]:
    """Run mctool commands as user nobody, in one process: the interpreter lives under /root,
    so the process imports what the commands need as root, then drops to nobody (real and
    effective ids) and runs each; a list of {exit_code, stderr}."""
    code = ("import io, json, os, sys\n"
            "from typer.testing import CliRunner\n"
            "from mctool.cli import app, main\n"
            "import importlib, pkgutil, tomllib, zoneinfo, mctool\n"
            "for m in pkgutil.walk_packages(mctool.__path__, 'mctool.'):  # every lazy import, while readable\n"
            "    if not m.name.endswith('__main__'):\n"
            "        importlib.import_module(m.name)\n"
            "runner = CliRunner()\n"
            f"runner.invoke(app, ['inspect', {str(RELEASE / 'synset.h5')!r}])  # imports what runs lazily\n"
            f"os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})\n"
            f"argvs = {[[str(a) for a in argv] for argv in argvs]!r}\n"
            "out = []\n"
            "for argv in argvs:  # through main(), as the console script runs (its one-line usage errors)\n"
            "    sys.argv, real, sys.stderr = ['mctool', *argv], sys.stderr, io.StringIO()\n"
            "    try:\n"
            "        main()\n"
            "        code = 0\n"
            "    except SystemExit as exc:\n"
            "        code = exc.code\n"
            "    err, sys.stderr = sys.stderr, real\n"
            "    out.append({'exit_code': code, 'stderr': err.getvalue()})\n"
            "print(json.dumps(out))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1", "MCTOOL_DATA": str(data_dir)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                       cwd=Path(__file__).parent.parent)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not ROOT, reason="switching to another user needs root")
def test_permission_denied_as_another_user(data_dir: Path) -> None:
    folder = Path(tempfile.mkdtemp())
    try:
        os.chmod(folder, 0o755)
        secret, shared, closed = folder / "secret.h5", folder / "shared.h5", folder / "closed"
        shutil.copyfile(RELEASE / "synset.h5", secret)
        shutil.copyfile(RELEASE / "synset.h5", shared)
        os.chmod(secret, 0o600)  # root's, unreadable to nobody
        os.chmod(shared, 0o644)  # readable, not writable
        closed.mkdir(mode=0o700)
        buffer = folder / "compact.h5"  # readable to nobody wherever the checkout lives
        shutil.copyfile(RELEASE / "compact.h5", buffer)
        os.chmod(buffer, 0o644)
        shutil.copyfile(RELEASE / "synset.h5", closed / "x.h5")
        # (Typer itself checks that a FILE argument is readable: its line says "not readable".)
        cases = [(["inspect", secret], secret, "not readable"),
                 (["evaluate", shared, "--data-dir", data_dir], shared, "read-only for you"),
                 (["evaluate", closed / "x.h5", "--data-dir", data_dir], closed / "x.h5", "cannot reach"),
                 (["distill", "--buffer", buffer, "-o", folder / "new.h5", "--data-dir", data_dir],
                  folder / "new.h5", "cannot write in")]
        results = _as_nobody([argv for argv, _, _ in cases], data_dir)
        for (argv, path, says), r in zip(cases, results):
            lines = r["stderr"].strip().splitlines()
            assert r["exit_code"] == 2 and len(lines) == 1, (argv, r)
            assert lines[0].startswith("mctool: error: ") and str(path) in lines[0], lines[0]
            assert says in lines[0] and "damaged" not in lines[0] and "in use" not in lines[0], lines[0]
    finally:
        shutil.rmtree(folder)


@pytest.mark.parametrize("err", [errno.EACCES, errno.EPERM])
def test_permission_denied_exits_2_wherever_it_is_met(err: int, capsys: pytest.CaptureFixture[str]) -> None:
    """A bare OSError of permission (e.g. a PNG written into a read-only folder) gets the store's
    line and exit code 2 (bad input), not 1; other OSErrors stay runtime failures (1)."""
    import typer

    from mctool.cli import common

    def denied(_reporter: object) -> None:
        raise OSError(err, os.strerror(err), "out/x.png")

    with pytest.raises(typer.Exit) as stopped:
        common.run(denied, quiet=True, debug=False)
    assert stopped.value.exit_code == 2
    assert capsys.readouterr().err.strip() == "mctool: error: permission denied: out/x.png"

    def other(_reporter: object) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO), "out/x.png")

    with pytest.raises(typer.Exit) as stopped:
        common.run(other, quiet=True, debug=False)
    assert stopped.value.exit_code == 1
