"""Stopping and failing honestly: SIGTERM/SIGHUP handled like Ctrl-C (checkpoint, one line, 128 + N),
time-based checkpoints, divergence as exit 1, and settings refused before any file is written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.conftest import cli
from tests.test_cli import assert_one_line_error

# Kill-and-resume results are compared bit for bit with in-process runs: same thread count.
pytestmark = pytest.mark.usefixtures("one_thread")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TINY = ["--ipc", "2", "--syn-steps", "3", "--expert-epochs", "1.5", "--max-start-epoch", "2", "--lr-img", "100",
        "--lr-lr", "1e-5", "--lr-init", "0.01"]


def distill_args(buffer: Path, out: Path, data_dir: Path, iterations: int, *extra: str) -> list[str]:
    return ["distill", "--buffer", str(buffer), "-o", str(out), "--data-dir", str(data_dir), "--iterations",
            str(iterations), *TINY, *extra]


def iterations_saved(path: Path) -> int | None:
    try:
        with h5py.File(path, "r") as f:
            return int(f["synsets"][sorted(f["synsets"])[0]].attrs["iterations"])
    except (OSError, KeyError, IndexError):
        return None


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_checkpoints_and_exits_143(tmp_path: Path, convex_buffer: Path, data_dir: Path, signum: int) -> None:
    out, full = tmp_path / "s.h5", tmp_path / "full.h5"
    args = distill_args(convex_buffer, out, data_dir, 100000, "--checkpoint-every", "5")
    # preexec_fn: the signal's default disposition, as for a job a scheduler starts; under `nohup`
    # (or any parent that ignores SIGHUP) mctool rightly leaves an inherited ignored signal alone.
    proc = subprocess.Popen([sys.executable, "-m", "mctool", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signum, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while (iterations_saved(out) or 0) < 5:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no checkpoint within 2 minutes"
            time.sleep(0.05)
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signum, (proc.returncode, stderr)
    lines = stderr.strip().splitlines()
    name = "SIGTERM" if signum == signal.SIGTERM else "SIGHUP"
    assert lines[-1].startswith(f"mctool: error: interrupted ({name}); checkpoint saved at iteration "), stderr
    assert "Traceback" not in stderr and sum(line.startswith("mctool: error") for line in lines) == 1
    stopped = iterations_saved(out)
    assert stopped is not None and stopped > 5 and f"iteration {stopped};" in lines[-1]  # not the older checkpoint
    # Resuming continues exactly where an uninterrupted run would be.
    target = stopped + 2
    r = cli(*distill_args(convex_buffer, out, data_dir, target, "--resume", "--quiet"))
    assert r.exit_code == 0, r.output
    assert cli(*distill_args(convex_buffer, full, data_dir, target, "--quiet")).exit_code == 0
    with h5py.File(out) as a, h5py.File(full) as b:
        name_ = sorted(a["synsets"])[0]
        assert np.array_equal(a[f"synsets/{name_}/images"][()], b[f"synsets/{name_}/images"][()])


def test_checkpoint_minutes_saves_between_every_n(tmp_path: Path, convex_buffer: Path, data_dir: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from mctool import distill

    saved: list[int] = []
    original = distill._Run.checkpoint

    def spy(self, final: bool) -> None:
        saved.append(self.d.state.iteration)
        original(self, final)

    monkeypatch.setattr(distill._Run, "checkpoint", spy)
    out = tmp_path / "s.h5"
    # 1e-9 minutes: due after every iteration, although --checkpoint-every is far away.
    r = cli(*distill_args(convex_buffer, out, data_dir, 4, "--checkpoint-every", "1000", "--checkpoint-minutes",
                          "1e-9", "--quiet"))
    assert r.exit_code == 0, r.output
    assert saved == [1, 2, 3, 4]
    assert_one_line_error(cli(*distill_args(convex_buffer, out, data_dir, 4, "--checkpoint-minutes", "-1")), 2,
                          "--checkpoint-minutes must be >= 0")


@pytest.mark.parametrize("bad", [["--lr-img", "1e38"], ["--lr-lr", "1e30"]])
def test_a_diverged_run_fails_after_saving_the_last_good_state(tmp_path: Path, convex_buffer: Path,
                                                               data_dir: Path, bad: list[str]) -> None:
    out = tmp_path / "d.h5"
    r = cli(*distill_args(convex_buffer, out, data_dir, 4, *bad))
    assert_one_line_error(r, 1, "diverged", after_progress=True)
    with h5py.File(out) as f:
        g = f["synsets"][sorted(f["synsets"])[0]]
        images = g["images"][()]
        assert np.isfinite(images).all() and np.abs(images).max() < 1e3 and not g.attrs["complete"]
        assert 0 < float(g.attrs["lr"]) < 1e3 * 0.01


@pytest.mark.parametrize("command", [
    ["experts", "mnist", "--n", "1", "--epochs", "1", "--seed", "-1"],
    ["experts", "mnist", "--n", "1", "--epochs", "1", "--seed", str(2**63)],
    ["demo", "--seed", "-1"],
])
def test_bad_seeds_are_refused_before_any_file(tmp_path: Path, data_dir: Path, command: list[str]) -> None:
    out = tmp_path / "x"
    extra = ["-o", str(out / "b.h5")] if command[0] == "experts" else ["--out", str(out)]
    r = cli(*command, "--data-dir", data_dir, *extra)
    assert_one_line_error(r, 2, "--seed must be in 0")
    assert not out.exists()


def test_bad_seed_and_interior_in_other_commands(tmp_path: Path, buffer: Path, convex_buffer: Path,
                                                 data_dir: Path) -> None:
    assert_one_line_error(cli(*distill_args(convex_buffer, tmp_path / "s.h5", data_dir, 1, "--seed", "-3")), 2,
                          "--seed must be in 0")
    assert_one_line_error(cli("convexify", buffer, "-o", tmp_path / "c.h5", "--interior", "-1"), 2,
                          "--interior must be >= 0")
    assert not (tmp_path / "s.h5").exists() and not (tmp_path / "c.h5").exists()
