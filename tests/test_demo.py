"""`mctool demo` end to end at toy size, on a tiny dataset in Fashion-MNIST's on-disk layout."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import h5py
import pytest

import mctool.demo
from mctool.core.errors import Interrupted
from mctool.core.progress import Reporter
from mctool.demo import DemoConfig, DemoResult, run
from tests.conftest import make_tiny_mnist
from tests.helpers import cli

TINY = DemoConfig(experts=1, epochs=4, width=8, interior=1, iterations=2, eval_runs=1, eval_epochs=2, seed=3)


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_tiny_mnist(tmp_path_factory.mktemp("fashion"), per_class_train=10, per_class_test=5)
    shutil.move(root / "mnist", root / "fashion-mnist")
    return root


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory, fashion_dir: Path, device) -> tuple[Path, DemoResult]:
    """One demo run through the library (on the test device), shared by the tests below."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    return out, run(TINY, out, fashion_dir, str(device))


def test_demo_runs_every_stage_and_keeps_its_artifacts(first_run: tuple[Path, DemoResult]) -> None:
    out, r = first_run
    assert set(r.seconds) == {"experts", "convexify", "distill", "evaluate"}
    for key in ("buffer", "convex", "synset"):
        assert Path(r.files[key]).exists()
    synset_file = Path(r.files["synset"])
    with h5py.File(synset_file, "r") as f:
        (name,) = f["synsets"].keys()
        evaluations = json.loads(f["synsets"][name].attrs["evaluations"])
    # The picture is named like `mctool distill`'s: synset.h5 -> synset-NAME.png.
    assert Path(r.png) == out / f"synset-{name}.png" and Path(r.png).exists()
    assert [e["kind"] for e in evaluations] == ["synset", "random-real"]
    assert r.distilled.mean == evaluations[0]["mean"] and r.random_real.mean == evaluations[1]["mean"]
    assert 0.0 <= r.distilled.mean <= 1.0 and r.distilled.runs == 1
    assert r.storage["ratio"] > 1.0  # K = 4 with one interior waypoint keeps 3 of 5 snapshots
    assert r.experts_reused == 0


def test_demo_command_reuses_finished_experts(first_run: tuple[Path, DemoResult], fashion_dir: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The end-to-end `mctool demo`, at toy size (DemoConfig.fast patched to TINY), in the
    folder of the first run: its expert is reused, and the same seed gives the same numbers."""
    out, first = first_run
    with h5py.File(out / "buffer.h5", "r") as f:
        accuracy = f["experts/test_accuracy"][()]
    monkeypatch.setattr(mctool.demo.DemoConfig, "fast", classmethod(lambda cls, seed=0: TINY))
    r = cli("demo", "--fast", "--seed", "3", "--out", out, "--data-dir", fashion_dir, "--device", "cpu", "--quiet",
            "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["experts_reused"] == 1 and doc["config"] == json.loads(json.dumps(first.config))
    assert doc["distilled"]["accuracies"] == first.distilled.accuracies
    assert doc["random_real"]["accuracies"] == first.random_real.accuracies
    with h5py.File(out / "buffer.h5", "r") as f:
        assert f["experts/test_accuracy"].shape[0] == 1
        assert (f["experts/test_accuracy"][()] == accuracy).all()


class _StopAt(Reporter):
    """Asks to stop (Ctrl-C) from the moment the demo announces stage `stage` ("[3/4]", "[4/4]")."""

    def __init__(self, stage: str) -> None:
        self.stage, self.asked = stage, False

    def log(self, message: str) -> None:
        self.asked = self.asked or message.startswith(self.stage)

    def should_stop(self) -> int:
        return int(signal.SIGINT) if self.asked else 0


@pytest.mark.parametrize("stage", ["[3/4]", "[4/4]"])
def test_an_interrupted_demo_says_to_run_the_demo_again(tmp_path: Path, fashion_dir: Path, stage: str) -> None:
    """Stopped while it distils or evaluates, the demo says what it keeps and how to go on: not
    distill's `--resume` (the demo has none) nor evaluate's "nothing was stored"."""
    with pytest.raises(Interrupted) as caught:
        run(TINY, tmp_path / "demo", fashion_dir, "cpu", _StopAt(stage))
    message = str(caught.value)
    assert "run the demo again" in message and "--resume" not in message and "nothing was stored" not in message
    assert (tmp_path / "demo" / "buffer.h5").exists()  # the experts the next run reuses
