"""A dataset nobody tuned: buffer-derived defaults (mctool/distill/autoconfig.py), `distill --tune`
(mctool/distill/tune.py), folder: datasets in preset files, progress lines without a terminal."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mctool import store
from mctool.distill import autoconfig
from mctool.distill import DistillConfig, check_buffer_matches, resolve_config
from mctool.core.errors import UsageError
from mctool.distill import load_preset
from mctool.data.prepared import prepare_like
from mctool.distill.tune import (MIN_ITERATIONS, TuneConfig, plan_search, tune_prepared, tuning_val_size,
                         write_result_preset)
from tests.conftest import cli
from tests.test_presets import TABLE

SHAPES = {"cifar10": (10, 3, 32), "cifar100": (100, 3, 32), "tinyimagenet": (200, 3, 64)}


def facts(name: str, K: int = 50, **kw) -> autoconfig.BufferFacts:
    classes, channels, size = SHAPES[name]
    return autoconfig.BufferFacts(dataset=name, classes=classes, channels=channels, height=size, width=size, K=K,
                                  **kw)


# ------------------------------------------------------------------ the rules against Table A


@pytest.mark.parametrize("name", sorted(TABLE))
def test_rules_reproduce_table_a_where_it_is_regular(name: str) -> None:
    """The rules are fitted to Table A: lr_img, lr_lr and lr_init exactly, expert_epochs within 1,
    syn_steps within Table A's spread (20–50 at M = 4–5, no pattern in ipc), max_start_epoch exactly on the interpolation points (Tiny ImageNet ipc 1,
    the one point off the curve, excepted)."""
    row = TABLE[name]
    got = autoconfig.suggest(facts(row["dataset"], expert_lr=0.01), int(row["ipc"])).values
    assert got["lr_img"] == row["lr_img"]
    assert got["lr_init"] == row["lr_init"] or name == "cifar10-ipc50"  # Table A's one 1e-3
    assert got["lr_lr"] == row["lr_lr"] or name == "cifar10-ipc1"  # Table A's one 1e-7
    assert abs(got["expert_epochs"] - row["expert_epochs"]) <= 1
    assert got["syn_steps"] == 40 and 20 <= row["syn_steps"] <= 50
    if name != "tinyimagenet-ipc1":
        assert got["max_start_epoch"] == row["max_start_epoch"], got


def test_rules_give_our_fashion_mnist_preset_on_its_experts() -> None:
    """K = 6 experts on 1×28×28 (the demo's): the values of our tuned Fashion-MNIST preset,
    except max_start_epoch (the rule's 0.2 K for 100 images; the preset's 3 was tuned)."""
    f = autoconfig.BufferFacts("fashion-mnist", 10, 1, 28, 28, K=6, train_images=60000, expert_lr=0.01,
                               expert_batch=256)
    preset = load_preset("fashion-mnist-ipc10").values
    got = autoconfig.suggest(f, 10).values
    for key in ("syn_steps", "expert_epochs", "lr_img", "lr_lr", "lr_init"):
        assert got[key] == preset[key], key
    assert got["max_start_epoch"] == 1.2 and got["max_start_epoch"] + got["expert_epochs"] <= 6


def test_rules_respect_the_trajectory_and_the_experts_steps() -> None:
    """max_start_epoch + expert_epochs never passes K; syn_steps never exceeds the real steps it
    stands for; an image size outside Table A's gets a warning."""
    for K in (1, 2, 3, 4, 7, 20, 50, 200):
        for ipc in (1, 10, 50, 500):
            v = autoconfig.suggest(facts("cifar10", K=K), ipc).values
            assert 0 <= v["max_start_epoch"] < K and v["max_start_epoch"] + v["expert_epochs"] <= max(K, 1)
            assert 1 <= v["expert_epochs"] <= 5
    few = autoconfig.BufferFacts("folder:/x", 10, 1, 8, 8, K=30, train_images=200, expert_batch=256)
    choice = autoconfig.suggest(few, 10)
    assert choice.values["syn_steps"] == 5  # 1 step per epoch × M = 5 epochs
    assert choice.warnings and "--tune" in choice.warnings[0]
    assert not autoconfig.suggest(facts("cifar10"), 10).warnings


def test_start_fraction_is_monotone_and_hits_its_points() -> None:
    ns = np.unique(np.logspace(0, 5, 60).astype(int))
    fr = [autoconfig.start_fraction(int(n)) for n in ns]
    assert all(a <= b for a, b in zip(fr, fr[1:]))
    assert autoconfig.start_fraction(10) == 0.08 and autoconfig.start_fraction(100) == pytest.approx(0.2)
    assert autoconfig.start_fraction(500) == pytest.approx(0.6) and autoconfig.start_fraction(10**5) == 0.8


def test_distill_without_preset_uses_and_names_the_rules(tmp_path: Path, convex_buffer: Path,
                                                          data_dir: Path) -> None:
    """No --preset: the buffer's rules fill the settings no option gives, one note says which."""
    r = cli("distill", "--buffer", convex_buffer, "-o", tmp_path / "s.h5", "--data-dir", data_dir, "--ipc", "2",
            "--iterations", "2", "--lr-img", "50", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    with store.open_buffer(convex_buffer) as buf:
        f = autoconfig.facts(buf)
    want = autoconfig.suggest(f, 2).values
    assert f.K == 4 and f.train_images == 60000  # a named dataset: its standard size (not the fixture's)
    cfg = doc["config"]
    for key in ("syn_steps", "expert_epochs", "max_start_epoch", "lr_lr", "lr_init"):
        assert cfg[key] == want[key], key
    assert cfg["lr_img"] == 50.0
    note = doc["notes"][0]
    assert note.startswith("note: no --preset") and "lr_img 50 (your option)" in note
    assert f"syn_steps {want['syn_steps']}" in note and "--tune" in note
    assert "no --preset" in r.stderr


# ------------------------------------------------------------------ the search


def test_plan_fits_the_budget_and_says_what_it_dropped() -> None:
    roomy = plan_search(3600, t_iteration=0.5, t_eval=10, free=("lr_img", "max_start_epoch", "syn_steps"))
    assert roomy.stages == ("lr_img", "max_start_epoch", "syn_steps") and not roomy.dropped
    assert MIN_ITERATIONS <= roomy.iterations <= 200 and roomy.estimate_s <= 3600
    tight = plan_search(180, t_iteration=0.5, t_eval=10, free=("lr_img", "max_start_epoch", "syn_steps"))
    assert tight.estimate_s <= 180 and tight.iterations >= MIN_ITERATIONS
    assert tight.dropped == ("syn_steps",) and tight.stages == ("lr_img", "max_start_epoch")
    hopeless = plan_search(10, t_iteration=0.5, t_eval=10, free=("lr_img", "max_start_epoch", "syn_steps"))
    assert hopeless.stages == ("lr_img",) and len(hopeless.lr_factors) == 3 and hopeless.estimate_s > 10
    assert hopeless.dropped == ("max_start_epoch", "syn_steps", "lr_img × 0.3 and × 3")
    fixed = plan_search(3600, 0.5, 10, free=("syn_steps",))
    assert fixed.stages == ("syn_steps",)
    assert tuning_val_size(60000, 10) == 5000 and tuning_val_size(1347, 10) == 300 and tuning_val_size(90, 3) == 30


class _Poison:
    """A test split that may not be touched."""

    def __getattr__(self, name: str):
        raise AssertionError(f"the test split was read ({name})")

    def __getitem__(self, item):
        raise AssertionError("the test split was read")


def _tune(convex_buffer: Path, data_dir: Path, poison: bool = True, fixed: frozenset = frozenset()):
    with store.open_buffer(convex_buffer) as buf:
        base = resolve_config(None, {"ipc": 2, "syn_steps": 2, "iterations": 7, "seed": 3}, buf)
        prepared = prepare_like(buf.data, data_dir, torch.device("cpu"))
        if poison:
            prepared = dataclasses.replace(prepared, test_x=_Poison(), test_y=_Poison())
        tcfg = TuneConfig(minutes=30, iterations=2, eval_runs=2, eval_epochs=2, seed=3)
        return base, tune_prepared(base, buf, prepared, tcfg, set(fixed))


def test_tune_never_reads_the_test_split_and_writes_a_usable_preset(tmp_path: Path, convex_buffer: Path,
                                                                     data_dir: Path) -> None:
    base, result = _tune(convex_buffer, data_dir)
    stages = [c.stage for c in result.candidates]
    assert stages[0] == "base" and {"lr_img", "max_start_epoch", "syn_steps"} <= set(stages)
    lrs = {c.values["lr_img"] for c in result.candidates if c.stage == "lr_img"}
    assert {base.lr_img * 0.1, base.lr_img * 10} <= lrs and len(lrs) >= 4  # decades, then ×0.3 / ×3 of the best
    scored = [c for c in result.candidates if c.mean is not None]
    win = result.candidates[result.best_index]
    assert win.mean == max(c.mean for c in scored)
    for key in ("max_start_epoch", "syn_steps"):
        assert result.best[key] == win.values[key]
    # The full run (7 iterations) covers the winner's lr × iterations (2 per candidate) in more steps.
    assert result.best["lr_img"] == float(f"{win.values['lr_img'] * 2 / 7:.2g}")
    assert result.best["lr_lr"] == float(f"{base.lr_lr * 2 / 7:.2g}") and any("× 2/7" in n for n in result.notes)
    assert result.best["iterations"] == 7  # the user's run length, not the candidates'
    assert result.random_real is not None and 0 <= result.random_real["mean"] <= 1
    assert result.val_images == 100  # 300 training images: 30 per class would be all; a third is held out
    path = write_result_preset(result, tmp_path / "tuned.toml")
    text = path.read_text()
    assert text.startswith("# Found by `mctool distill --tune`") and "never the test split" in text
    assert "<- chosen" in text
    p = load_preset(path)
    assert p.values["source"] == "tuned" and p.values["lr_img"] == result.best["lr_img"]
    with store.open_buffer(convex_buffer) as buf:
        cfg = resolve_config(str(path), {}, buf)
        check_buffer_matches(cfg, buf)  # the dataset the preset names is the buffer's
    assert cfg.syn_steps == win.values["syn_steps"] and cfg.ipc == 2


def test_tune_is_seeded_and_keeps_fixed_settings(convex_buffer: Path, data_dir: Path) -> None:
    _, a = _tune(convex_buffer, data_dir, fixed=frozenset({"syn_steps", "max_start_epoch"}))
    _, b = _tune(convex_buffer, data_dir, poison=False, fixed=frozenset({"syn_steps", "max_start_epoch"}))
    assert [c.mean for c in a.candidates] == [c.mean for c in b.candidates]
    assert {c.stage for c in a.candidates} == {"base", "lr_img"}
    assert all(c.values["syn_steps"] == 2 for c in a.candidates)


def test_distill_tune_cli(tmp_path: Path, convex_buffer: Path, data_dir: Path) -> None:
    """--tune --tune-only prints the table and writes the preset that --preset then uses."""
    out = tmp_path / "s.h5"
    r = cli("distill", "--tune", "--tune-only", "--tune-minutes", "0.05", "--tune-epochs", "4", "--buffer",
            convex_buffer, "-o", out,
            "--data-dir", data_dir, "--ipc", "2", "--syn-steps", "2", "--max-start-epoch", "1", "--iterations", "3")
    assert r.exit_code == 0, r.output
    preset = tmp_path / "tuned-mnist-ipc2.toml"
    assert preset.is_file() and not out.exists()
    assert "validation" in r.stdout and "tuned preset:" in r.stdout and "* " in r.stdout
    assert "skipped" in r.stdout or "dropped" in r.stderr or "too small" in r.stdout  # 3 s cannot hold the search
    r2 = cli("distill", "--preset", preset, "--buffer", convex_buffer, "-o", out, "--data-dir", data_dir, "--quiet")
    assert r2.exit_code == 0, r2.output
    r3 = cli("distill", "--tune-only", "--buffer", convex_buffer)
    assert r3.exit_code == 2 and "--tune-only needs --tune" in r3.stderr
    r4 = cli("distill", "--tune", "--tune-epochs", "1", "--buffer", convex_buffer, "-o", out, "--data-dir", data_dir)
    assert r4.exit_code == 2 and "--tune-epochs must be >= 2" in r4.stderr


# ------------------------------------------------------------------ folder: datasets and presets


def test_preset_file_resolves_folder_dataset_against_its_own_folder(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    sub = tmp_path / "project"
    sub.mkdir()
    (sub / "p.toml").write_text('dataset = "folder:data/pets"\nipc = 1\nsyn_steps = 2\nexpert_epochs = 1.0\n'
                                'max_start_epoch = 1.0\nlr_img = 10.0\nlr_lr = 1e-6\nlr_init = 0.01\n')
    monkeypatch.chdir(tmp_path)  # not the preset's folder
    assert load_preset("project/p.toml").values["dataset"] == f"folder:{(sub / 'data' / 'pets').resolve()}"
    (sub / "abs.toml").write_text((sub / "p.toml").read_text().replace("folder:data/pets", "folder:/srv/pets"))
    assert load_preset(sub / "abs.toml").values["dataset"] == "folder:/srv/pets"


def test_tuned_preset_names_a_folder_inside_its_folder_relatively(tmp_path: Path) -> None:
    from mctool.distill.tune import TuneResult

    data = tmp_path / "mydata"
    cfg = dataclasses.asdict(DistillConfig(dataset=f"folder:{data}"))
    result = TuneResult(buffer="b.h5", dataset=cfg["dataset"], ipc=10, base={}, best=cfg, best_index=-1,
                        candidates=[], random_real=None, iterations=20, val_images=100, budget_s=60, seconds=1,
                        probe={})
    text = write_result_preset(result, tmp_path / "tuned.toml").read_text()
    assert 'dataset = "folder:mydata"' in text
    assert load_preset(tmp_path / "tuned.toml").values["dataset"] == f"folder:{data.resolve()}"
    elsewhere = write_result_preset(result, tmp_path / "other" / "tuned.toml").read_text()
    assert f'dataset = "folder:{data}"' in elsewhere


def test_dataset_mismatch_says_how_to_proceed(convex_buffer: Path) -> None:
    with store.open_buffer(convex_buffer) as buf:
        cfg = resolve_config("fashion-mnist-ipc10", {}, buf)
        with pytest.raises(UsageError) as err:
            check_buffer_matches(cfg, buf)
    msg = str(err.value)
    assert "drop --preset" in msg and "--tune" in msg and "'fashion-mnist'" in msg


# ------------------------------------------------------------------ progress without a terminal


def test_progress_heartbeat_without_figures(capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A long epoch of figure-less steps still prints the step count every `line_every` seconds
    (never more often than HEARTBEAT_MIN); figures are repeated on such lines once known."""
    from mctool.cli import render

    clock = [0.0]
    monkeypatch.setattr(render.time, "monotonic", lambda: clock[0])
    rep = render.RichReporter(line_every=30.0)
    rep.task("expert", "expert 0", total=100)
    for step in range(1, 61):
        clock[0] = step * 1.0  # one step per second
        rep.update("expert", advance=1)
    assert capsys.readouterr().err.splitlines() == ["expert 0: 30/100", "expert 0: 60/100"]
    rep.update("expert", advance=1, epoch="1/2", loss=0.5)
    clock[0] = 95.0
    rep.update("expert", advance=1)
    assert capsys.readouterr().err.splitlines() == ["expert 0: 61/100, epoch 1/2, loss 0.5",
                                                    "expert 0: 62/100, epoch 1/2, loss 0.5"]
    fast = render.RichReporter(line_every=0.0)
    clock[0] = 96.0
    fast.task("t", "t", total=None)
    fast.update("t", advance=1)
    clock[0] = 105.0
    fast.update("t", advance=1)
    clock[0] = 106.5
    fast.update("t", advance=1)
    assert capsys.readouterr().err.splitlines() == ["t: 3"]  # HEARTBEAT_MIN = 10 s after the task started


def test_long_commands_say_they_started_before_importing_torch() -> None:
    """`python -m mctool experts … 2>log` writes its first line before torch is imported."""
    import subprocess
    import sys

    from mctool.cli.launch import first_line

    assert first_line(["experts", "fashion-mnist", "--n", "1"]) == "mctool experts: starting (importing torch)"
    assert first_line(["distill", "--tune"]) is not None
    for quiet in (["experts", "-q"], ["experts", "--help"], ["distill", "--list-presets"], ["--version"], []):
        assert first_line(quiet) is None
    assert first_line(["inspect", "x.h5"]) is None and first_line(["inspect", "x.h5", "--png", "o.png"])
    code = ("import sys; sys.argv = ['mctool', 'experts', 'nosuchdataset']; import mctool.cli.launch as l; "
            "l.announce(sys.argv[1:], delay=0.0).join(); print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False" and done.stderr.startswith("mctool experts: starting")


def test_one_run_shows_no_spread() -> None:
    from mctool.cli.commands.evaluate import _signed
    from mctool.cli.render import mean_std
    from mctool.distill.tune import score_text

    assert _signed(0.012, 0.0, runs=1) == "+1.20 (n = 1)" and _signed(0.012, 0.003, runs=3) == "+1.20 ± 0.30"
    assert mean_std(0.5, 0.0, 1) == "50.00 (n = 1)" and score_text(0.5, 0.0, 1) == "50.00 (n = 1)"
    assert score_text(0.5, 0.01, 2) == "50.00 ± 1.00 (n = 2)"


def test_a_diverging_candidate_is_a_result_not_a_failure(convex_buffer: Path, data_dir: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """lr_img × 10 may blow the images up: that candidate is marked, the search goes on."""
    from mctool.distill import tune as tune_mod
    from mctool.core.errors import TrainingDiverged

    real = tune_mod._Search.distil

    def distil(self, cfg):
        if cfg.lr_img > 1000 and cfg.iterations > 0:
            raise TrainingDiverged("diverged")
        return real(self, cfg)

    monkeypatch.setattr(tune_mod._Search, "distil", distil)
    with store.open_buffer(convex_buffer) as buf:
        base = resolve_config(None, {"ipc": 2, "syn_steps": 2, "lr_img": 200.0, "iterations": 7}, buf)
        prepared = prepare_like(buf.data, data_dir, torch.device("cpu"))
        result = tune_prepared(base, buf, prepared, TuneConfig(iterations=2, eval_runs=1, eval_epochs=2),
                               {"syn_steps", "max_start_epoch"})
    notes = {c.values["lr_img"]: c.note for c in result.candidates}
    assert notes[2000.0] == "diverged" and result.candidates[result.best_index].values["lr_img"] != 2000.0


def test_horizon_scale() -> None:
    from mctool.distill.tune import horizon_scale

    assert horizon_scale(20, 100) == 0.2 and horizon_scale(20, 20) == 1.0 and horizon_scale(50, 10) == 1.0
    assert horizon_scale(0, 100) == 1.0


def test_tune_says_when_the_experts_are_no_better_than_real_images(convex_buffer: Path, data_dir: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from mctool.store.experts import ExpertsReference

    monkeypatch.setattr(store.Buffer, "reference", lambda self: ExpertsReference(0.0, 0.0, 2, 4))
    _, result = _tune(convex_buffer, data_dir, poison=False, fixed=frozenset({"syn_steps", "max_start_epoch"}))
    assert any("the experts reach 0.0 %" in n and "train the experts longer" in n for n in result.notes)
