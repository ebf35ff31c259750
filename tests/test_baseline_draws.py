"""`mctool evaluate --baseline-draws per-run|one`: the random-real baseline's runs each on their own
random draw of real images (the default), or all on one draw (earlier releases)."""

from __future__ import annotations

import dataclasses
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch

import mctool.evaluate.evaluation as ev_mod
from mctool import store
from mctool.configs.evaluate import draw_count
from mctool.data.prepared import sample_per_class
from mctool.evaluate.evaluation import EvaluateConfig, evaluate_file, evaluate_set, random_real, run_seed
from mctool.models import ModelSpec, layout_of
from tests.helpers import assert_one_line_error, cli

SPEC = ModelSpec(width=8, channels=1, num_classes=10, im_size=(28, 28))
# Runs one after another (never stacked), so that a run's accuracy is bit for bit the same whichever
# other runs train beside it.
TINY = EvaluateConfig(runs=2, epochs=1, seed=3, together=False)
RELEASE = Path(__file__).parent / "data" / "release-0.1.0"


@pytest.fixture(scope="module")
def prepared(data_dir: Path):
    from mctool.data.prepared import prepare

    return prepare("mnist", data_dir, zca=True, zca_eps=0.1, device=torch.device("cpu"))


@pytest.fixture()
def synset(tmp_path: Path, prepared) -> Path:
    """A hard-label synset of ipc 1 (no best images), written as distill would."""
    x, y = random_real(prepared, 1, seed=11)
    path = tmp_path / "synset.h5"
    store.save_synset(path, store.Synset(name="s", images=x, labels=y, lr=0.02, ipc=1, iterations=5),
                      prepared.meta, SPEC, layout_of(SPEC), store.provenance({"ipc": 1}, 0))
    return path


def baseline_of(path: Path, cfg: EvaluateConfig, data_dir: Path) -> tuple[ev_mod.EvaluateResult, ev_mod.Evaluation]:
    result = evaluate_file(path, cfg, baseline="random", save=False, data_dir=data_dir, device="cpu")
    (base,) = [r for r in result.results if r.kind == "random-real"]
    return result, base


def test_the_default_is_a_draw_per_run() -> None:
    assert EvaluateConfig().baseline_draws == "per-run"


def test_one_run_per_run_equals_one(synset: Path, prepared, data_dir: Path) -> None:
    cfg = dataclasses.replace(TINY, runs=1)
    per_run, base = baseline_of(synset, cfg, data_dir)
    one, one_base = baseline_of(synset, dataclasses.replace(cfg, baseline_draws="one"), data_dir)
    assert base.accuracies == one_base.accuracies and base.seeds == one_base.seeds == [run_seed(3, 0, 0)]
    assert [r.accuracies for r in per_run.results] == [r.accuracies for r in one.results]
    assert (base.config["baseline_draws"], one_base.config["baseline_draws"]) == ("per-run", "one")


def test_draws_differ_and_draw_zero_is_the_single_draw(prepared) -> None:
    x0, y0 = random_real(prepared, 2, seed=3, draw=0)
    x, y = random_real(prepared, 2, seed=3)  # the draw earlier releases made
    assert torch.equal(x0, x) and torch.equal(y0, y)
    # ... from the generator those releases seeded: (seed, 0xBA5E), the run index not in it.
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence([3, 0xBA5E]).generate_state(1)[0]))
    sel = sample_per_class(prepared.train_y, 10, 2, gen)
    assert torch.equal(x0, prepared.train_x[sel]) and torch.equal(y0, prepared.train_y[sel])
    x1, y1 = random_real(prepared, 2, seed=3, draw=1)
    assert torch.equal(y1, y0)  # ipc per class, class by class, either draw
    assert not torch.equal(x1, x0)
    again, _ = random_real(prepared, 2, seed=3, draw=1)
    assert torch.equal(again, x1)  # a draw repeats under its seed
    assert not torch.equal(random_real(prepared, 2, seed=3, draw=2)[0], x1)
    assert not torch.equal(random_real(prepared, 2, seed=4, draw=1)[0], x1)


def test_each_draw_is_labelled_by_the_expert_the_same_way(prepared) -> None:
    weight = torch.randn(prepared.train_x[0].numel(), 10, generator=torch.Generator().manual_seed(0))

    def expert(images: torch.Tensor) -> torch.Tensor:  # a fixed linear "expert"
        return images.flatten(1) @ weight

    for draw in (0, 1):
        x, y = random_real(prepared, 1, seed=3, expert=expert, draw=draw)
        assert y.shape == (10, 10) and torch.allclose(y, torch.softmax(expert(x), dim=1))
    assert not torch.equal(random_real(prepared, 1, seed=3, expert=expert, draw=1)[0],
                           random_real(prepared, 1, seed=3, expert=expert)[0])


def test_per_run_trains_run_r_on_draw_r(synset: Path, prepared, data_dir: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    drawn: list[int] = []
    real = ev_mod.random_real

    def recording(*args, draw: int = 0, **kwargs):
        drawn.append(draw)
        return real(*args, draw=draw, **kwargs)

    monkeypatch.setattr(ev_mod, "random_real", recording)
    result, base = baseline_of(synset, TINY, data_dir)
    assert drawn == [0, 1]
    _, one = baseline_of(synset, dataclasses.replace(TINY, baseline_draws="one"), data_dir)
    assert drawn == [0, 1, 0]
    # Run 0: the same draw and network seed as the single-draw baseline's run 0; run 1: draw 1.
    assert base.accuracies[0] == one.accuracies[0]
    x1, y1 = random_real(prepared, 1, TINY.seed, draw=1)
    (alone,) = evaluate_set(x1, y1, 0.02, prepared, SPEC, TINY, "random-real", runs=[1])
    assert base.accuracies[1] == alone.accuracies[0] and alone.seeds == [run_seed(3, 0, 1)]
    x0, y0 = random_real(prepared, 1, TINY.seed)
    (both,) = evaluate_set(x0, y0, 0.02, prepared, SPEC, TINY, "random-real")
    assert one.accuracies == both.accuracies  # `one`: both runs on draw 0
    # One Evaluation per model, its runs in order, mean and std over them all.
    assert (base.runs, base.images, base.kind, base.lr) == (2, 10, "random-real", 0.02)
    assert base.mean == statistics.fmean(base.accuracies) and base.std == statistics.pstdev(base.accuracies)
    assert base.config == dataclasses.asdict(TINY) and base.config["baseline_draws"] == "per-run"
    assert base.seconds_per_run > 0


def test_the_baseline_seeds_pair_with_the_synsets(synset: Path, data_dir: Path) -> None:
    cfg = dataclasses.replace(TINY, models=("ConvNet", "MLP"))
    for draws in ("per-run", "one"):
        result = evaluate_file(synset, dataclasses.replace(cfg, baseline_draws=draws), baseline="random",
                               save=False, data_dir=data_dir, device="cpu")
        syn = {r.model: r for r in result.results if r.kind == "synset"}
        base = {r.model: r for r in result.results if r.kind == "random-real"}
        assert list(base) == ["ConvNet", "MLP"]
        for mi, model in enumerate(cfg.models):
            assert base[model].seeds == syn[model].seeds == [run_seed(3, mi, r) for r in range(2)]
        for score in result.scores:  # the gain: per-run differences, paired by seed
            diffs = [s - b for s, b in zip(syn[score.model].accuracies, base[score.model].accuracies)]
            assert score.gain == pytest.approx(statistics.fmean(diffs))
            assert score.gain_std == pytest.approx(statistics.pstdev(diffs))
            assert score.random_real_runs == 2


def test_a_bad_value_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "missing.h5"  # refused before the file is looked at
    assert_one_line_error(cli("evaluate", missing, "--baseline-draws", "two"), 2,
                          "--baseline-draws must be per-run or one, got 'two'")


def test_the_table_and_inspect_say_how_many_draws(synset: Path, data_dir: Path) -> None:
    base = ("evaluate", synset, "--runs", "2", "--epochs", "1", "--data-dir", data_dir, "--device", "cpu", "--quiet",
            "--baseline", "random")
    r = cli(*base, "--baseline-draws", "one", "--no-save")
    assert r.exit_code == 0 and "random-real (1 draw)" in r.stdout, r.output
    r = cli(*base)  # the default, stored
    assert r.exit_code == 0 and "random-real (2 draws)" in r.stdout, r.output
    r = cli("inspect", synset)
    assert r.exit_code == 0 and "random real images (baseline, 2 draws)" in r.stdout, r.output


def test_a_record_without_the_setting_is_one_draw(tmp_path: Path) -> None:
    path = tmp_path / "synset.h5"
    shutil.copyfile(RELEASE / "synset.h5", path)  # 0.1.0: a random-real baseline of 2 runs, one draw
    with store.open_synsets(path) as sf:
        (old,) = [e for e in sf.read("mct-ipc2").evaluations if e["kind"] == "random-real"]
    assert "baseline_draws" not in old["config"] and old["runs"] == 2
    assert draw_count(old["config"], old["runs"]) == 1
    r = cli("inspect", path)
    assert r.exit_code == 0, r.output
    line = next(t for t in r.stdout.splitlines() if "random real images" in t)
    assert "random real images (baseline)" in line and "draw" not in line
    # Anything else read from a file counts as one draw, never a failure.
    for config, runs in (({"baseline_draws": "per-run"}, "2"), ({"baseline_draws": "per-run"}, True), ("x", 2),
                         (None, 2), ({"baseline_draws": "one"}, 5)):
        assert draw_count(config, runs) == 1
    assert draw_count({"baseline_draws": "per-run"}, 3) == 3
