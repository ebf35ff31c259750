"""`mctool demo` end to end at toy size, on a tiny dataset in Fashion-MNIST's on-disk layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import pytest
import torch

from mctool.demo import DemoConfig, run
from tests.conftest import make_tiny_mnist

TINY = DemoConfig(experts=1, epochs=4, width=8, interior=1, iterations=2, eval_runs=1, eval_epochs=2, seed=3)


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_tiny_mnist(tmp_path_factory.mktemp("fashion"), per_class_train=10, per_class_test=5)
    shutil.move(root / "mnist", root / "fashion-mnist")
    return root


def test_demo_runs_every_stage_and_keeps_its_artifacts(tmp_path: Path, fashion_dir: Path, device: torch.device) -> None:
    out = tmp_path / "demo"
    r = run(TINY, out, fashion_dir, device)

    assert set(r["seconds"]) == {"experts", "convexify", "distill", "evaluate"}
    for key in ("buffer", "convex", "synset"):
        assert Path(r["files"][key]).exists()
    synset_file = Path(r["files"]["synset"])
    with h5py.File(synset_file, "r") as f:
        (name,) = f["synsets"].keys()
        evaluations = json.loads(f["synsets"][name].attrs["evaluations"])
    # The picture is named like `mctool distill`'s: synset.h5 -> synset-NAME.png.
    assert Path(r["png"]) == out / f"synset-{name}.png" and Path(r["png"]).exists()
    assert [e["kind"] for e in evaluations] == ["synset", "random-real"]
    assert r["distilled"]["mean"] == evaluations[0]["mean"] and r["random_real"]["mean"] == evaluations[1]["mean"]
    assert 0.0 <= r["distilled"]["mean"] <= 1.0 and r["distilled"]["runs"] == 1
    assert r["storage"]["ratio"] > 1.0  # K = 4 with one interior waypoint keeps 3 of 5 snapshots


def test_demo_run_again_reuses_finished_experts(tmp_path: Path, fashion_dir: Path) -> None:
    out = tmp_path / "demo"
    run(TINY, out, fashion_dir, torch.device("cpu"))
    with h5py.File(out / "buffer.h5", "r") as f:
        first = f["experts/test_accuracy"][()]
    again = run(TINY, out, fashion_dir, torch.device("cpu"))
    with h5py.File(out / "buffer.h5", "r") as f:
        assert f["experts/test_accuracy"].shape[0] == 1
        assert (f["experts/test_accuracy"][()] == first).all()
    assert again["experts_reused"] == 1
