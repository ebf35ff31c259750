"""Issue 24's import and folder-reader items, each rerun as written (tests/hostile_import.py): a
one-line refusal with exit 2 and no output left, or a correct result — never a hang, a traceback,
an internal error or a memory blow-up."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.hostile_import import CASES, Case, run_case


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_import_ends_clean(case: Case, tmp_path: Path, data_dir: Path) -> None:
    outcome = run_case(case, tmp_path / "case", data_dir)
    assert outcome.clean, f"item {case.item}, {case.name}: {outcome.why}"


def test_a_stop_request_ends_the_import_after_an_expert_and_the_rerun_resumes(tmp_path: Path,
                                                                              data_dir: Path) -> None:
    """SIGTERM / Ctrl-C (the CLI's handler sets the reporter's flag) stop an import after the expert
    being written; finished rows are kept and the same call completes them."""
    import h5py
    import signal

    from mctool.core.errors import Interrupted
    from mctool.interop.importer import ImportConfig, run
    from mctool.core.progress import Reporter
    from tests.interop_fixtures import make_experts, tiny_spec, write_replay_buffer

    class StopAfterFirst(Reporter):
        def __init__(self) -> None:
            self.rows = 0

        def update(self, key: str, advance: int = 0, **fields) -> None:
            self.rows += advance

        def should_stop(self) -> int:
            return int(signal.SIGTERM) if self.rows >= 1 else 0

    write_replay_buffer(tmp_path / "b", 0, make_experts(tiny_spec(), 3, 3, seed=2))
    cfg = ImportConfig(dataset="mnist", zca=False, accuracy="none")
    out = tmp_path / "o.h5"
    with pytest.raises(Interrupted, match="SIGTERM"):
        run(tmp_path / "b", out, cfg, data_dir=data_dir, device="cpu", download=False, reporter=StopAfterFirst())
    with h5py.File(out) as f:
        assert f["experts/done"][()].tolist() == [True, False, False]
    result = run(tmp_path / "b", out, cfg, data_dir=data_dir, device="cpu", download=False)
    assert result.already_done == 1 and result.imported == 2


def test_images_are_checked_from_their_headers_before_decoding(tmp_path: Path, monkeypatch) -> None:
    from PIL import Image

    from mctool.data import datasets as data
    from mctool.core.errors import UsageError

    converted: list[tuple[int, int]] = []
    real = Image.Image.convert

    def spy(self, *args, **kw):
        converted.append(self.size)
        return real(self, *args, **kw)

    monkeypatch.setattr(Image.Image, "convert", spy)
    for split in ("train", "test"):
        for cls in ("a", "b"):
            d = tmp_path / "pets" / split / cls
            d.mkdir(parents=True)
            Image.new("RGB", (8, 8), (1, 2, 3)).save(d / "0.png")
    Image.new("RGB", (40, 30)).save(tmp_path / "pets" / "train" / "b" / "1.png")
    with pytest.raises(UsageError, match="is 40x30 pixels but the other images are 8x8"):
        data.load_dataset(f"folder:{tmp_path / 'pets'}")
    assert (40, 30) not in converted  # refused from the header
    (tmp_path / "pets" / "train" / "b" / "1.png").unlink()
    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 63)
    converted.clear()
    with pytest.raises(UsageError, match="is 8x8 pixels, more than mctool reads"):
        data.load_dataset(f"folder:{tmp_path / 'pets'}")
    assert not converted
    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 4096 * 4096)
    monkeypatch.setattr("mctool.matching.memory.free_bytes", lambda device: 1000)
    with pytest.raises(UsageError, match=r"4 images of 8x8 pixels need about"):
        data.load_dataset(f"folder:{tmp_path / 'pets'}")
    assert not converted


@pytest.mark.parametrize("first_expert", ["tensor", "tensor-in-list", "list-too-deep"])
def test_a_waypoint_file_of_another_structure_is_one_line(tmp_path: Path, data_dir: Path, first_expert: str) -> None:
    """The first waypoint's shapes are read through the same checks as every other (was: TypeError /
    AttributeError internal errors)."""
    import torch

    from mctool.interop.importer import ImportConfig, run
    from mctool.interop.torchfile import TorchFileError
    from tests.interop_fixtures import make_experts, tiny_spec, write_authors_pair

    write_authors_pair(tmp_path / "b", 0, make_experts(tiny_spec(), 1, 3, seed=4), 3)
    z = torch.zeros(2)
    obj = {"tensor": [z], "tensor-in-list": [[z]], "list-too-deep": [[[[z]]]]}[first_expert]
    torch.save(obj, tmp_path / "b" / "waypoint_buffer_ip3_0.pt")
    cfg = ImportConfig(dataset="mnist", zca=False, accuracy="none")
    with pytest.raises(TorchFileError, match="expected a list of|a list where a tensor belongs") as info:
        run(tmp_path / "b", tmp_path / "o.h5", cfg, data_dir=data_dir, device="cpu", download=False)
    assert "\n" not in str(info.value) and not (tmp_path / "o.h5").exists()


def test_sigterm_stops_a_running_import_with_one_line_and_the_rerun_resumes(tmp_path: Path, data_dir: Path) -> None:
    """The CLI end to end: SIGTERM while rows are written ends the import at the next expert (exit
    143, one line), the rows written so far are kept, the same command completes them."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import h5py

    from tests.hostile_import import REPO, _env, _import
    from tests.interop_fixtures import make_experts, tiny_spec, write_replay_buffer

    n = 60
    write_replay_buffer(tmp_path / "b", 0, make_experts(tiny_spec(width=32), n, 3, seed=6))
    out = tmp_path / "o.h5"
    argv = [sys.executable, "-m", "mctool", *_import(tmp_path / "b", out, data_dir)]
    argv[argv.index("none")] = "last"  # a test-set pass per expert: rows take a while
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_env(), cwd=REPO)
    deadline = time.monotonic() + 120
    while not out.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    with h5py.File(out) as f:
        done = int(f["experts/done"][()].sum())
    if proc.returncode == 0:
        pytest.skip(f"the import finished before the signal ({done} rows)")
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert lines[-1].startswith("mctool: error: interrupted (SIGTERM)") and "resume" in lines[-1], stderr
    assert done < n, done
    r = subprocess.run(argv, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    with h5py.File(out) as f:
        assert bool(f["experts/done"][()].all())
