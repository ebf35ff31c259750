"""The CLI contract end to end: exit codes, one-line errors, --json, inspect, signals.

The commands' own work (options -> config, tables, --json keys) is checked with the library
patched out in test_commands.py. One end-to-end run per command, through the real library:
experts and convexify — the `buffer` and `convex_buffer` fixtures (conftest.py) and
test_experts.py; distill — test_distill.py; evaluate — test_distill.py
(test_evaluate_stores_results_and_baseline); inspect — test_inspect_overview_and_json below;
demo — test_demo.py (test_demo_command_reuses_finished_experts). Files of the previous
release go through every command in test_release_files.py.
"""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import h5py
import pytest

from tests.helpers import assert_one_line_error, cli


def test_version_and_help() -> None:
    r = cli("--version")
    assert r.exit_code == 0 and "mctool" in r.stdout
    for cmd in ("experts", "convexify", "distill", "evaluate", "inspect", "demo"):
        r = cli(cmd, "--help")
        assert r.exit_code == 0, r.output
        assert "Examples" in r.stdout
        assert "<bool>" not in r.stdout and "--json" in r.stdout  # flags take no value: no type shown
        assert "<int>" in r.stdout or "<path>" in r.stdout  # options that take one still show it


def test_distill_help_names_the_defaults_no_preset_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    """distill's options default to "not given" (a preset or a resumed run fills them); those no
    preset sets still say the value a new run takes."""
    monkeypatch.setenv("COLUMNS", "400")  # one line per option
    text = cli("distill", "--help").stdout
    for option, default in (("--checkpoint-every", "100"), ("--eval-runs", "1"), ("--eval-epochs", "300"),
                            ("--select-on", "validation"), ("--seed", "0")):
        line = next(x for x in text.splitlines() if x.lstrip("│ ").startswith(f"{option} "))
        assert f"(default {default})." in line, line
    line = next(x for x in text.splitlines() if x.lstrip("│ ").startswith("--syn-steps "))  # a preset (or the buffer's rules) sets it
    assert "default" not in line, line


@pytest.mark.parametrize("kind", ["passwd", "truncated", "plain", "future", "missing", "directory"])
def test_inspect_bad_files(tmp_path: Path, buffer: Path, kind: str) -> None:
    p = tmp_path / "f.h5"
    if kind == "passwd":
        p = Path("/etc/passwd")
    elif kind == "truncated":
        data = buffer.read_bytes()
        p.write_bytes(data[: len(data) // 3])
    elif kind == "plain":
        with h5py.File(p, "w") as f:
            f["x"] = [1, 2, 3]
    elif kind == "future":
        p.write_bytes(buffer.read_bytes())
        with h5py.File(p, "r+") as f:
            f.attrs["format_version"] = 99
    elif kind == "directory":
        p = tmp_path
    assert_one_line_error(cli("inspect", p), 2)


def test_inspect_overview_and_json(buffer: Path) -> None:
    r = cli("inspect", buffer)
    assert r.exit_code == 0, r.output
    assert "experts 2/2 done" in r.stdout and "mnist" in r.stdout
    r = cli("inspect", buffer, "--json")
    assert r.exit_code == 0
    doc = json.loads(r.stdout)
    for key in ("file", "size_bytes", "format_version", "dataset", "model", "experts", "convex", "synsets", "storage"):
        assert key in doc
    assert doc["experts"]["done"] == 2 and doc["experts"]["epochs"] == 4
    assert doc["model"]["num_params"] == sum(
        math.prod(layer["shape"]) for layer in doc["model"]["layers"])
    assert len(doc["experts"]["test_accuracy_mean_curve"]) == 5


def test_experts_records_config_and_accuracy_rises(buffer: Path) -> None:
    with h5py.File(buffer) as f:
        cfg = json.loads(f["experts"].attrs["config"])
        assert cfg["epochs"] == 4 and cfg["width"] == 8 and cfg["seed"] == 1
        assert "torch" in json.loads(f["experts"].attrs["versions"])
        acc = f["experts/test_accuracy"][()]
        assert (acc[:, -1] > acc[:, 0] + 0.2).all(), acc  # the tiny dataset is easy
        traj = f["experts/trajectories"][()]
        # Snapshots are real copies: consecutive snapshots differ (the reference's CPU aliasing bug).
        assert all((abs(traj[e, k + 1] - traj[e, k]).max() > 0) for e in range(2) for k in range(4))


def test_experts_unknown_dataset_and_missing_cifar(tmp_path: Path) -> None:
    assert_one_line_error(cli("experts", "nope", "--data-dir", tmp_path, "-o", tmp_path / "b.h5"), 2, "nope")
    r = cli("experts", "cifar10", "--n", "1", "--data-dir", tmp_path, "-o", tmp_path / "b.h5")
    assert_one_line_error(r, 2, "cifar-10", after_progress=True)
    assert not (tmp_path / "b.h5").exists()


def test_experts_refuses_other_settings(buffer: Path, data_dir: Path) -> None:
    r = cli("experts", "mnist", "--data-dir", data_dir, "--n", "3", "--epochs", "5", "--width", "8",
            "--batch-size", "32", "--lr", "0.05", "-o", buffer, "--seed", "1")
    assert_one_line_error(r, 2, "epochs=4")


def test_convexify_refuses_bad_positions_with_one_line(tmp_path: Path, buffer: Path) -> None:
    """The library's refusals (tested in test_convex.py) reach the user as one line, exit 2."""
    assert_one_line_error(cli("convexify", buffer, "--positions", "0,3,2,4", "-o", tmp_path / "x.h5"), 2,
                          "3 is followed by 2")
    assert_one_line_error(cli("convexify", buffer, "--positions", "0,2,5", "-o", tmp_path / "x.h5"), 2)
    assert not (tmp_path / "x.h5").exists()


def test_inspect_convex(convex_buffer: Path) -> None:
    doc = json.loads(cli("inspect", convex_buffer, "--json").stdout)
    assert doc["convex"]["positions"] == [0, 2, 4]
    assert doc["convex"]["strategy"] == "mct" and doc["convex"]["smoothing"] == "none"
    assert doc["experts"]["has_trajectories"] is False
    st = doc["storage"]
    assert st["ratio"] == pytest.approx(st["full_bytes_per_expert"] / st["convex_bytes_per_expert"])
    assert doc["convex"]["beta_min"] == 0.0 and doc["convex"]["beta_max"] == 2.0


def test_unknown_option_is_one_line_via_the_console_script_entry(monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """`mctool` and `python -m mctool` call cli.main(); run it in-process (a fresh interpreter
    costs seconds) without tuning this process's malloc."""
    import sys

    import mctool.core.allocator
    from mctool.cli import main

    monkeypatch.setattr(mctool.core.allocator, "tune_malloc", lambda: False)
    monkeypatch.setattr(sys, "argv", ["mctool", "inspect", "x.h5", "--bogus"])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mctool: error: ") and "--bogus" in lines[0]


def test_disk_full_is_checked_before_writing(tmp_path: Path, buffer: Path, monkeypatch) -> None:
    import shutil
    from collections import namedtuple

    copy = tmp_path / "b.h5"
    copy.write_bytes(buffer.read_bytes())
    before = copy.read_bytes()
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    assert_one_line_error(cli("convexify", copy), 1, "disk full")
    assert_one_line_error(cli("convexify", copy, "-o", tmp_path / "c.h5"), 1, "disk full")
    assert copy.read_bytes() == before and not (tmp_path / "c.h5").exists()


def test_progress_lines_without_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    """No terminal (pytest captures stderr): progress becomes throttled plain lines."""
    from mctool.cli.render import RichReporter

    every = RichReporter(line_every=0.0)
    assert not every.bars
    every.task("expert", "expert 0", total=10)
    every.update("expert", advance=3)  # no figures: nothing to say
    every.update("expert", advance=2, epoch="1/2", acc=0.5)
    every.done("expert")
    assert capsys.readouterr().err.splitlines() == ["expert 0: 5/10, epoch 1/2, acc 0.5"]

    # A slow clock: the first figures at once, then only at epoch ends.
    slow = RichReporter(line_every=3600.0)
    slow.task("distill", "distill", total=None)
    slow.update("distill", advance=1, loss=1.0)
    slow.update("distill", advance=1, loss=0.9)
    slow.task("expert", "expert 1", total=4)
    slow.update("expert", advance=1, loss=2.0)
    slow.update("expert", advance=1, loss=1.5)
    slow.update("expert", advance=0, epoch="1/2", acc=0.3)
    assert capsys.readouterr().err.splitlines() == ["distill: 1, loss 1", "expert 1: 1/4, loss 2",
                                                    "expert 1: 2/4, epoch 1/2, acc 0.3"]
    quiet = RichReporter(quiet=True, line_every=0.0)
    quiet.task("distill", "distill", total=None)
    quiet.update("distill", advance=1, loss=1.0)
    assert capsys.readouterr().err == ""


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")  # must not reach pytest
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_first_signal_asks_the_library_to_stop_second_stops_at_once(capsys: pytest.CaptureFixture[str],
                                                                     signum: int) -> None:
    """The CLI owns the signals: the first one sets the flag the library polls (which stops at
    its next safe point with Interrupted); a second one raises KeyboardInterrupt at once, even
    when Python drops it inside a __del__ — the next progress update raises it again."""
    import typer

    from mctool.cli.common import run
    from mctool.core.progress import stop_if_asked

    steps: list[int] = []

    def polite(reporter) -> str:
        reporter.task("loop", "loop", total=None)
        for i in range(5):
            if i == 2:
                signal.raise_signal(signum)
            stop_if_asked(reporter, "saved up to step " + str(i))
            steps.append(i)
        return "finished"

    class RaisesInDestructor:
        def __del__(self) -> None:
            signal.raise_signal(signum)  # the second signal: its KeyboardInterrupt is dropped here

    def stubborn(reporter) -> str:
        reporter.task("loop", "loop", total=None)
        signal.raise_signal(signum)  # first: only a request
        for i in range(5):
            RaisesInDestructor()  # freed at once
            steps.append(i)
            reporter.update("loop", advance=1)
        return "finished"

    # As in a terminal, whatever this process inherited: a background job (`pytest &`) starts
    # with SIGINT ignored, which mctool rightly leaves alone.
    inherited = {s: signal.signal(s, signal.default_int_handler if s == signal.SIGINT else signal.SIG_DFL)
                 for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        for body, stopped_after in ((polite, [0, 1]), (stubborn, [0])):
            steps.clear()
            with pytest.raises(typer.Exit) as exc:
                run(body, quiet=True, debug=False)
            assert exc.value.exit_code == 128 + signum
            assert steps == stopped_after
            err = capsys.readouterr().err
            assert "Exception ignored" not in err and "Traceback" not in err  # just the one line
            (line,) = err.strip().splitlines()
            assert line.startswith("mctool: error: interrupted (")
            if body is polite:
                assert line.endswith("saved up to step 2")
        # restored for in-process callers
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        for s, handler in inherited.items():
            signal.signal(s, handler)


@pytest.mark.parametrize("bad, message", [
    (["--lr", "-1"], "--lr must be a finite number > 0"), (["--lr", "nan"], "--lr must be a finite number > 0"),
    (["--momentum", "1"], "--momentum must be in [0, 1)"), (["--weight-decay", "-1"], "--weight-decay must be a finite number >= 0"),
    (["--depth", "9"], "depth 5 at most"), (["--augment", "foo"], "foo"), (["--beta", "mct"], "only apply"),
    (["--positions", "0,2,4"], "only apply with --convexify"), (["--interior", "1"], "only apply with --convexify"),
])
def test_experts_bad_settings_are_refused_before_any_file_is_written(tmp_path: Path, data_dir: Path,
                                                                      bad: list[str], message: str) -> None:
    out = tmp_path / "b.h5"
    r = cli("experts", "mnist", "--data-dir", data_dir, "--epochs", "1", "--width", "4", "-o", out, *bad)
    assert_one_line_error(r, 2, message)
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["evaluate", "--runs", "0"], "--runs must be >= 1, got 0"), (["evaluate", "--models", ","], "--models names no model"),
    (["evaluate", "--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["evaluate", "--seed", "-1"], "--seed must be in 0"),
    (["evaluate", "--baseline-labels", "soft"], "--baseline-labels must be auto, hard or expert, got 'soft'"),
    (["evaluate", "--baseline-draws", "all"], "--baseline-draws must be per-run or one, got 'all'"),
    (["evaluate", "--labels", "soft"], "--labels must be auto or hard, got 'soft'"),
    (["convexify", "--interior", "-1"], "--interior must be >= 0, got -1"),
    (["convexify", "--beta", "nope"], "unknown --beta 'nope'"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_evaluate_and_convexify_refuse_bad_settings_before_opening_the_file(tmp_path: Path, args: list[str],
                                                                            message: str) -> None:
    missing = tmp_path / "missing.h5"  # the settings are refused before the file is looked at
    assert_one_line_error(cli(args[0], missing, *args[1:]), 2, message)
    assert list(tmp_path.iterdir()) == []


def test_distill_refuses_an_unknown_dsa_op_before_reading_the_buffer(tmp_path: Path) -> None:
    r = cli("distill", "--buffer", tmp_path / "missing.h5", "-o", tmp_path / "s.h5", "--ipc", "1",
            "--augment", "crop_foo")
    assert_one_line_error(r, 2, "--augment must be a DSA strategy: unknown augmentation op 'foo' in strategy 'crop_foo'")
    assert list(tmp_path.iterdir()) == []


def test_experts_with_nothing_to_do_counts_what_the_buffer_holds(tmp_path: Path, buffer: Path, data_dir: Path) -> None:
    r = cli("experts", "mnist", "--data-dir", data_dir, "--n", "1", "--epochs", "4", "--width", "8",
            "--batch-size", "32", "--lr", "0.05", "-o", buffer, "--seed", "1")
    assert r.exit_code == 0, r.output
    assert "already holds 2 finished expert(s)" in r.stdout


def test_a_synset_file_is_not_taken_for_a_buffer(tmp_path: Path, data_dir: Path, convex_buffer: Path) -> None:
    out = tmp_path / "s.h5"
    r = cli("distill", "--buffer", convex_buffer, "-o", out, "--data-dir", data_dir, "--iterations", "1", "--ipc", "1",
            "--syn-steps", "1", "--expert-epochs", "1", "--max-start-epoch", "1", "--quiet")
    assert r.exit_code == 0, r.output
    assert_one_line_error(cli("convexify", out), 2, "a synset file")
    assert_one_line_error(cli("experts", "mnist", "--data-dir", data_dir, "--epochs", "1", "--width", "4", "-o", out),
                          2, "a synset file")


def test_table_cells_show_a_missing_value_as_a_dash() -> None:
    """A run of 0 iterations has no loss: its table says '-', not the word 'None'."""
    from mctool.cli.render import cell

    assert cell(None) == "-" and cell(0.123456) == "0.1235" and cell(0) == "0" and cell("a\x1bb") == "a?b"
