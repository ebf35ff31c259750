"""torchrun (gloo, 2 CPU processes): experts equal a single-process run; distill writes a synset.

Only the torchrun runs start new interpreters; the single-process runs they are compared with
go in-process (with one thread, as torchrun gives each worker), which saves seconds each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from mctool import store
from mctool.convexify.runner import ConvexifyConfig, convexify_file
from tests.helpers import assert_one_line_error, cli

TINY_EXPERTS = ["experts", "mnist", "--num-experts", "3", "--epochs", "2", "--width", "8", "--batch-size", "32",
                "--lr", "0.05", "--seed", "4", "--quiet"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # torchrun gives each worker one thread; the single-process reference must use the same
    # number, since a different thread count changes float round-off in the convolutions.
    env["OMP_NUM_THREADS"] = "1"
    return env


def torchrun(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "mctool", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)


def single(*args: str | Path):
    """The same command in this process, with one thread like each torchrun worker."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return cli(*args)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("env, writer", [({}, True), ({"WORLD_SIZE": "1", "RANK": "0"}, True),
                                         ({"WORLD_SIZE": "2", "RANK": "0"}, True),
                                         ({"WORLD_SIZE": "2", "RANK": "1"}, False)])
def test_only_the_writer_rank_checks_the_output(monkeypatch: pytest.MonkeyPatch, env: dict[str, str],
                                                writer: bool) -> None:
    """Before the process group exists, torchrun's RANK says which process will write: only it checks
    the output (rank 0 may already hold it for its run when a slower rank gets there, and the
    slower rank's check would find the file busy: a resume under load failed so)."""
    from mctool.core import distributed as dist

    for key in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert dist.writes_output() is writer


def _rank_start(rank: int, world: int, rendezvous: str, out: str) -> None:
    """One process of `test_every_rank_takes_rank_zeros_start`: a start of its own (images and
    label logits that depend on the rank, as an expert's float predictions may), then
    `shared_start`; what it ends with goes to out/rank<r>.pt."""
    import torch.distributed as tdist

    from mctool.distill.runner import shared_start
    from mctool.distill.state import State

    tdist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world)
    try:
        logits = torch.randn(4, 2, generator=torch.Generator().manual_seed(rank))
        values = {"images": torch.full((4, 1, 2, 2), float(rank)), "alpha": 0.01 * (rank + 1), "labels": logits}
        state = State(values=values, velocities={"images": torch.zeros(4, 1, 2, 2), "alpha": 0.0,
                                                 "labels": torch.zeros(4, 2)},
                      labels=torch.softmax(logits, dim=1), iteration=0, generators=[], queues=[])
        state = shared_start(state, torch.device("cpu"))
        torch.save({"images": state.images, "alpha": state.alpha, "logits": state.values["labels"],
                    "labels": state.labels}, Path(out) / f"rank{rank}.pt")
    finally:
        tdist.destroy_process_group()


def test_every_rank_takes_rank_zeros_start(tmp_path: Path) -> None:
    """Under torchrun every rank starts from rank 0's starting state: `--init correct` and
    `--learn-labels` start from an expert's float predictions, which may differ in the last bits
    between GPUs, and ranks that started apart would average the gradients of different runs.
    Two gloo processes with starts of their own end with rank 0's (images, α, label logits and
    the labels made from them); one process keeps its own."""
    import torch.multiprocessing as mp

    from mctool.distill.runner import shared_start

    mp.spawn(_rank_start, args=(2, f"file://{tmp_path / 'rendezvous'}", str(tmp_path)), nprocs=2)
    zero, one = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert float(zero["images"].max()) == 0.0  # rank 0 kept its own start
    for key in ("images", "logits", "labels"):
        assert torch.equal(one[key], zero[key]), key
    assert one["alpha"] == zero["alpha"]
    assert torch.equal(one["labels"], torch.softmax(zero["logits"], dim=1))
    alone = object()
    assert shared_start(alone, torch.device("cpu")) is alone  # type: ignore[arg-type]  # no torchrun: untouched


def _rank_distill(rank: int, port: int, buffer: str, data_dir: str, out: str, mode: str = "expert") -> None:
    """One rank of `test_distill_ranks_start_from_rank_zeros_images_and_labels`: `distill --init
    correct --learn-labels` as torchrun starts it, with an expert of its own (rank 0's gets every
    third training image wrong, rank 1's all right: as float predictions may differ between GPUs at
    a near-tie); the state each rank starts from goes to out/rank<r>.pt. `mode` "draws": `distill
    --init-draws 3` with a chooser of its own instead (rank 0's takes the last draw, rank 1's the
    first: as scores may differ between GPUs at a near-tie)."""
    from mctool.data.prepared import prepare_like
    from mctool.distill import runner
    from mctool.distill.draws import DrawChoice
    from tests.test_init_correct import _wrong_on_every_third

    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)

    def expert(buf: store.Buffer, method: str, device: torch.device) -> object:
        prepared = prepare_like(buf.data, Path(data_dir), device)
        if rank == 0:
            return _wrong_on_every_third(prepared)
        classes = prepared.meta.num_classes
        return lambda images: torch.zeros(images.shape[0], classes)  # class 0 for all: labels of its own

    class Recording(runner.Distiller):  # type: ignore[misc,valid-type]
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            torch.save({"images": self.state.images, "logits": self.state.values.get("labels", self.state.labels),
                        "labels": self.state.labels}, Path(out) / f"rank{rank}.pt")

    def chooser(*args: object, **kwargs: object) -> object:
        return lambda draws: DrawChoice(len(draws) - 1 if rank == 0 else 0, [0.5] * len(draws), 9, 0.0)

    runner.expert_predictor, runner.Distiller, runner.draw_chooser = expert, Recording, chooser
    start = ["--init", "correct", "--learn-labels"] if mode == "expert" else ["--init-draws", "3"]
    r = cli("distill", "--buffer", buffer, "-o", Path(out) / "s.h5", "--data-dir", data_dir, "--ipc", "3",
            "--syn-steps", "2", "--expert-epochs", "1", "--max-start-epoch", "1", "--iterations", "0",
            *start, "--seed", "2", "--device", "cpu", "--quiet")
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("mode", ["expert", "draws"])
def test_distill_ranks_start_from_rank_zeros_images_and_labels(tmp_path: Path, convex_buffer: Path,
                                                                data_dir: Path, mode: str) -> None:
    """Under torchrun every rank starts from rank 0's starting state (`runner.shared_start`):
    `--init correct` and `--learn-labels` start from an expert's float predictions, which may differ
    in the last bits between GPUs, and ranks that started apart would average the gradients of
    different runs. Two gloo processes whose experts disagree start from rank 0's images and
    label logits."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_distill, args=(port, str(convex_buffer), str(data_dir), str(tmp_path), mode), nprocs=2)
    zero, one = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for key in ("images", "logits", "labels"):
        assert torch.equal(one[key], zero[key]), key
    with store.open_synsets(tmp_path / "s.h5") as sf:
        syn = sf.read(sf.pick(None), checkpoint=True)
    assert torch.equal(syn.images, zero["images"])  # what rank 0 wrote: its own start
    if mode == "draws":
        assert syn.checkpoint.run["init_draws"]["chosen"] == 2  # rank 0's choice (rank 1 chose draw 1)


@pytest.fixture(scope="module")
def dist_buffer(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("dist") / "dist.h5"
    r = torchrun(*TINY_EXPERTS, "--data-dir", data_dir, "-o", out, cwd=out.parent)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_torchrun_experts_equal_single_process(dist_buffer: Path, data_dir: Path, tmp_path: Path) -> None:
    ref = tmp_path / "single.h5"
    r = single(*TINY_EXPERTS, "--data-dir", data_dir, "-o", ref, "--device", "cpu")
    assert r.exit_code == 0, r.output[-3000:]
    with h5py.File(dist_buffer) as a, h5py.File(ref) as b:
        assert a["experts/done"][()].all() and a["experts/done"].shape == (3,)
        for name in ("trajectories", "seeds", "test_accuracy"):
            assert np.array_equal(a["experts"][name][()], b["experts"][name][()]), name


def test_torchrun_distill_writes_valid_synset(dist_buffer: Path, data_dir: Path, tmp_path: Path) -> None:
    convexify_file(dist_buffer, ConvexifyConfig(interior=0), tmp_path / "c.h5")
    out = tmp_path / "syn.h5"
    args = ["distill", "--buffer", tmp_path / "c.h5", "-o", out, "--data-dir", data_dir, "--ipc", "2",
            "--syn-steps", "2", "--expert-epochs", "1", "--max-start-epoch", "1", "--iterations", "3", "--quiet"]
    r = torchrun(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    with store.open_artifact(out) as f:
        g = f["synsets"][sorted(f["synsets"])[0]]
        assert g["images"].shape == (20, 1, 28, 28) and np.isfinite(g["images"][()]).all()
        assert int(g.attrs["iterations"]) == 3
        assert g["checkpoint/generators"].shape[0] == 2  # one RNG state per rank, for --resume
    # Resuming with a different number of processes is refused with one line.
    r = single(*args[:-3], "--iterations", "4", "--resume", "--quiet", "--device", "cpu")
    assert_one_line_error(r, 2, "same number")


def _whole_and_resumed(args: list, tmp_path: Path, total: int, stop: int) -> tuple[Path, Path]:
    """The same torchrun distillation in one sitting of `total` iterations (full.h5) and in two:
    `stop` iterations, then --resume to `total` (part.h5)."""
    full, part = tmp_path / "full.h5", tmp_path / "part.h5"
    for out, sittings in ((full, [(total, ())]), (part, [(stop, ()), (total, ("--resume",))])):
        for iterations, extra in sittings:
            r = torchrun(*args, "-o", out, "--iterations", str(iterations), *extra, cwd=tmp_path)
            assert r.returncode == 0, r.stderr[-3000:]
    return full, part


def test_torchrun_levers_resume_bit_for_bit(dist_buffer: Path, data_dir: Path, tmp_path: Path) -> None:
    """Sampling windows and the EMA under torchrun: every rank samples from the same window and
    averages the same (all-reduced) updates, and a resume continues bit for bit."""
    convexify_file(dist_buffer, ConvexifyConfig(interior=0), tmp_path / "c.h5")
    args = ["distill", "--buffer", tmp_path / "c.h5", "--data-dir", data_dir, "--ipc", "2", "--syn-steps", "2",
            "--expert-epochs", "1", "--max-start-epoch", "1.5", "--min-start-epoch", "0.25", "--start-upper-init",
            "0.5", "--start-upper-iterations", "3", "--ema", "0.8", "--quiet"]
    full, part = _whole_and_resumed(args, tmp_path, total=4, stop=2)
    with h5py.File(full) as a, h5py.File(part) as b:
        ga, gb = (f["synsets"][sorted(f["synsets"])[0]] for f in (a, b))
        for key in ("images", "checkpoint/images_raw", "checkpoint/images_velocity", "checkpoint/generators"):
            assert np.array_equal(ga[key][()], gb[key][()]), key
        assert not np.array_equal(ga["images"][()], ga["checkpoint/images_raw"][()])
        assert ga.attrs["lr"] == gb.attrs["lr"]


def test_torchrun_lr_backoff_cuts_on_every_rank_and_resumes_bit_for_bit(dist_buffer: Path, data_dir: Path,
                                                                        tmp_path: Path) -> None:
    """`--lr-backoff` under torchrun: rank 0 scores the images and decides the cut, every rank
    goes back to the best images (a rank left behind would hang the next collective or mix other
    images into the averaged gradient); a sitting ending at the cut's evaluation, resumed, ends as
    the uninterrupted run does."""
    convexify_file(dist_buffer, ConvexifyConfig(interior=0), tmp_path / "c.h5")
    args = ["distill", "--buffer", tmp_path / "c.h5", "--data-dir", data_dir, "--ipc", "2", "--syn-steps", "2",
            "--expert-epochs", "1", "--max-start-epoch", "1", "--lr-img", "100000", "--eval-every", "3",
            "--eval-epochs", "30", "--lr-backoff", "0.1", "--quiet"]
    full, part = _whole_and_resumed(args, tmp_path, total=6, stop=3)
    with h5py.File(full) as f:
        g = f["synsets"][sorted(f["synsets"])[0]]
        cuts = json.loads(g["checkpoint"].attrs["run"])["backoffs"]
    assert cuts and cuts[0]["iteration"] == 3, "the setting no longer wrecks the images: the test needs a cut"
    with h5py.File(full) as a, h5py.File(part) as b:
        ga, gb = (f["synsets"][sorted(f["synsets"])[0]] for f in (a, b))
        for key in ("images", "checkpoint/images_velocity", "checkpoint/generators", "best/images"):
            assert np.array_equal(ga[key][()], gb[key][()]), key
        assert json.loads(gb["checkpoint"].attrs["run"])["backoffs"] == cuts

