"""The HDF5 artifact: round trips, validation errors, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from mctool import artifact
from mctool.errors import ArtifactError
from mctool.nets import ModelSpec, build_model, param_layout

META = artifact.DatasetMeta(
    name="mnist", num_classes=3, channels=1, height=8, width=8, zca=True, zca_eps=0.1, mean=(0.5,), std=(0.25,),
    class_names=("a", "b", "c"), train_fingerprint="abc123", flip=False,
)
SPEC = ModelSpec(depth=1, width=4, channels=1, num_classes=3, im_size=(8, 8))


def make(path: Path) -> None:
    layout = param_layout(build_model(SPEC, seed=0))
    with artifact.atomic_write(path, copy_existing=False) as f:
        META.write(f)
        artifact.write_model(f, SPEC, layout)


def test_round_trip_metadata(tmp_path: Path) -> None:
    p = tmp_path / "a.h5"
    make(p)
    with artifact.open_artifact(p) as f:
        assert artifact.DatasetMeta.read(p, f) == META
        spec, layout = artifact.read_model(p, f)
        assert spec == SPEC
        assert layout == param_layout(build_model(SPEC))
        assert f.attrs["format"] == "mctool" and f.attrs["format_version"] == artifact.FORMAT_VERSION
        assert f.attrs["created"] and f.attrs["artifact_id"]


def test_expert_rows_round_trip_and_done_only_after_finish(tmp_path: Path) -> None:
    p = tmp_path / "b.h5"
    make(p)
    P = sum(artifact.layer_sizes(param_layout(build_model(SPEC))))
    traj = torch.randn(3, P)
    with artifact.open_artifact(p, "r+") as f:
        rows = artifact.ExpertRows(f, 2, epochs=2, num_params=P, num_layers=4, trajectories=True, num_waypoints=None)
        for k in range(3):
            rows.write_snapshot(1, k, traj[k])
        assert not rows.done().any()  # written but not finished: not done
        rows.finish(1, seed=7, test_accuracy=[0.1, 0.2, 0.3], train_loss=[float("nan"), 1.0, 0.5])
    with artifact.open_artifact(p) as f:
        assert artifact.done_experts(p, f).tolist() == [1]
        assert torch.equal(artifact.read_trajectory(p, f, 1), traj)
        assert f["experts/seeds"][1] == 7
        np.testing.assert_allclose(f["experts/test_accuracy"][1], [0.1, 0.2, 0.3])


def test_synset_round_trip(tmp_path: Path) -> None:
    p = tmp_path / "s.h5"
    make(p)
    images = torch.randn(6, 1, 8, 8)
    with artifact.atomic_write(p) as f:
        g = f.require_group("synsets").create_group("x")
        artifact.write_tensor(g, "images", images)
        artifact.write_tensor(g, "labels", torch.arange(3).repeat_interleave(2))
        g.attrs.update(artifact.provenance({"ipc": 2}, 5, {"file": "buf.h5"}))
    with artifact.open_artifact(p) as f:
        g = artifact.pick_synset(p, f, None)
        assert torch.equal(torch.from_numpy(g["images"][()]), images)
        assert artifact.json_attr(g, "config") == {"ipc": 2}
        assert int(g.attrs["seed"]) == 5
        assert "torch" in artifact.json_attr(g, "versions")
        with pytest.raises(ArtifactError, match="no synset named 'y'"):
            artifact.pick_synset(p, f, "y")


def test_atomic_write_keeps_old_file_on_error(tmp_path: Path) -> None:
    p = tmp_path / "c.h5"
    make(p)
    before = p.read_bytes()
    with pytest.raises(RuntimeError):
        with artifact.atomic_write(p) as f:
            f.create_group("synsets").create_group("half")
            raise RuntimeError("boom mid-write")
    assert p.read_bytes() == before
    assert [q.name for q in tmp_path.iterdir()] == ["c.h5"]  # no temporary left behind


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: None, "no such file"),
        (lambda p: p.write_text("root:x:0:0\n"), "not an HDF5 file"),
        (lambda p: h5py.File(p, "w").close(), "not an mctool artifact"),
    ],
)
def test_open_errors(tmp_path: Path, setup, message: str) -> None:
    p = tmp_path / "x.h5"
    setup(p)
    with pytest.raises(ArtifactError, match=message):
        with artifact.open_artifact(p):
            pass


def test_newer_format_version_and_missing_group(tmp_path: Path) -> None:
    p = tmp_path / "v.h5"
    make(p)
    with h5py.File(p, "r+") as f:
        f.attrs["format_version"] = 99
    with pytest.raises(ArtifactError, match="format_version 99 is newer"):
        with artifact.open_artifact(p):
            pass
    q = tmp_path / "w.h5"
    make(q)
    with artifact.open_artifact(q) as f:
        with pytest.raises(ArtifactError, match=r"no /convex group — run `mctool convexify FILE` first"):
            artifact.read_convex(q, f)


def test_inconsistent_convex_shapes(tmp_path: Path) -> None:
    p = tmp_path / "i.h5"
    make(p)
    with h5py.File(p, "r+") as f:
        g = f.create_group("convex")
        artifact.write_convex_attrs(g, artifact.ConvexMeta((0, 1, 2), "mct", False), {})
        g.attrs["complete"] = True
        g.create_dataset("waypoints", data=np.zeros((1, 3, 5), np.float32))  # wrong P
        g.create_dataset("beta", data=np.zeros((1, 3, 4), np.float32))
    with artifact.open_artifact(p) as f:
        with pytest.raises(ArtifactError, match="do not match"):
            artifact.read_convex(p, f)


def test_truncated_file(tmp_path: Path) -> None:
    p = tmp_path / "t.h5"
    make(p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError):
        with artifact.open_artifact(p):
            pass
