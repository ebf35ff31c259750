"""`mctool experts`: determinism, snapshots, crash safety, Ctrl-C, appending, streaming, divergence."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from mctool import store
from mctool.core.errors import DiskFull
from mctool.experts import ExpertsConfig, expert_seed, model_spec, train_expert
from mctool.models.functional import FlatNet
from mctool.models import build_model
from mctool.training.train import accuracy
from tests.helpers import assert_one_line_error, cli

# Tiny settings shared by the in-process runs (2 experts, K = 3).
TINY = ("--epochs", "3", "--width", "8", "--batch-size", "100", "--lr", "0.05", "--quiet")
ROWS = ("seeds", "test_accuracy", "train_loss", "done")


def experts(data_dir: Path, out: Path, *args: str, seed: int = 0, n: int = 2):
    return cli("experts", "mnist", "--data-dir", data_dir, "-o", out, "--seed", str(seed), "--n", str(n), *TINY, *args)


def read(path: Path, *names: str) -> dict[str, np.ndarray]:
    with store.open_artifact(path) as f:
        return {n: f[n][()] for n in names}


def assert_rows_equal(a: Path, b: Path, rows=slice(None), trajectories: bool = True) -> None:
    names = [f"experts/{n}" for n in ROWS] + (["experts/trajectories"] if trajectories else [])
    ra, rb = read(a, *names), read(b, *names)
    for n in names:
        np.testing.assert_array_equal(ra[n][rows], rb[n][rows], err_msg=n)  # NaN == NaN here


pytestmark = pytest.mark.usefixtures("one_thread")


SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def seed0(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """2 experts, K = 3, seed 0, made in-process by the CLI."""
    out = tmp_path_factory.mktemp("seed0") / "a.h5"
    r = experts(data_dir, out)
    assert r.exit_code == 0, r.output
    return out


# --------------------------------------------------------------------------- determinism


def test_same_seed_is_bit_identical_other_seed_differs(tmp_path: Path, data_dir: Path, seed0: Path) -> None:
    again, other = tmp_path / "again.h5", tmp_path / "other.h5"
    assert experts(data_dir, again).exit_code == 0
    assert experts(data_dir, other, seed=1).exit_code == 0
    assert_rows_equal(seed0, again)
    a = read(seed0, "experts/trajectories", "experts/seeds", "experts/test_accuracy")
    b = read(other, "experts/trajectories", "experts/seeds", "experts/test_accuracy")
    assert a["experts/trajectories"].shape == (2, 4, a["experts/trajectories"].shape[2])
    assert list(a["experts/seeds"]) == [expert_seed(0, 0), expert_seed(0, 1)]
    assert list(b["experts/seeds"]) == [expert_seed(1, 0), expert_seed(1, 1)]
    assert len(set(a["experts/seeds"]) | set(b["experts/seeds"])) == 4
    for e in range(2):
        # Different init (snapshot 0) and different path (every later snapshot).
        for k in range(4):
            assert not np.array_equal(a["experts/trajectories"][e, k], b["experts/trajectories"][e, k]), (e, k)
    # The two experts of one run differ from each other too.
    assert not np.array_equal(a["experts/trajectories"][0, 0], a["experts/trajectories"][1, 0])


# --------------------------------------------------------------------------- snapshots


@pytest.fixture(scope="module")
def prepared(data_dir: Path):
    from mctool.data.prepared import prepare

    return prepare("mnist", data_dir, zca=True, zca_eps=0.1, device=torch.device("cpu"))


def seed0_config() -> ExpertsConfig:
    """The settings `seed0` passes to the CLI."""
    return ExpertsConfig(dataset="mnist", num_experts=2, epochs=3, lr=0.05, batch_size=100, width=8, seed=0)


def load(spec, flat: torch.Tensor) -> torch.nn.Module:
    model = build_model(spec, seed=12345)  # any init: every parameter is overwritten
    FlatNet(model).load_into(model, flat)
    return model


@pytest.mark.parametrize("which", ["seed0", "buffer"])
def test_snapshot_0_is_the_initial_weights(request: pytest.FixtureRequest, which: str, prepared) -> None:
    path = request.getfixturevalue(which)
    with store.open_artifact(path) as f:
        spec, _ = store.read_model(path, f)
        seed = int(f["experts"].attrs["seed"])
        traj = f["experts/trajectories"][()]
        acc = f["experts/test_accuracy"][()]
    if which == "seed0":
        assert spec == model_spec(seed0_config(), prepared)
    for e in range(2):
        model = build_model(spec, seed=expert_seed(seed, e))
        np.testing.assert_array_equal(traj[e, 0], FlatNet(model).flatten().numpy())
        if which == "buffer":
            continue  # made by another module, maybe with another thread count: no exact accuracies
        # Evaluating θ_0 and θ_K reproduces the accuracies recorded for them.
        for k in (0, traj.shape[1] - 1):
            assert np.float32(accuracy(load(spec, torch.from_numpy(traj[e, k])), prepared.test_x,
                                       prepared.test_y)) == acc[e, k], (e, k)


def test_snapshot_k_is_the_final_weights(seed0: Path, prepared) -> None:
    cfg = seed0_config()
    spec = model_spec(cfg, prepared)
    res = train_expert(cfg, spec, prepared, 1)
    assert res.trajectory is not None and res.trajectory.shape[0] == cfg.epochs + 1
    assert res.seed == expert_seed(cfg.seed, 1)
    # In-process training reproduces the CLI's row bit for bit (same thread count).
    with store.open_artifact(seed0) as f:
        np.testing.assert_array_equal(res.trajectory.numpy(), f["experts/trajectories"][1])
        np.testing.assert_array_equal(np.float32(res.test_accuracy), f["experts/test_accuracy"][1])
        assert int(f["experts/seeds"][1]) == res.seed
    # θ_K loaded into a fresh model scores what was recorded after the last epoch; θ_0 likewise.
    for k in (0, cfg.epochs):
        model = load(spec, res.trajectory[k])
        assert accuracy(model, prepared.test_x, prepared.test_y) == res.test_accuracy[k], k
    assert res.test_accuracy[-1] > res.test_accuracy[0]


# --------------------------------------------------------------------------- crash safety


def peek_done(path: Path) -> list[bool] | None:
    """/experts/done of a file another process is writing (None while unreadable)."""
    try:
        with h5py.File(path, "r", locking=False) as f:  # never block the writer
            return [bool(d) for d in f["experts/done"][()]]
    except (OSError, KeyError, ValueError, RuntimeError):
        return None


def subprocess_cmd(data_dir: Path, out: Path, n: int, epochs: int) -> list[str]:
    return [sys.executable, "-m", "mctool", "experts", "mnist", "--data-dir", str(data_dir), "--n", str(n),
            "--epochs", str(epochs), "-o", str(out), "--seed", "0", "--width", "8", "--batch-size", "100",
            "--lr", "0.05"]


def wait_for(proc: subprocess.Popen, ready, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"exited ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# Long enough that expert 1 is surely still training shortly after expert 0 is done.
KILL_EPOCHS = 15


@pytest.mark.slow
def test_sigkill_loses_only_the_expert_in_progress(tmp_path: Path, data_dir: Path) -> None:
    out, fresh = tmp_path / "killed.h5", tmp_path / "fresh.h5"
    cmd = subprocess_cmd(data_dir, out, 2, KILL_EPOCHS)
    with open(tmp_path / "stderr.txt", "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=SUBPROCESS_ENV)
        try:
            wait_for(proc, lambda: (peek_done(out) or [False])[0], "expert 0 was done")
            time.sleep(0.1)
            assert proc.poll() is None, "expert 1 finished before the kill; raise KILL_EPOCHS"
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=30) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    with store.open_artifact(out) as f:
        assert f["experts/done"][()].tolist() == [True, False]
    with store.open_buffer(out) as buf:
        assert buf.done_experts().tolist() == [0]
    assert not list(tmp_path.glob(".killed.h5.*")), "temporary file left behind"

    # The same command again finishes expert 1 only.
    args = cmd[3:]  # drop "python -m mctool"
    r = cli(*args)
    assert r.exit_code == 0, r.output
    assert "resuming" in r.stderr and "1 to train" in r.stderr, r.stderr
    assert "expert 0:" not in r.stderr and "expert 1:" in r.stderr
    with store.open_artifact(out) as f:
        assert f["experts/done"][()].tolist() == [True, True]

    # Both rows equal those of an uninterrupted run with the same seed.
    r = cli(*args[:args.index("-o") + 1], str(fresh), *args[args.index("-o") + 2:])
    assert r.exit_code == 0, r.output
    assert_rows_equal(out, fresh)


@pytest.mark.slow
def test_ctrl_c_exits_130_with_one_line(tmp_path: Path, data_dir: Path) -> None:
    out = tmp_path / "b.h5"
    # preexec_fn: as started from a terminal, even when the suite runs as a background job
    # (`pytest &`), whose children inherit an ignored SIGINT that mctool rightly leaves alone.
    proc = subprocess.Popen(subprocess_cmd(data_dir, out, 1, 100000), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=SUBPROCESS_ENV,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        wait_for(proc, lambda: peek_done(out) is not None, "the buffer was created")
        time.sleep(0.3)  # now inside the training loop
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, (proc.returncode, stderr)
    lines = stderr.strip().splitlines()
    assert lines[-1].startswith("mctool: error: interrupted (Ctrl-C)"), stderr
    assert sum(line.startswith("mctool: error:") for line in lines) == 1
    assert "Traceback" not in stderr + stdout
    with store.open_artifact(out) as f:
        assert f["experts/done"][()].tolist() == [False]


# --------------------------------------------------------------------------- appending


def test_append_trains_only_the_new_expert(tmp_path: Path, data_dir: Path, seed0: Path) -> None:
    out = tmp_path / "b.h5"
    shutil.copyfile(seed0, out)
    r = experts(data_dir, out, "--json", n=3)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["already_done"] == 2 and doc["experts"] == 3
    assert [t["expert"] for t in doc["trained"]] == [2]
    with store.open_artifact(out) as f:
        assert f["experts/done"][()].tolist() == [True, True, True]
        assert int(f["experts/seeds"][2]) == expert_seed(0, 2)
        assert f["experts/trajectories"].shape[0] == 3
    assert_rows_equal(seed0, out, rows=slice(0, 2))  # the old rows are untouched
    shutil.copyfile(seed0, out)
    r = experts(data_dir, out, n=3)  # the table says the earlier experts are not listed
    assert r.exit_code == 0, r.output
    assert "3/3 experts done (2 done before this run, not listed)" in r.stdout


def test_resume_missing_file(tmp_path: Path, data_dir: Path) -> None:
    out = tmp_path / "missing.h5"
    assert_one_line_error(experts(data_dir, out, "--resume"), 2, str(out))
    assert not out.exists()


# --------------------------------------------------------------------------- streaming


def test_streaming_convexify_equals_convexify_afterwards(tmp_path: Path, data_dir: Path, seed0: Path) -> None:
    after, streamed = tmp_path / "after.h5", tmp_path / "streamed.h5"
    shutil.copyfile(seed0, after)
    r = cli("convexify", after, "--interior", "1", "--quiet")
    assert r.exit_code == 0, r.output
    r = experts(data_dir, streamed, "--convexify", "--interior", "1")
    assert r.exit_code == 0, r.output
    names = ("convex/waypoints", "convex/beta", "convex/done")
    a, s = read(after, *names), read(streamed, *names)
    assert a["convex/waypoints"].shape == s["convex/waypoints"].shape == (2, 3, a["convex/waypoints"].shape[2])
    np.testing.assert_allclose(s["convex/waypoints"], a["convex/waypoints"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(s["convex/beta"], a["convex/beta"], rtol=1e-6, atol=1e-7)
    assert s["convex/done"].tolist() == a["convex/done"].tolist() == [True, True]
    with store.open_artifact(streamed) as f:
        assert "trajectories" not in f["experts"]
        meta = store.read_convex_meta(streamed, f)
    with store.open_artifact(after) as f:
        assert store.read_convex_meta(after, f) == meta
    assert meta.positions == (0, 2, 3) or meta.positions == (0, 1, 3)  # round(3/2) either way
    assert_rows_equal(seed0, streamed, trajectories=False)  # same training, only storage differs


# --------------------------------------------------------------------------- divergence


def test_nan_loss_exits_1_and_marks_nothing_done(tmp_path: Path, data_dir: Path) -> None:
    out = tmp_path / "nan.h5"
    r = cli("experts", "mnist", "--data-dir", data_dir, "-o", out, "--n", "2", "--epochs", "2", "--width", "8",
            "--batch-size", "100", "--lr", "1e6")
    assert_one_line_error(r, 1, "loss", after_progress=True)
    if out.exists():
        with store.open_artifact(out) as f:
            assert not f["experts/done"][()].any()
    # The suggested fix (a smaller --lr) is accepted: no finished expert, so the file starts afresh.
    r = cli("experts", "mnist", "--data-dir", data_dir, "-o", out, "--n", "1", "--epochs", "1", "--width", "8",
            "--batch-size", "100", "--lr", "0.01")
    assert r.exit_code == 0, r.output
    assert "starting it afresh" in r.stderr
    with store.open_artifact(out) as f:
        assert f["experts/done"][()].tolist() == [True]


# --------------------------------------------------------------------------- disk space


def test_a_full_disk_is_found_before_an_expert_trains(tmp_path: Path, data_dir: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The row check runs before each expert's training (not after its minutes), and a row written
    into storage allocated at creation needs only its own bytes, not HDF5's metadata slack."""
    import mctool.experts

    checks: list[int] = []
    real = shutil.disk_usage

    def disk_usage(path):
        checks.append(1)
        usage = real(path)
        # The buffer's creation sees plenty of room; every later check a nearly full disk.
        return usage if len(checks) == 1 else usage._replace(free=1000)

    def no_training(*args, **kwargs):
        raise AssertionError("an expert was trained on a full disk")

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    monkeypatch.setattr(mctool.experts, "train_expert", no_training)
    out = tmp_path / "b.h5"
    assert_one_line_error(experts(data_dir, out), 1, "disk full: the next expert row(s) needs about")
    with store.open_artifact(out) as f:
        assert f["experts/done"][()].tolist() == [False, False]

    needed = 10**6
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=needed + 2**16))
    store.ensure_free_space(out, needed, "a row", metadata=False)  # raw row: its bytes and a block of slack
    with pytest.raises(DiskFull, match="disk full"):
        store.ensure_free_space(out, needed, "a new group")  # metadata: 5 % + 1 MiB more
