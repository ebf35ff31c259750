"""A reader and a writer of one file (issue 24 item 4): `evaluate` storing its scores in a synset
that `distill --resume` is writing is refused with one line, never erased by the next checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import h5py
import pytest

from mctool import store
from mctool.core.errors import FileBusy
from mctool.store import files
from tests.damage import digest
from tests.helpers import assert_one_line_error, cli

TINY = ["--ipc", "1", "--syn-steps", "2", "--expert-epochs", "1", "--max-start-epoch", "2", "--lr-img", "100",
        "--lr-lr", "1e-5", "--lr-init", "0.01", "--quiet"]
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def synset(tmp_path_factory: pytest.TempPathFactory, convex_buffer: Path, data_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("held") / "syn.h5"
    r = cli("distill", "--buffer", convex_buffer, "-o", out, "--data-dir", data_dir, "--iterations", "1", *TINY)
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture
def running_distill(synset: Path, tmp_path: Path) -> Iterator[Path]:
    """Another process holding the synset as `distill` does for its whole run, having already
    written one checkpoint (a rewrite: the file at the path is a new one since it took the lock)."""
    f = tmp_path / "syn.h5"
    f.write_bytes(synset.read_bytes())
    code = ("import time\nfrom pathlib import Path\nfrom mctool import store\n"
            f"p = Path({str(f)!r})\n"
            "with store.holding(p):\n"
            "    with store.rewrite(p) as h:\n        h.attrs['checkpoint'] = 1\n"
            "    print('ready', flush=True)\n    time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready", proc.stderr.read()
        yield f
    finally:
        proc.kill()
        proc.wait()


def test_evaluate_beside_a_running_distill_is_refused_at_once(running_distill: Path, data_dir: Path) -> None:
    f = running_distill
    before = digest(f)
    started = time.monotonic()
    r = cli("evaluate", f, "--data-dir", data_dir, "--runs", "1", "--epochs", "1")
    assert_one_line_error(r, 1, "in use by another process")
    assert time.monotonic() - started < files.WAIT_S  # a run's lock is not waited for
    assert digest(f) == before
    assert cli("inspect", f).exit_code == 0  # reading goes on
    # the library writes too, not only the command's first check
    with pytest.raises(FileBusy, match="distill or experts"):
        store.add_evaluations(f, "mct-ipc1", [{"mean": 0.5}])
    with pytest.raises(FileBusy):
        with store.rewrite(f) as h:
            h.attrs["x"] = 1
    assert digest(f) == before


def test_distill_holds_its_output_for_the_whole_run(convex_buffer: Path, data_dir: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from mctool.distill import runner as distill  # run() calls the runner module's run_prepared

    out = tmp_path / "syn.h5"
    seen = []
    real = distill.run_prepared

    def spy(*args, **kwargs):
        seen.append(files._key(out) in files._held)
        return real(*args, **kwargs)

    monkeypatch.setattr(distill, "run_prepared", spy)
    r = cli("distill", "--buffer", convex_buffer, "-o", out, "--data-dir", data_dir, "--iterations", "2", *TINY)
    assert r.exit_code == 0, r.output
    assert seen == [True] and files._key(out) not in files._held  # held during, released after


def test_scores_of_images_that_changed_meanwhile_are_not_stored(synset: Path, tmp_path: Path, data_dir: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The lost update as the issue saw it, without the lock: a checkpoint lands while evaluate
    trains. The scores are not stored against images the file no longer holds; the line says so
    and gives them."""
    import mctool.evaluate.evaluation as evaluate

    f = tmp_path / "syn.h5"
    f.write_bytes(synset.read_bytes())
    real = evaluate.evaluate_set

    def checkpoint_meanwhile(*args, **kwargs):
        result = real(*args, **kwargs)
        with h5py.File(f, "r+") as h:  # what a resumed distill's next checkpoint changes
            h["synsets/mct-ipc1"].attrs["iterations"] = 2
            h["synsets/mct-ipc1/images"][0] += 1
        return result

    monkeypatch.setattr(evaluate, "evaluate_set", checkpoint_meanwhile)
    after_checkpoint = None
    r = cli("evaluate", f, "--data-dir", data_dir, "--runs", "1", "--epochs", "1", "--quiet")
    assert_one_line_error(r, 1, "changed while it was being evaluated")
    assert "scores: ConvNet final" in r.stderr
    with store.open_synsets(f) as sf:
        after_checkpoint = sf.read("mct-ipc1")
    assert after_checkpoint.iterations == 2 and after_checkpoint.evaluations == []
    assert store.temporaries(f) == []


def test_an_unchanged_synset_takes_the_scores(synset: Path, tmp_path: Path) -> None:
    f = tmp_path / "syn.h5"
    f.write_bytes(synset.read_bytes())
    with store.open_synsets(f) as sf:
        syn = sf.read("mct-ipc1")
    store.add_evaluations(f, "mct-ipc1", [{"mean": 0.5}], scored=syn)
    with store.open_synsets(f) as sf:
        assert sf.read("mct-ipc1").evaluations == [{"mean": 0.5}]


def test_the_lock_is_taken_on_the_file_now_at_the_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer that opened the file just before a rewrite replaced it locks the new file."""
    f = tmp_path / "a.h5"
    with store.create(f) as h:
        h.attrs["v"] = 1
    first = os.stat(f)
    real = files._stat_or_none
    replaced = []

    def rewrite_between(target):  # another process's rewrite lands between our open and our check
        if not replaced:
            replaced.append(True)
            tmp = tmp_path / "new.h5"
            tmp.write_bytes(f.read_bytes())
            os.replace(tmp, f)
        return real(target)

    monkeypatch.setattr(files, "_stat_or_none", rewrite_between)
    fd = files._acquire(f, 0.0)
    assert fd is not None
    try:
        assert os.fstat(fd).st_ino == os.stat(f).st_ino != first.st_ino
    finally:
        os.close(fd)


def test_a_symlinked_output_is_refused(tmp_path: Path, synset: Path, data_dir: Path) -> None:
    victim = tmp_path / "victim.h5"
    victim.write_bytes(synset.read_bytes())
    link = tmp_path / "link.h5"
    link.symlink_to(victim)
    before = digest(victim)
    assert_one_line_error(cli("evaluate", link, "--data-dir", data_dir, "--runs", "1", "--epochs", "1"), 2,
                          "symbolic link")
    with pytest.raises(Exception, match="symbolic link"):
        store.write_atomically(link, b"x")
    assert digest(victim) == before and link.is_symlink()


def test_pictures_and_single_files_are_written_atomically_never_through_a_link(tmp_path: Path) -> None:
    import stat

    import torch

    from mctool.data.datasets import Preprocessing
    from mctool.core.errors import ArtifactError
    from mctool.plots import synset_grid

    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    link = tmp_path / "syn.png"
    link.symlink_to(victim)
    prep = Preprocessing(kind="normalize", mean=torch.zeros(1), std=torch.ones(1))
    with pytest.raises(ArtifactError, match="symbolic link"):
        synset_grid(torch.rand(4, 1, 8, 8), prep, 2, link)
    assert victim.read_text() == "keep me" and link.is_symlink()
    old = os.umask(0o022)
    try:
        target = tmp_path / "new.txt"
        store.write_atomically(target, "one")
        assert stat.S_IMODE(target.stat().st_mode) == 0o644
        target.chmod(0o600)
        store.write_atomically(target, lambda fh: fh.write(b"two"))  # a replacement keeps the mode
        assert target.read_text() == "two" and stat.S_IMODE(target.stat().st_mode) == 0o600
    finally:
        os.umask(old)
    assert store.temporaries(target) == []
    with pytest.raises(ArtifactError, match="folder"):
        store.write_atomically(tmp_path, b"x")


@pytest.mark.parametrize("failure", [
    OSError(28, "No space left on device"),
    RuntimeError("Can't close file (file write failed: time = now, filename = 'x', file descriptor = 3, errno = 28, "
                 "error message = 'No space left on device')"),  # how HDF5 reports it through h5py
])
def test_scores_that_cannot_be_stored_on_a_full_disk_are_in_the_line(synset: Path, tmp_path: Path, data_dir: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     failure: Exception) -> None:
    """The networks trained, then storing their scores met a full disk: one line that says so and
    gives the scores (the work is not lost with the write), exit 1, the file unchanged."""
    import mctool.evaluate.evaluation as evaluate

    f = tmp_path / "syn.h5"
    f.write_bytes(synset.read_bytes())
    before = f.read_bytes()

    def full(*args, **kwargs):
        raise failure

    monkeypatch.setattr(evaluate.store, "add_evaluations", full)
    r = cli("evaluate", f, "--data-dir", data_dir, "--runs", "1", "--epochs", "1", "--quiet")
    assert_one_line_error(r, 1, "disk full while storing the scores")
    assert "scores: ConvNet final" in r.stderr and "--no-save" in r.stderr
    assert f.read_bytes() == before
