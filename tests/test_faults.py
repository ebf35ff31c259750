"""SIGKILL at random points (issue 14 item 1) and at exact points (issue 24): every writer leaves
either the old content or the new one (or a consistent step between, where the format has one),
the file always opens and validates, and the same command run again finishes with the reference
result.

CI runs a sample (MCTOOL_FAULT_KILLS random kills per writer, default 3; MCTOOL_FAULT_EXACT exact
points per exact writer, default 3); `bench/faults.py` runs ≥ 50 random kills per writer and,
with --exact, every exact point, and prints the tables (tests/faultkit.py says how kills are drawn).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import h5py
import pytest

from mctool import store
from tests import faultkit
from tests.faultkit import Zygote

KILLS = int(os.environ.get("MCTOOL_FAULT_KILLS", "3"))
# Exact points per writer in CI, spread over its file-system calls (bench/faults.py --exact: all).
EXACT = int(os.environ.get("MCTOOL_FAULT_EXACT", "3"))
WRITERS = ["experts-new", "experts-append", "experts-convexify", "convexify-in-place", "convexify-o", "distill",
           "evaluate"]


@pytest.fixture(scope="module")
def zygote() -> Iterator[Zygote]:
    """One process with mctool imported, forking a child per run."""
    z = Zygote()
    yield z
    z.close()


@pytest.fixture(scope="module")
def templates(zygote: Zygote, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The old states, made by the commands."""
    return faultkit.build_templates(zygote, tmp_path_factory.mktemp("fault-templates"))


@pytest.mark.slow
@pytest.mark.parametrize("name", WRITERS)
def test_sigkill_leaves_old_or_new_and_the_rerun_finishes(name: str, zygote: Zygote, templates: Path,
                                                          tmp_path: Path) -> None:
    (writer,) = faultkit.writers(templates, [name])
    ref = faultkit.reference(zygote, writer, tmp_path / "work")
    tally = faultkit.Tally()
    attempts = 0
    rng = faultkit.random.Random(f"ci-{name}")
    while tally.kills < KILLS and attempts < 4 * KILLS + 10:
        attempts += 1
        faultkit.trial(zygote, writer, ref, tmp_path / "work", rng, tally)
    row = tally.row()
    assert tally.kills >= KILLS, row
    assert not tally.failures, row
    assert row["corrupt"] == 0 and tally.opened == tally.validated == tally.kills, row
    assert tally.reruns_ok == tally.kills, row


@pytest.mark.slow
@pytest.mark.parametrize("name", ["export-mtt", "export-ddranking", "export-png", "import"])
def test_a_kill_at_an_exact_point_leaves_old_or_new_and_the_rerun_finishes(name: str, zygote: Zygote,
                                                                           templates: Path, tmp_path: Path) -> None:
    """Issue 24: killed just before one of its file-system calls (a sample here, every one in
    bench/faults.py --exact), a writer leaves its old output or the new one, and the same command
    run again finishes with the new one and leaves nothing beside it."""
    faultkit.build_exact_templates(zygote, templates)
    (writer,) = faultkit.exact_writers(templates, [name])
    tally = faultkit.run_exact(zygote, writer, tmp_path, EXACT)
    row = tally.row()
    assert tally.calls >= 10 and tally.killed == tally.tried == min(EXACT, tally.calls), row
    assert tally.clean == tally.killed and not tally.problems, row


def test_the_export_judge_can_fail(tmp_path: Path) -> None:
    """A folder mixing an old file with new ones is neither old nor new."""
    old = {"images.pt": "a", "labels.pt": "b", "mctool_export.json": "x"}
    new = {"images.pt": "c", "labels.pt": "d", "mctool_export.json": "y"}
    assert faultkit.judge_export(old, old, new) == "old" and faultkit.judge_export(old, new, new) == "new"
    assert faultkit.judge_export(old, {**new, "labels.pt": "b"}, new) == "corrupt"
    assert faultkit.judge_export(None, None, new) == "old"
    assert faultkit.judge_export(old, {**new, "0000.png": "z"}, new) == "corrupt"  # a stale file kept
    assert faultkit.export_contents(tmp_path / "none") is None
    assert faultkit.exact_points(100, 4) == [1, 34, 67, 100] and faultkit.exact_points(3, 10) == [1, 2, 3]


def test_the_judges_can_fail(templates: Path) -> None:
    """The checks above see a mixed file: rows of another run, or a /convex of other positions."""
    old = faultkit.contents(templates / "buffer-convex.h5")
    other = faultkit.contents(templates / "buffer.h5")
    assert old is not None and other is not None
    new = dict(old)
    new["convex"] = {**old["convex"], "positions": [0, 1, 2, 3]}
    mixed = dict(old)
    mixed["convex"] = {**old["convex"], "rows": {0: "x", **{e: h for e, h in old["convex"]["rows"].items() if e}}}
    assert faultkit.judge_whole(old, old, new) == "old" and faultkit.judge_whole(old, new, new) == "new"
    assert faultkit.judge_whole(old, mixed, new) == "corrupt"
    rows = {"experts": {0: "a", 1: "b", 2: "c"}}
    assert faultkit.judge_rows(None, {"experts": {0: "a", 1: "b"}}, rows) == "partial"
    assert faultkit.judge_rows(None, {"experts": {0: "a", 2: "c"}}, rows) == "corrupt"  # not a prefix
    assert faultkit.judge_rows(None, {"experts": {0: "a", 1: "z"}}, rows) == "corrupt"  # another row
    assert faultkit.judge_rows({"experts": {0: "a"}}, {"experts": {}}, rows) == "corrupt"  # lost a row


def test_a_killed_writers_temporary_is_swept_a_live_ones_is_not(tmp_path: Path, buffer: Path) -> None:
    """A SIGKILL leaves the writer's temporary file (as large as the buffer for a rewrite): the
    next write to the same file removes it, but never one a live writer still holds."""
    from mctool.store import files

    target = tmp_path / "b.h5"
    target.write_bytes(buffer.read_bytes())
    dead, live, fresh = (tmp_path / f".b.h5.{n}.tmp" for n in ("dead0001", "live0001", "new00001"))
    for p in (dead, live, fresh):
        p.write_bytes(b"x" * 1000)
    old = time.time() - 60
    os.utime(dead, (old, old))
    os.utime(live, (old, old))
    fd = os.open(live, os.O_RDWR)
    try:
        assert files._try_lock(fd, files._TMP_LOCK_OFFSET)  # as a running writer holds its temporary
        with store.rewrite(target) as f:
            f.attrs["touched"] = True
        assert not dead.exists(), "the killed writer's temporary was left"
        assert live.exists() and fresh.exists(), "a live (or just created) temporary was removed"
        assert store.temporaries(target) == sorted([live, fresh])
    finally:
        os.close(fd)
    with h5py.File(target) as f:
        assert f.attrs["touched"]
