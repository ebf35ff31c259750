"""mctool.convexify.runner.convexify_file on a real tiny buffer (the `buffer` fixture: 2 experts, K = 4).

Every test works on a copy; the fixture itself is never written.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from mctool import store
from mctool.convexify.runner import ConvexifyConfig, convexify_file
from mctool.core.errors import ArtifactError, Interrupted, UsageError
from mctool.core.progress import Reporter
from mctool.convexify.trajectory import convexify
from tests.helpers import Recorder


def copy(src: Path, folder: Path, name: str = "b.h5") -> Path:
    dst = folder / name
    shutil.copyfile(src, dst)
    return dst


def expected_rows(buffer: Path, positions: list[int], strategy: str, smooth: bool) -> dict[int, tuple]:
    """Waypoints and β of every expert, computed here from the stored trajectories."""
    with store.open_buffer(buffer) as buf:
        return {int(e): convexify(buf.trajectory(int(e)), buf.layer_sizes, positions, strategy, smooth)
                for e in buf.done_experts()}


def stored_rows(path: Path) -> tuple[store.ConvexMeta, dict[int, tuple]]:
    with store.open_buffer(path) as buf:
        return buf.convex.meta, {int(e): buf.convex_expert(int(e)) for e in buf.convex_experts()}


def experts_group(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {name: ds[()] for name, ds in f["experts"].items()}


def assert_rows(got: dict[int, tuple], want: dict[int, tuple]) -> None:
    assert sorted(got) == sorted(want)
    for e in want:
        assert torch.equal(got[e][0], want[e][0]) and torch.equal(got[e][1], want[e][1]), e


def test_in_place_adds_convex_and_keeps_everything_else(tmp_path: Path, buffer: Path) -> None:
    p = copy(buffer, tmp_path)
    with h5py.File(p, "r") as f:
        ident = f.attrs["artifact_id"]
    before = experts_group(p)
    result = convexify_file(p, ConvexifyConfig(interior=1))
    assert (result.file, result.experts, result.positions, result.strategy, result.smooth) == (str(p), 2, [0, 2, 4],
                                                                                                "mct", False)
    with store.open_buffer(p) as buf:
        params, layers = buf.num_params, len(buf.layer_sizes)
    assert result.bytes_per_expert_full == 5 * params * 4
    assert result.bytes_per_expert_convex == 3 * params * 4 + 5 * layers * 4
    assert result.ratio == pytest.approx(result.bytes_per_expert_full / result.bytes_per_expert_convex)
    meta, rows = stored_rows(p)
    assert meta == store.ConvexMeta((0, 2, 4), "mct", False)
    assert_rows(rows, expected_rows(p, [0, 2, 4], "mct", False))
    after = experts_group(p)
    for name, old in before.items():
        np.testing.assert_array_equal(after[name], old, err_msg=name)
    with h5py.File(p, "r") as f:
        assert f.attrs["artifact_id"] == ident and f["convex"].attrs["complete"]
    assert list(tmp_path.glob(".*.tmp")) == []


def test_in_place_replaces_an_existing_convex(tmp_path: Path, buffer: Path) -> None:
    p = copy(buffer, tmp_path)
    convexify_file(p, ConvexifyConfig(interior=1))
    log = Recorder()
    result = convexify_file(p, ConvexifyConfig(positions="0,1,3,4", strategy="uniform", smooth=True), reporter=log)
    assert result.positions == [0, 1, 3, 4] and result.strategy == "uniform" and result.smooth
    assert any("replacing the existing /convex" in line for line in log.lines)
    meta, rows = stored_rows(p)
    assert meta == store.ConvexMeta((0, 1, 3, 4), "uniform", True)
    assert_rows(rows, expected_rows(p, [0, 1, 3, 4], "uniform", True))
    with h5py.File(p, "r") as f:
        assert f["convex/waypoints"].shape[1] == 4  # the old rows are gone, not mixed in


def test_out_writes_a_compact_file_and_leaves_the_buffer_alone(tmp_path: Path, buffer: Path) -> None:
    src = copy(buffer, tmp_path)
    before = src.read_bytes()
    out = tmp_path / "sub" / "small.h5"  # missing folders are made
    result = convexify_file(src, ConvexifyConfig(interior=2, strategy="decreasing"), out)
    assert result.file == str(out) and result.positions == [0, 1, 3, 4]
    assert src.read_bytes() == before
    with store.open_buffer(out) as buf:
        info = buf.require_experts()
        assert not info.has_trajectories and info.trajectories_in == str(src.resolve())
        assert buf.done_experts().tolist() == [0, 1]
    _, rows = stored_rows(out)
    assert_rows(rows, expected_rows(src, [0, 1, 3, 4], "decreasing", False))
    full, compact = experts_group(src), experts_group(out)
    assert set(compact) == {"done", "seeds", "test_accuracy", "train_loss"}
    for name in compact:
        np.testing.assert_array_equal(compact[name], full[name], err_msg=name)
    # Its own earlier output is replaced.
    again = convexify_file(src, ConvexifyConfig(interior=1), out)
    assert again.positions == [0, 2, 4] and stored_rows(out)[0].positions == (0, 2, 4)


def test_out_refuses_to_replace_anything_but_its_own_compact_file(tmp_path: Path, buffer: Path,
                                                                  convex_buffer: Path) -> None:
    src = copy(buffer, tmp_path)
    text = tmp_path / "notes.txt"
    text.write_text("keep me")
    full = copy(buffer, tmp_path, "full.h5")
    streamed = copy(convex_buffer, tmp_path, "streamed.h5")  # like `experts --convexify`: the only copy
    with h5py.File(streamed, "r+") as f:
        del f["experts"].attrs["trajectories_in"]
    for target, held in ((text, "not an HDF5 file"), (full, "expert trajectories"),
                         (streamed, "convexified experts")):
        before = target.read_bytes()
        with pytest.raises(UsageError, match=f"already exists and holds .*{held}.*choose another -o"):
            convexify_file(src, ConvexifyConfig(interior=1), target)
        assert target.read_bytes() == before, target


def test_out_onto_the_buffer_itself_means_in_place(tmp_path: Path, buffer: Path) -> None:
    p = copy(buffer, tmp_path)
    assert convexify_file(p, ConvexifyConfig(interior=1), tmp_path / "." / "b.h5").file == str(p)
    with store.open_buffer(p) as buf:
        assert buf.require_experts().has_trajectories and buf.convex_state == "complete"


@pytest.mark.parametrize("cfg, message", [
    (ConvexifyConfig(positions="0,3,2,4"), "3 is followed by 2"),
    (ConvexifyConfig(positions="0,2,5"), "it ends at 5, not K=4"),
    (ConvexifyConfig(positions="0,x,4"), "comma-separated integers"),
    (ConvexifyConfig(interior=4), "4 interior waypoints need at least 5 epochs"),
    (ConvexifyConfig(interior=-1), "--interior must be >= 0"),
    (ConvexifyConfig(strategy="nope"), "unknown --beta 'nope'"),
], ids=["order", "end", "text", "too-many", "negative", "strategy"])
def test_bad_positions_are_refused_before_anything_is_written(tmp_path: Path, buffer: Path, cfg: ConvexifyConfig,
                                                              message: str) -> None:
    p = copy(buffer, tmp_path)
    before = p.read_bytes()
    for out in (None, tmp_path / "x.h5"):
        with pytest.raises(UsageError, match=message):
            convexify_file(p, cfg, out)
    assert p.read_bytes() == before and not (tmp_path / "x.h5").exists()


def test_every_epoch_a_waypoint_says_nothing_is_saved(tmp_path: Path, buffer: Path) -> None:
    log = Recorder()
    result = convexify_file(buffer, ConvexifyConfig(interior=3), tmp_path / "x.h5", log)
    assert result.positions == [0, 1, 2, 3, 4] and result.ratio < 1
    assert any("no smaller" in line for line in log.lines)
    quiet = Recorder()
    convexify_file(buffer, ConvexifyConfig(interior=1), tmp_path / "y.h5", quiet)
    assert not any("no smaller" in line for line in quiet.lines)


def test_what_cannot_be_convexified(tmp_path: Path, buffer: Path, convex_buffer: Path) -> None:
    with pytest.raises(UsageError, match="already convexified"):
        convexify_file(convex_buffer, ConvexifyConfig(interior=1), tmp_path / "x.h5")
    empty = copy(buffer, tmp_path, "empty.h5")
    with h5py.File(empty, "r+") as f:
        del f["experts"]
    with pytest.raises(ArtifactError, match="no /experts group"):
        convexify_file(empty, ConvexifyConfig())


class _StopAfter(Reporter):
    """Asks the run to stop (SIGTERM) once `rows` rows were written."""

    def __init__(self, rows: int) -> None:
        self.rows, self.written = rows, 0

    def update(self, key: str, advance: int = 0, **fields: object) -> None:
        self.written += advance

    def should_stop(self) -> int:
        return 15 if self.written >= self.rows else 0


@pytest.mark.parametrize("in_place", [True, False])
def test_a_stop_request_changes_nothing(tmp_path: Path, buffer: Path, in_place: bool) -> None:
    p = copy(buffer, tmp_path)
    before = p.read_bytes()
    out = None if in_place else tmp_path / "x.h5"
    with pytest.raises(Interrupted, match="interrupted \\(SIGTERM\\); nothing was changed") as exc:
        convexify_file(p, ConvexifyConfig(interior=1), out, _StopAfter(1))
    assert exc.value.exit_code == 143
    assert p.read_bytes() == before and not (tmp_path / "x.h5").exists()
    assert list(tmp_path.glob(".*.tmp")) == []
