"""Messages that send a user the right way (issue 25): one test per message."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

import mctool.demo
import mctool.distill
from tests.helpers import assert_one_line_error, cli
from tests.test_commands import demo_result, distill_result, patch

RELEASE = Path(__file__).parent / "data" / "release-0.1.0"


def test_a_mistyped_buffer_is_not_told_to_train_experts_into_it(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    r = cli("distill", "--buffer", "/nonexistent/buf.h5", "--device", "cpu")
    assert_one_line_error(r, 2, "/nonexistent/buf.h5: no such file (check the buffer's path)")
    assert "mctool experts" not in r.stderr
    # The default buffer name, absent: the recipe to make one.
    monkeypatch.chdir(tmp_path)
    r = cli("distill", "--device", "cpu")
    assert_one_line_error(r, 2, "buffer.h5: no such file — make experts first: `mctool experts")
    assert "mctool distill BUFFER" in r.stderr


def test_the_buffer_may_be_named_first_like_every_file_command(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = patch(monkeypatch, mctool.distill, "run", distill_result())
    assert cli("distill", "convex.h5", "--iterations", "3").exit_code == 0
    preset, overrides, buffer, *_ = fake.args
    assert buffer == Path("convex.h5") and overrides == {"iterations": 3}
    assert fake.kwargs["default_buffer"] is False
    assert cli("distill", "convex.h5", "--buffer", "convex.h5").exit_code == 0  # the same buffer twice: fine
    assert fake.calls[-1][0][2] == Path("convex.h5")
    assert_one_line_error(cli("distill", "a.h5", "--buffer", "b.h5"), 2, "two buffers given: a.h5 and --buffer b.h5")
    assert len(fake.calls) == 2
    # Not faked: a missing positional buffer is a missing file, not an "unexpected extra argument".
    monkeypatch.undo()
    assert_one_line_error(cli("distill", "/nonexistent/convex.h5"), 2, "/nonexistent/convex.h5: no such file")


def test_resume_takes_the_files_only_synset_and_says_so(tmp_path: Path, data_dir: Path) -> None:
    for name in ("compact", "synset"):
        shutil.copyfile(RELEASE / f"{name}.h5", tmp_path / f"{name}.h5")
    out = tmp_path / "synset.h5"
    # These options name 'mct-ipc10' (the default ipc); the file holds only 'mct-ipc2'.
    r = cli("distill", tmp_path / "compact.h5", "-o", out, "--resume", "--iterations", "4", "--data-dir", data_dir,
            "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert f"--resume: {out} holds no synset 'mct-ipc10'; continuing its only synset 'mct-ipc2'" in r.stderr
    assert "4/4 iterations" in cli("inspect", out).stdout
    # A name that is not there is refused with the names that are, and how to choose.
    r = cli("distill", tmp_path / "compact.h5", "-o", out, "--resume", "--name", "other", "--device", "cpu")
    assert_one_line_error(r, 2, "no synset named 'other' (has: mct-ipc2; choose one with --name)")


def test_an_unknown_option_points_to_the_subcommands_help(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    import mctool.core.allocator
    from mctool.cli import main

    monkeypatch.setattr(mctool.core.allocator, "tune_malloc", lambda: False)
    for argv, helps in ((["distill", "--bogus"], "`mctool distill --help`"), (["--bogus"], "`mctool --help`")):
        monkeypatch.setattr(sys, "argv", ["mctool", *argv])
        with pytest.raises(SystemExit) as exc:
            main()
        assert exc.value.code == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert "No such option: --bogus" in line and line.endswith(f"(see {helps})"), line


def test_missing_data_is_said_before_any_loading(tmp_path: Path, convex_buffer: Path) -> None:
    r = cli("experts", "cifar10", "--data-dir", tmp_path, "--no-download", "-o", tmp_path / "b.h5")
    assert_one_line_error(r, 2, "CIFAR-10 not found")  # the only line: no "loading cifar10 and fitting ZCA"
    # The same for commands that load the data an artifact was made with.
    r = cli("distill", convex_buffer, "-o", tmp_path / "s.h5", "--data-dir", tmp_path, "--device", "cpu")
    assert_one_line_error(r, 2, "MNIST not found", after_progress=True)  # after the note on the settings
    assert "loading" not in r.stderr


def test_demo_takes_o_like_every_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = patch(monkeypatch, mctool.demo, "run", demo_result([0.7], [0.5]))
    assert cli("demo", "--fast", "-o", tmp_path).exit_code == 0
    assert fake.args[1] == tmp_path


def test_inspect_says_which_bytes_per_expert_it_counts(buffer: Path) -> None:
    import json
    import os

    from mctool.cli.commands.inspect import _size

    st = os.stat(buffer)
    doc = json.loads(cli("inspect", buffer, "--json").stdout)["storage"]
    assert doc["file_size_per_expert"] == st.st_size / 2  # the fixture's 2 finished experts
    assert doc["file_bytes_per_expert"] == st.st_blocks * 512 / 2  # allocated blocks (the key since 0.1.0)
    text = cli("inspect", buffer).stdout
    assert f"this file: size {_size(st.st_size / 2)}/expert" in text
    if _size(st.st_blocks * 512 / 2) != _size(st.st_size / 2):
        assert f", {_size(st.st_blocks * 512 / 2)}/expert allocated on disk" in text
    assert "/expert on disk" not in text  # the old, unlabelled figure
