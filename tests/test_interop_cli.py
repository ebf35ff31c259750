"""`mctool import` and `mctool export` end to end, and the scores `mctool evaluate` reports."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from tests.conftest import cli
from tests.interop_fixtures import flat, make_experts, tiny_spec, write_authors_pair, write_replay_buffer
from tests.test_cli import assert_one_line_error


drafted = cli


def test_import_command(tmp_path: Path, data_dir: Path) -> None:
    experts = make_experts(tiny_spec(), 3, 3, seed=9)
    folder = tmp_path / "MNIST" / "ConvNet"  # the scripts' naming: dataset and model from the folder
    write_replay_buffer(folder, 0, experts[:2])
    write_replay_buffer(folder, 2, experts[2:])
    out = tmp_path / "b.h5"
    # MNIST folders carry no _NO_ZCA suffix in the scripts, so ZCA must be stated.
    assert_one_line_error(drafted("import", folder, "-o", out, "--data-dir", data_dir), 2, "--zca or --no-zca")
    r = drafted("import", folder, "-o", out, "--no-zca", "--data-dir", data_dir, "--json", "--quiet",
                "--accuracy", "first")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["experts"] == 3 and doc["gaps"] == [1] and doc["model"]["width"] == 8
    assert any("folder nam" in n for n in doc["notes"])
    with h5py.File(out) as f:
        assert np.array_equal(f["experts/trajectories"][2], flat(experts[2]).numpy())
        acc = f["experts/test_accuracy"][()][:, -1]
        assert not np.isnan(acc[0]) and np.isnan(acc[1:]).all()  # --accuracy first
    r = drafted("import", folder, "-o", out, "--no-zca", "--data-dir", data_dir, "--quiet", "--depth", "4")
    assert_one_line_error(r, 2, "depth 3, not the depth 4")
    torch.save({"weights": torch.zeros(2)}, folder / "replay_buffer_3.pt")
    assert_one_line_error(drafted("import", folder, "-o", tmp_path / "c.h5", "--no-zca", "--data-dir", data_dir),
                          2, "replay_buffer_3.pt: holds a dict")
    assert_one_line_error(drafted("import", tmp_path / "nowhere", "--dataset", "mnist", "--no-zca"), 2,
                          "no such folder")


def test_import_compressed_and_kind(tmp_path: Path, data_dir: Path) -> None:
    experts = make_experts(tiny_spec(), 2, 4, seed=10)
    folder = tmp_path / "c"
    write_authors_pair(folder, 0, experts, 3)
    r = drafted("import", folder, "-o", tmp_path / "c.h5", "--dataset", "mnist", "--zca", "--data-dir", data_dir,
                "--json", "--quiet", "--accuracy", "none")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["positions"] == [0, 2, 4]
    write_replay_buffer(folder, 0, experts)
    assert_one_line_error(drafted("import", folder, "--dataset", "mnist", "--zca", "--data-dir", data_dir), 2,
                          "--kind")


@pytest.mark.parametrize("fmt", ["mtt", "ddranking", "png"])
def test_export_command(tmp_path: Path, convex_buffer: Path, data_dir: Path, fmt: str) -> None:
    syn = tmp_path / "syn.h5"
    r = cli("distill", "--buffer", convex_buffer, "-o", syn, "--data-dir", data_dir, "--ipc", "1", "--syn-steps", "2",
            "--expert-epochs", "1", "--max-start-epoch", "2", "--iterations", "1", "--quiet")
    assert r.exit_code == 0, r.output
    r = drafted("export", syn, "--format", fmt, "--data-dir", data_dir, "--json", "--quiet")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    target = Path(doc["folder"])
    assert target == tmp_path / f"syn-{fmt}" and "mctool_export.json" in doc["files"]
    if fmt == "mtt":
        # final images after 1 iteration (no --eval-every, so no best ones): MTT's name for them
        assert {"images_1.pt", "labels_1.pt", "lr_1.pt", "images_zca_1.pt"} <= set(doc["files"])
        assert not any("best" in f for f in doc["files"]) and doc["images"] == "final"
    if fmt == "png":
        assert sum(f.endswith(".png") for f in doc["files"]) == 10
    assert_one_line_error(drafted("export", syn, "--format", "tfrecord"), 2, "unknown --format")


def test_scores_for_evaluate() -> None:
    from mctool.evaluate.evaluation import Evaluation, scores
    from mctool.evaluate.scores import whole_data_accuracy

    def ev(kind: str, accs: list[float]) -> Evaluation:
        return Evaluation(kind=kind, model="ConvNet", accuracies=accs, mean=sum(accs) / len(accs), std=0.0,
                          runs=len(accs), epochs=1, lr=0.01, seeds=[], seed=0, images=10, date="", seconds_per_run=0,
                          config={})

    results = [ev("synset", [0.5, 0.6]), ev("random-real", [0.2, 0.4])]
    (s,) = scores(results, 0.75)
    assert s.gain == pytest.approx(0.25) and s.gain_std == pytest.approx(0.05)  # paired per run
    assert s.hlr == pytest.approx(0.20) and s.hlr_std == pytest.approx(0.05)
    (s,) = scores(results, None)
    assert s.hlr is None and "unknown" in s.note
    (s,) = scores(results, 0.75, soft_labels=True)
    assert s.hlr is None and "soft labels" in s.note
    assert whole_data_accuracy(None, 80.0) == (0.8, "option")  # a percentage is accepted
    assert whole_data_accuracy({"mean": 0.7}, None) == (0.7, "experts")
