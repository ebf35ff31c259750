"""A dataset nobody tuned: buffer-derived defaults (mctool/distill/autoconfig.py), `distill --tune`
(mctool/distill/tune.py), folder: datasets in preset files, progress lines without a terminal."""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mctool import store
from mctool.core.progress import Reporter
from mctool.distill import autoconfig
from mctool.distill import DistillConfig, check_buffer_matches, resolve_config
from mctool.core.errors import UsageError
from mctool.distill import load_preset
from mctool.distill.runner import selection_every
from mctool.data.prepared import prepare_like
from mctool.distill.tune import (LR_DECADES, LR_DECADES_SMALL, NEIGHBOURS, TuneConfig, plan_search, tune_prepared,
                         tuning_val_size, write_result_preset)
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
    # lr_lr's rule reads the rules' lr_img, not --lr-img: the note says so rather than imply 1e-5 · 50 / 1e3.
    assert f"lr_lr {want['lr_lr']:g} (1e-5 · lr_img / 1e3, Table A; with the rules' lr_img {want['lr_img']:g}, " \
           "not your option's)" in note
    assert "expert_epochs, not your option's" not in note  # expert_epochs was not given
    assert f"syn_steps {want['syn_steps']}" in note and "--tune" in note
    assert "no --preset" in r.stderr


# ------------------------------------------------------------------ the search

ALL = ("lr_img", "max_start_epoch", "syn_steps", "expert_epochs")


def test_plan_fits_the_budget_reaches_the_run_and_says_what_it_dropped() -> None:
    """The plan is fitted to the measured costs: within the budget; survivors at a quarter of the
    full run when the budget allows; smaller searches (and said) when it does not."""
    roomy = plan_search(3600, t_iteration=0.5, t_eval=10, free=ALL, full_iterations=400)
    assert roomy.fits and roomy.estimate_s <= 3600 and not roomy.dropped
    assert roomy.lr_factors == LR_DECADES and roomy.neighbours == NEIGHBOURS
    assert roomy.top >= 100 and roomy.top <= 400  # a quarter of the full run at least
    h = roomy.horizons
    assert all(b == min(2 * a, 400) for a, b in zip(h, h[1:])) and h[0] >= 4  # h, 2h, 4h, …
    tight = plan_search(300, t_iteration=0.5, t_eval=10, free=ALL, full_iterations=400)
    assert tight.fits and tight.estimate_s <= 300 and tight.dropped  # fewer candidates, said
    assert tight.top >= 100 or tight.lr_factors == LR_DECADES_SMALL
    hopeless = plan_search(10, t_iteration=0.5, t_eval=10, free=ALL, full_iterations=400)
    assert not hopeless.fits and hopeless.lr_factors == LR_DECADES_SMALL and hopeless.neighbours == ()
    assert "lr_img × 0.01 and × 100" in hopeless.dropped
    fixed = plan_search(3600, 0.5, 10, free=("syn_steps",), full_iterations=400)
    assert fixed.lr_factors == (1.0,) and fixed.neighbours == ("syn_steps",)
    short = plan_search(3600, 0.5, 10, free=ALL, full_iterations=10)
    assert short.top == 10 and max(short.horizons) <= 10  # never beyond the run it tunes
    # A budget that cannot reach a quarter of a long run: the farthest horizon it can, within a
    # factor 2, with the richest search that gets there.
    long = plan_search(600, 0.5, 10, free=ALL, full_iterations=100000)
    assert long.fits and long.top < 25000 and long.estimate_s <= 600
    assert tuning_val_size(60000, 10) == 5000 and tuning_val_size(1347, 10) == 300 and tuning_val_size(90, 3) == 30


class _Poison:
    """A test split that may not be touched."""

    def __getattr__(self, name: str):
        raise AssertionError(f"the test split was read ({name})")

    def __getitem__(self, item):
        raise AssertionError("the test split was read")


def _tune(convex_buffer: Path, data_dir: Path, poison: bool = True, fixed: frozenset = frozenset(),
          minutes: float = 30, iterations: int = 2, full: int = 7, overrides: dict | None = None,
          reporter=None):
    with store.open_buffer(convex_buffer) as buf:
        base = resolve_config(None, {"ipc": 2, "syn_steps": 2, "iterations": full, "seed": 3, **(overrides or {})},
                              buf)
        prepared = prepare_like(buf.data, data_dir, torch.device("cpu"))
        if poison:
            prepared = dataclasses.replace(prepared, test_x=_Poison(), test_y=_Poison())
        tcfg = TuneConfig(minutes=minutes, iterations=iterations, eval_runs=2, eval_epochs=2, seed=3)
        kw = {} if reporter is None else {"reporter": reporter}
        return base, tune_prepared(base, buf, prepared, tcfg, set(fixed), **kw)


def test_tune_halves_on_learning_curves_never_reads_the_test_split_and_writes_a_usable_preset(
        tmp_path: Path, convex_buffer: Path, data_dir: Path) -> None:
    base, result = _tune(convex_buffer, data_dir)
    stages = [c.stage for c in result.candidates]
    assert {"lr_img", "max_start_epoch", "syn_steps", "expert_epochs"} <= set(stages)
    lrs = {c.values["lr_img"] for c in result.candidates if c.stage == "lr_img"}
    assert {base.lr_img * f for f in (0.01, 0.1, 1, 10, 100)} <= {float(f"{v:.2g}") for v in lrs} | lrs
    assert result.horizons[:3] == [2, 4, 7]  # h = 2, doubled, capped at the full run's 7
    # Successive halving: at each horizon at most the better half of the previous one goes on,
    # and those are the best ones there.
    bracket1 = [c for c in result.candidates if c.stage == "lr_img" and c.values["lr_img"] in
                {float(f"{base.lr_img * f:.2g}") for f in (0.01, 0.1, 1, 10, 100)}]
    assert len(bracket1) == 5
    at = {h: [c for c in bracket1 if c.at(h)] for h in (2, 4, 7)}
    assert len(at[2]) == 5 and len(at[4]) == 3 and len(at[7]) <= 2
    ranked = sorted(at[2], key=lambda c: -c.at(2)["mean"])
    assert set(map(id, at[4])) == set(map(id, ranked[:3]))
    win = result.candidates[result.best_index]
    top = max(p["iteration"] for p in win.curve)
    assert win.at(top)["mean"] == max(c.at(top)["mean"] for c in result.candidates if c.at(top))
    for key in ALL:  # the settings as they were scored: no rescaling
        assert result.best[key] == win.values[key]
    assert result.best["iterations"] == 7  # the user's run length, not the candidates'
    start = result.random_real
    assert start is not None and start["iteration"] == 0 and start["lr"] == base.lr_init
    assert result.val_images == 100  # 300 training images: 30 per class would be all; a third is held out
    assert result.probe["seconds_per_iteration"] > 0 and result.probe["seconds_per_evaluation"] > 0
    path = write_result_preset(result, tmp_path / "tuned.toml")
    text = path.read_text()
    assert text.startswith("# Found by `mctool distill --tune`") and "never the test split" in text
    assert "<- chosen" in text and "starting images" in text
    p = load_preset(path)
    assert p.values["source"] == "tuned" and p.values["lr_img"] == result.best["lr_img"]
    assert p.values["eval_share"] == 0.1  # the run it is for keeps its best images, the start included
    with store.open_buffer(convex_buffer) as buf:
        cfg = resolve_config(str(path), {}, buf)
        check_buffer_matches(cfg, buf)  # the dataset the preset names is the buffer's
    assert cfg.syn_steps == win.values["syn_steps"] and cfg.ipc == 2


def test_tune_is_seeded_and_keeps_fixed_settings(convex_buffer: Path, data_dir: Path) -> None:
    fixed = frozenset({"syn_steps", "max_start_epoch", "expert_epochs"})
    _, a = _tune(convex_buffer, data_dir, fixed=fixed)
    _, b = _tune(convex_buffer, data_dir, poison=False, fixed=fixed)
    assert [c.curve for c in a.candidates] == [c.curve for c in b.candidates]
    assert {c.stage for c in a.candidates} == {"lr_img"}
    assert all(c.values["syn_steps"] == 2 for c in a.candidates)


def test_a_continued_candidate_is_the_run_it_would_have_been(convex_buffer: Path, data_dir: Path) -> None:
    """Halving continues a candidate from its checkpoint: its images at 7 iterations are those of
    one uninterrupted 7-iteration run (so its curve is a real run's curve)."""
    from mctool.distill import tune as tune_mod
    from mctool.distill import run_prepared

    seen = {}
    real = tune_mod._Search.images

    def images(self, cand):
        out = real(self, cand)
        seen[(cand.values["lr_img"], cand.values["max_start_epoch"], cand.values["syn_steps"],
              cand.values["expert_epochs"], cand.reached)] = out
        return out

    import pytest as _pytest
    mp = _pytest.MonkeyPatch()
    mp.setattr(tune_mod._Search, "images", images)
    try:
        base, result = _tune(convex_buffer, data_dir, fixed=frozenset({"syn_steps", "max_start_epoch",
                                                                       "expert_epochs"}))
    finally:
        mp.undo()
    win = result.candidates[result.best_index]
    key = (win.values["lr_img"], base.max_start_epoch, base.syn_steps, base.expert_epochs, 7)
    assert key in seen  # the winner was continued to 7 (2 → 4 → 7)
    with store.open_buffer(convex_buffer) as buf:
        prepared = prepare_like(buf.data, data_dir, torch.device("cpu"))
        data, _ = tune_mod.split_for_tuning(prepared, result.val_images, 3)
        cfg = dataclasses.replace(base, lr_img=win.values["lr_img"], iterations=7, eval_every=0, eval_share=0.0,
                                  checkpoint_every=8)
        out = Path(tempfile.mkdtemp()) / "one.h5"
        run_prepared(cfg, buf, out, data, name="tune")
    with store.open_synsets(out) as sf:
        syn = sf.read("tune")
    assert torch.equal(syn.images, seen[key][0]) and syn.lr == seen[key][2]


class _Lines:
    """A reporter that keeps the log lines."""

    def __init__(self) -> None:
        from mctool.core.progress import Reporter

        lines: list[str] = []
        self.lines = lines

        class Keep(Reporter):
            def log(self, message: str) -> None:
                lines.append(message)

        self.reporter = Keep()


@pytest.mark.parametrize("levers", [{}, {"ema": 0.6, "start_upper_init": 0.5, "start_upper_iterations": 20}],
                         ids=["mct", "ema-and-growing-window"])
def test_the_final_run_continues_the_winner_exactly_as_a_restart(tmp_path: Path, convex_buffer: Path,
                                                                 data_dir: Path, levers: dict) -> None:
    """Issue 23: --tune's final run goes on from the winning candidate's checkpoint (its run is a
    prefix of the final one: same settings, seed and validation split) and reuses the search's
    scores of the starting images and of the winner's images (the same protocol: the first of the
    search's two networks is the final run's one). Continuing equals the restart that
    `distill --preset` makes, bit for bit on the CPU — both computed here, never against stored
    numbers —: the same images, step size, losses, the same scores at iterations 0, 16 and 24 (the
    search's reused scores equal the restart's measured ones: --eval-every 16 scores the winner's
    iteration) and the same best images; with an EMA of the images and a sampling window that grows
    past the continued iteration too."""
    from mctool.distill import tune as tune_mod
    from mctool.distill import run as run_distill

    # Only lr_img free (the others given): 5 candidates at 2, 4, 8, 16 of a 24-iteration run; the
    # search's validation split (a third of this tiny training split) given to the final run too.
    overrides = {"ipc": 2, "syn_steps": 2, "max_start_epoch": 1.0, "expert_epochs": 1.0, "iterations": 24,
                 "seed": 3, "eval_epochs": 2, "eval_every": 16, "val_size": 100, **levers}
    log = _Lines()
    tcfg = TuneConfig(minutes=30, iterations=2, eval_runs=2, eval_epochs=2)
    ran = tune_mod.run(None, overrides, convex_buffer, tmp_path / "a.h5", tcfg, data_dir=data_dir, device="cpu",
                       reporter=log.reporter)
    win = ran.tune.candidates[ran.tune.best_index]
    assert win.reached == 16 < 24 and ran.tune.plan["reserve_s"] > 0  # the final run was kept in the budget
    said = [line for line in log.lines if "the run continues candidate" in line]
    assert len(said) == 1 and "from iteration 16" in said[0], "\n".join(log.lines)
    assert any("measured by the search" in line and "iteration 0 (the starting images)" in line
               for line in log.lines), log.lines
    restart = run_distill(ran.tune.preset, overrides, convex_buffer, tmp_path / "b.h5", data_dir=data_dir,
                          device="cpu")
    a, b = ran.distill, restart
    assert a.config == b.config and a.iterations == b.iterations == 24
    with store.open_synsets(tmp_path / "a.h5") as sf:
        sa = sf.read(a.synset)
    with store.open_synsets(tmp_path / "b.h5") as sf:
        sb = sf.read(b.synset)
    assert torch.equal(sa.images, sb.images) and torch.equal(sa.labels, sb.labels) and sa.lr == sb.lr
    assert list(sa.loss) == list(sb.loss) and len(sa.loss) == 24
    by_a = {e["iteration"]: e for e in a.evaluations}
    by_b = {e["iteration"]: e for e in b.evaluations}
    assert set(by_b) == set(by_a) == {0, 16, 24}  # 16: the winner's images, scored by the search
    for it in (0, 16, 24):  # 0 and 16 reused (measured by the search), 24 measured; all measured by the restart
        assert by_a[it]["accuracies"] == by_b[it]["accuracies"] and by_a[it]["runs"] == 1
        assert by_a[it]["seeds"] == by_b[it]["seeds"] and by_a[it]["config"] == by_b[it]["config"]
    assert a.best is not None and b.best is not None and a.best["iteration"] == b.best["iteration"]
    assert a.best["score"]["accuracies"] == b.best["score"]["accuracies"]
    assert a.best["iteration"] == max(a.evaluations, key=lambda e: e["mean"])["iteration"]
    assert torch.equal(sa.best.images, sb.best.images)
    assert a.selection is not None and a.selection["evaluations"] == 1 and a.selection["reused"] == 2


def test_a_final_run_that_is_not_the_winners_continued_starts_over(tmp_path: Path, convex_buffer: Path,
                                                                   data_dir: Path) -> None:
    """Continuing only when the candidate's run is a prefix: another setting the trajectory depends
    on, a shorter run, --eval-every N scoring iterations before the candidate's, or other training
    images to start from (another validation split) start over, and say so in one line."""
    from mctool.distill import tune as tune_mod
    from mctool.distill import run_prepared
    from mctool.distill.runner import Continuation

    base = DistillConfig(ipc=2, syn_steps=2, iterations=10, seed=3)
    longer = dataclasses.replace(base, iterations=40, eval_share=0.1, eval_runs=3, checkpoint_every=7)
    assert tune_mod.continues(base, longer) and not tune_mod.continues(longer, base)
    for key, value in (("lr_img", 2 * base.lr_img), ("seed", 4), ("syn_steps", 3), ("ema", 0.9)):
        assert not tune_mod.continues(base, dataclasses.replace(longer, **{key: value})), key
    # --eval-every N < the candidate's 10 iterations: a restart scores iteration N, whose images are gone.
    assert not tune_mod.continues(base, dataclasses.replace(longer, eval_every=5))
    assert tune_mod.continues(base, dataclasses.replace(longer, eval_every=10))
    assert tune_mod.continues(base, dataclasses.replace(longer, eval_every=15))
    # Evaluations every N (planned for --eval-share) before the candidate's 10 iterations: as --eval-every N.
    assert tune_mod.continues(base, longer) and tune_mod.continuation_problem(base, longer, every=10) is None
    assert "evaluating every 5 iterations (--eval-share)" in str(tune_mod.continuation_problem(base, longer, every=5))
    # A run that may cut lr_img after its evaluations (--lr-backoff) is no prefix of a candidate that could not.
    assert not tune_mod.continues(base, dataclasses.replace(longer, lr_backoff=0.1))
    assert "--lr-backoff 0.1 may cut lr_img" in str(tune_mod.continuation_problem(
        dataclasses.replace(base, lr_backoff=0.1), dataclasses.replace(longer, lr_backoff=0.1)))
    log = _Lines()
    handoff = tune_mod.Handoff(file=tmp_path / "none.h5", config=base, keep=torch.arange(3), val_size=7, scores={},
                               ecfg=tune_mod.selection_protocol(base), what="candidate 1 of the search")
    assert tune_mod.continuation_of(handoff, dataclasses.replace(longer, lr_img=1.0), torch.device("cpu"),
                                    log.reporter) is None
    assert log.lines[-1] == ("tune: the final run starts over: its settings differ from those of candidate 1 of the "
                             "search: lr_img")
    assert tune_mod.continuation_of(handoff, dataclasses.replace(longer, eval_every=4), torch.device("cpu"),
                                    log.reporter) is None
    assert "starts over" in log.lines[-1] and "--eval-every 4" in log.lines[-1]
    # run_prepared: a prefix from other training images is not continued.
    with store.open_buffer(convex_buffer) as buf:
        cfg = resolve_config(None, {"ipc": 2, "syn_steps": 2, "iterations": 3, "seed": 3, "lr_backoff": 0.0, "eval_every": 3,
                                    "eval_epochs": 2}, buf)
        prepared = prepare_like(buf.data, data_dir, torch.device("cpu"))
        first = run_prepared(dataclasses.replace(cfg, iterations=2), buf, tmp_path / "p.h5", prepared, name="p")
        from mctool.distill.checkpoint import _load_state
        state = _load_state(tmp_path / "p.h5", "p", cfg)
        other = Continuation(state=state, config=dataclasses.replace(cfg, iterations=2), keep=torch.arange(5),
                             val_size=7, what="candidate 2 of the search")
        out = run_prepared(cfg, buf, tmp_path / "q.h5", prepared, name="q", continuation=other,
                           reporter=log.reporter)
    assert first.iterations == 2 and out.iterations == 3
    assert any("started from other training images" in n and "starts over" in n and "--val-size 7" in n
               for n in out.notes), out.notes
    assert [e["iteration"] for e in out.evaluations] == [0, 3]  # measured, from the start


def _candidate_run(buf, prepared, cfg: DistillConfig, reached: int, out: Path, scores: dict | None = None):
    """A candidate's run as --tune makes it — `reached` iterations of `cfg` without evaluations, from
    the training split minus the validation split `cfg` holds out — as a runner.Continuation."""
    from mctool.distill import tune as tune_mod
    from mctool.distill import run_prepared
    from mctool.distill.checkpoint import _load_state
    from mctool.distill.runner import Continuation, val_split_size
    from mctool.data.prepared import split_validation

    size = val_split_size(cfg, prepared.train_y.numel())
    data, _ = tune_mod.split_for_tuning(prepared, size, cfg.seed)
    short = dataclasses.replace(cfg, iterations=reached, eval_every=0, eval_share=0.0, checkpoint_every=reached + 1)
    run_prepared(short, buf, out, data, name="tune")
    keep = split_validation(prepared.train_y, prepared.meta.num_classes, size, cfg.seed)[0]
    return Continuation(state=_load_state(out, "tune", short), config=short, keep=keep, val_size=size,
                        scores=scores or {}, what="the candidate", by="the test")


def _same_selection(a, b, fa: Path, fb: Path) -> None:
    """Two runs' selections are the same, bit for bit: evaluations, best images, final images."""
    assert [e["iteration"] for e in a.evaluations] == [e["iteration"] for e in b.evaluations]
    assert [e["accuracies"] for e in a.evaluations] == [e["accuracies"] for e in b.evaluations]
    assert a.best is not None and b.best is not None and a.best["iteration"] == b.best["iteration"]
    with store.open_synsets(fa) as sf:
        sa = sf.read(a.synset)
    with store.open_synsets(fb) as sf:
        sb = sf.read(b.synset)
    assert torch.equal(sa.images, sb.images) and torch.equal(sa.best.images, sb.best.images)


@pytest.mark.parametrize("every", [2, 4, 5])
def test_a_continued_run_selects_as_a_restart_does_with_eval_every(tmp_path: Path, convex_buffer: Path,
                                                                   data_dir: Path, every: int) -> None:
    """Continuing a 4-iteration candidate to 6 iterations with --eval-every N gives the restart's
    evaluations and best images, bit for bit on the CPU: N = 2 < 4 starts over (a restart scores
    iteration 2, whose images the candidate's run did not keep), and says so; N = 4 scores the
    candidate's images (the restart does); N = 5 does not record a score of them even when one is
    handed over (the restart never scores iteration 4)."""
    from mctool.distill import run_prepared

    log = _Lines()
    with store.open_buffer(convex_buffer) as buf:
        cfg = resolve_config(None, {"ipc": 2, "syn_steps": 2, "iterations": 6, "seed": 3, "lr_backoff": 0.0, "eval_every": every,
                                    "eval_epochs": 2, "eval_runs": 1, "val_size": 100}, buf)
        prepared = prepare_like(buf.data, data_dir, torch.device("cpu"))
        # A score of the candidate's images that would win if it were recorded.
        fake = {"kind": "synset", "model": "ConvNet", "mean": 2.0, "std": 0.0, "runs": 1, "accuracies": [2.0],
                "split": "validation"}
        cont = _candidate_run(buf, prepared, cfg, 4, tmp_path / "c.h5", scores={4: fake} if every == 5 else None)
        a = run_prepared(cfg, buf, tmp_path / "a.h5", prepared, name="a", continuation=cont, reporter=log.reporter)
        b = run_prepared(cfg, buf, tmp_path / "b.h5", prepared, name="b")
    _same_selection(a, b, tmp_path / "a.h5", tmp_path / "b.h5")
    continued = any("the run continues the candidate from iteration 4" in n for n in a.notes)
    assert continued == (every != 2), a.notes
    if every == 2:
        assert any(n.startswith("note: the run starts over: --eval-every 2") for n in a.notes), a.notes
    expected = {2: [0, 2, 4, 6], 4: [0, 4, 6], 5: [0, 5, 6]}[every]
    assert [e["iteration"] for e in a.evaluations] == expected


class StopAfterContinuing(Reporter):
    """A reporter that stops a run (SIGINT) at its first safe point after it continued a candidate."""

    def __init__(self) -> None:
        self.armed = False

    def log(self, message: str) -> None:
        self.armed = self.armed or message.startswith("the run continues")

    def should_stop(self) -> int:
        return 2 if self.armed else 0


def test_ctrl_c_while_a_continued_run_scores_its_starting_images_keeps_them_a_candidate(
        tmp_path: Path, convex_buffer: Path, data_dir: Path) -> None:
    """Interrupted while it scores the starting images (before its first iteration), a continued run
    saves its checkpoint at the candidate's iteration without them; --resume draws them again from
    the seed and scores them: the resumed run's selection is the restart's, bit for bit on the CPU."""
    from mctool.core.errors import Interrupted
    from mctool.distill import run_prepared

    with store.open_buffer(convex_buffer) as buf:
        cfg = resolve_config(None, {"ipc": 2, "syn_steps": 2, "iterations": 6, "seed": 3, "lr_backoff": 0.0, "eval_every": 6,
                                    "eval_epochs": 2, "eval_runs": 1, "val_size": 100}, buf)
        prepared = prepare_like(buf.data, data_dir, torch.device("cpu"))
        cont = _candidate_run(buf, prepared, cfg, 4, tmp_path / "c.h5")  # no scores: 0 is measured
        out = tmp_path / "a.h5"
        with pytest.raises(Interrupted) as stopped:
            run_prepared(cfg, buf, out, prepared, name="a", continuation=cont, reporter=StopAfterContinuing(),
                         resume_hint="continue it with `mctool distill --preset T.toml --resume`")
        assert str(stopped.value).endswith("checkpoint saved at iteration 4; continue it with `mctool distill --preset "
                                           "T.toml --resume`"), str(stopped.value)
        with store.open_synsets(out) as sf:
            saved = sf.read("a")
        assert not [e for e in saved.evaluations if e.get("iteration") == 0]  # the bug's precondition
        a = run_prepared(cfg, buf, out, prepared, name="a", resume=True)
        b = run_prepared(cfg, buf, tmp_path / "b.h5", prepared, name="b")
    assert [e["iteration"] for e in a.evaluations] == [0, 6]
    _same_selection(a, b, out, tmp_path / "b.h5")


def test_an_interrupted_final_run_resumes_with_the_command_it_names(tmp_path: Path, convex_buffer: Path,
                                                                    data_dir: Path) -> None:
    """Ctrl-C while --tune's final run, continued from the winner, scores its starting images (not
    reusable here: other epochs than the search's): the message names `mctool distill --preset …
    --resume` (`--tune --resume` is refused), and that command finishes the run with the starting
    images scored — the same evaluations and images, bit for bit on the CPU, as the restart."""
    from mctool.core.errors import Interrupted
    from mctool.core.progress import Reporter
    from mctool.distill import tune as tune_mod
    from mctool.distill import run as run_distill

    class StopAfterContinuing(Reporter):
        def __init__(self) -> None:
            self.armed, self.lines = False, []

        def log(self, message: str) -> None:
            self.lines.append(message)
            self.armed = self.armed or message.startswith("the run continues")

        def should_stop(self) -> int:
            return 2 if self.armed else 0

    overrides = {"ipc": 2, "syn_steps": 2, "max_start_epoch": 1.0, "expert_epochs": 1.0, "iterations": 24,
                 "seed": 3, "eval_epochs": 3, "eval_every": 24, "val_size": 100}
    tcfg = TuneConfig(minutes=30, iterations=2, eval_runs=2, eval_epochs=2)
    out, preset = tmp_path / "a.h5", tmp_path / "tuned.toml"
    stop = StopAfterContinuing()
    with pytest.raises(Interrupted) as stopped:
        tune_mod.run(None, overrides, convex_buffer, out, tcfg, tune_out=preset, data_dir=data_dir, device="cpu",
                     reporter=stop)
    assert any("scores its images again" in line and "epochs 3, the search's 2" in line for line in stop.lines)
    command = (f"mctool distill --preset {preset} --buffer {convex_buffer} -o {out} --data-dir {data_dir} "
               "--resume")
    assert f"continue it with `{command}`" in str(stopped.value), str(stopped.value)
    r = cli(*command.split()[1:])
    assert r.exit_code == 0, r.output
    restart = run_distill(str(preset), overrides, convex_buffer, tmp_path / "b.h5", data_dir=data_dir,
                          device="cpu")
    with store.open_synsets(out) as sf:
        names = sf.names
        assert len(names) == 1
        a = sf.read(names[0])
    with store.open_synsets(tmp_path / "b.h5") as sf:
        b = sf.read(restart.synset)
    assert [e["iteration"] for e in a.evaluations] == [e["iteration"] for e in restart.evaluations] == [0, 24]
    assert [e["accuracies"] for e in a.evaluations] == [e["accuracies"] for e in restart.evaluations]
    assert torch.equal(a.images, b.images) and torch.equal(a.best.images, b.best.images)


def test_reused_scores_are_the_evaluation_the_final_run_would_measure(data_dir: Path, convex_buffer: Path) -> None:
    """The first run of a two-network evaluation is, bit for bit on the CPU, the one-network
    evaluation of the same protocol; another protocol is not reused."""
    from mctool.distill import tune as tune_mod
    from mctool.evaluate.evaluation import EvaluateConfig, evaluate_set

    with store.open_buffer(convex_buffer) as buf:
        prepared = prepare_like(buf.data, data_dir, torch.device("cpu"))
        spec = buf.spec
    x, y = prepared.train_x[:20], prepared.train_y[:20]
    val = (prepared.train_x[20:80], prepared.train_y[20:80])
    two = EvaluateConfig(runs=2, epochs=3, seed=5)
    one = dataclasses.replace(two, runs=1)
    cpu = torch.device("cpu")
    ev2 = evaluate_set(x, y, 0.01, prepared, spec, two, score_on=val, split="validation")[0]
    ev1 = evaluate_set(x, y, 0.01, prepared, spec, one, score_on=val, split="validation")[0]
    assert tune_mod.reusable(two, one, cpu)
    reused = tune_mod.reused_score(ev2, one, "validation")
    assert reused["accuracies"] == ev1.accuracies and reused["mean"] == ev1.mean and reused["std"] == ev1.std
    assert reused["seeds"] == ev1.seeds and reused["config"] == dataclasses.asdict(one)
    assert not tune_mod.reusable(two, dataclasses.replace(one, epochs=4), cpu)
    assert "epochs 4, the search's 3" in tune_mod.reuse_problem(two, dataclasses.replace(one, epochs=4), cpu)
    assert "3 networks, the search 2" in tune_mod.reuse_problem(two, dataclasses.replace(two, runs=3), cpu)
    assert not tune_mod.reusable(one, two, cpu)  # fewer runs than wanted
    assert not tune_mod.reusable(dataclasses.replace(two, together=True), one, cpu)  # stacked: other rounding
    assert tune_mod.reusable(dataclasses.replace(two, together=True), dataclasses.replace(two, together=True), cpu)


def test_the_plan_keeps_the_final_run_inside_the_budget() -> None:
    """With the final run's predicted time (the iterations after the winner's, its evaluations),
    the search and that run fit the budget together; the plan says what it kept."""
    def final_s(top: int) -> float:
        return 2.0 + (400 - top) * 0.5 + 10.0

    plain = plan_search(900, 0.5, 10, free=ALL, full_iterations=400)
    kept = plan_search(900, 0.5, 10, free=ALL, full_iterations=400, final_s=final_s)
    assert plain.reserve_s == 0.0 and kept.reserve_s == final_s(kept.top) > 0
    assert kept.fits and kept.estimate_s + kept.reserve_s <= 900
    assert kept.estimate_s <= plain.estimate_s
    # The prediction: the iterations after the winner's, the evaluations of a selecting run.
    from mctool.distill.tune import final_seconds

    def by_hand(iterations: int, start: int, every: int, reused: bool) -> float:
        """Start-up, iterations, and the evaluations the loop makes, enumerated: the start's (unless
        reused), each multiple of N in [start, end) (the winner's at `start` unless reused), the end."""
        scored = [] if reused else [0]
        scored += [k for k in range(max(start, 1), iterations) if every and k % every == 0
                   and not (reused and k == start)]
        return 2.0 + (iterations - start) * 1.0 + (len(scored) + 1) * 5.0

    cfg = DistillConfig(iterations=100, eval_share=0.1, eval_runs=1)
    for start in (0, 60):
        for n in (10, 20, 25, 50, 200):  # the spacing planned for --eval-share, given
            for reused in (True, False) if start else (False,):
                assert final_seconds(cfg, start, 1.0, 5.0, 2.0, reused, n) == pytest.approx(by_hand(100, start, n, reused))
                every = dataclasses.replace(cfg, eval_share=0.0, eval_every=n)  # --eval-every N: the same schedule
                assert final_seconds(every, start, 1.0, 5.0, 2.0, reused) == pytest.approx(by_hand(100, start, n, reused))
    # --eval-every 10 from the winner's 60: it scores 60 (measured when not reused), 70, 80, 90 and the end.
    assert final_seconds(dataclasses.replace(cfg, eval_every=10), 60, 1.0, 5.0, 2.0, False) == 2.0 + 40 + 6 * 5.0
    assert final_seconds(dataclasses.replace(cfg, eval_share=0.0), 60, 1.0, 5.0, 2.0, False) == 42.0


def test_an_interrupted_final_run_names_the_command_that_resumes_it() -> None:
    """`--tune --resume` is refused: the final run's interruption names `distill --preset … --resume`."""
    from mctool.distill.tune import resume_command

    said = resume_command(Path("t/tuned.toml"), Path("b.h5"), Path("o/s.h5"), "mine", Path("data"))
    assert said == ("continue it with `mctool distill --preset t/tuned.toml --buffer b.h5 -o o/s.h5 --name mine "
                    "--data-dir data --resume`")


def test_the_plan_knows_when_the_final_run_will_start_over() -> None:
    """The final run can continue the winner only when it holds out the search's validation split:
    it selects on validation, with the same split size (the seed is the same)."""
    from mctool.distill.tune import final_restart

    n = 3000
    same = DistillConfig(eval_share=0.1, val_size=300)
    assert final_restart(same, 300, n) is None
    assert final_restart(dataclasses.replace(same, val_size=0), n // 10, n) is None  # the default size
    other = final_restart(dataclasses.replace(same, val_size=0), 900, n)
    assert other == "another validation split; give --val-size 900"
    assert "--select-on test" in final_restart(dataclasses.replace(same, select_on="test"), 300, n)
    assert "no validation split" in final_restart(dataclasses.replace(same, eval_share=0.0), 300, n)
    assert "--lr-backoff 0.1 may cut" in final_restart(dataclasses.replace(same, lr_backoff=0.1), 300, n)
    assert final_restart(dataclasses.replace(same, eval_share=0.0, eval_every=5), 300, n) is None


def test_the_budget_is_kept_on_a_clock_that_counts_work(convex_buffer: Path, data_dir: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A clock that advances one 'second' per reading (every iteration and evaluation epoch reads
    it, so its time is work, whatever the machine's load): the search plans from the probe, skips
    what does not fit, and the watchdog stops what runs over; it ends within the budget plus one
    evaluation."""
    from mctool.distill import tune as tune_mod

    budget_s = 400.0
    ticks = [0.0]

    def clock() -> float:
        # The machine gets three times busier once a third of the budget is spent: the plan,
        # made from the probe, no longer fits; the guard and the watchdog must keep the budget.
        ticks[0] += 1.0 if ticks[0] < budget_s / 3 else 3.0
        return ticks[0]

    monkeypatch.setattr(tune_mod, "_now", clock)
    base, result = _tune(convex_buffer, data_dir, minutes=budget_s / 60, iterations=0, full=2000)
    t_eval = 3 * result.probe["seconds_per_evaluation"]  # one evaluation, at the busier pace
    assert result.seconds <= budget_s + t_eval, (result.seconds, t_eval)
    assert result.seconds >= 0.5 * budget_s  # the budget was used, not left idle
    assert result.skipped or any("budget" in c.note for c in result.candidates)  # it was binding
    assert result.best_index >= 0 and result.horizons
    assert any("of the full run's 2000 iterations" in n for n in result.notes)


@pytest.mark.parametrize("full,val_size,share", [(30, 100, 0.02), (2000, 100, 0.02), (30, 0, 0.02), (30, 100, 0.1)],
                         ids=["short", "long", "short-other-split", "short-scored-before"])
def test_a_short_final_run_is_kept_inside_the_budget(convex_buffer: Path, data_dir: Path,
                                                     monkeypatch: pytest.MonkeyPatch, full: int,
                                                     val_size: int, share: float) -> None:
    """On a clock that counts work: when the final run is short (the iterations after the winner's
    and its evaluations, predicted from the measured costs), the search and that run end within
    the budget plus one evaluation, and the plan line says what it kept; when it is long, nothing
    is kept and the plan line gives its predicted time instead. A final run that will hold out
    another validation split than the search's (no --val-size on this small training split) will
    start over: it is planned from iteration 0, and the plan line says so and how to avoid it."""
    from mctool.distill import tune as tune_mod

    budget_s = 400.0
    ticks = [0.0]

    def clock() -> float:
        ticks[0] += 1.0
        return ticks[0]

    monkeypatch.setattr(tune_mod, "_now", clock)
    log = _Lines()
    with store.open_buffer(convex_buffer) as buf:
        # --eval-share 0.02: evaluations planned every 50 iterations, none before the winner's (a continuation);
        # 0.1: every 10, which scores iterations before the winner's: the final run starts over.
        base = resolve_config(None, {"ipc": 2, "syn_steps": 2, "iterations": full, "seed": 3, "eval_epochs": 2,
                                     "eval_share": share, "val_size": val_size, "lr_backoff": 0.0}, buf)  # as --tune
        prepared = prepare_like(buf.data, data_dir, torch.device("cpu"))
        tcfg = TuneConfig(minutes=budget_s / 60, eval_runs=2, eval_epochs=2, seed=3, val_size=val_size)
        result = tune_prepared(base, buf, prepared, tcfg, set(), log.reporter, final=base)
    plan_line = next(line for line in log.lines if "s per evaluation →" in line)
    win = result.candidates[result.best_index]
    p = result.probe
    t_eval = p["seconds_per_evaluation"]
    per_iteration = p["seconds_per_iteration"] * win.values["syn_steps"] / p["syn_steps"]
    every = selection_every(dataclasses.replace(base, **win.values), prepared)  # the final run's spacing
    start = win.reached if val_size and not 1 <= every < win.reached else 0
    final_s = tune_mod.final_seconds(base, start, per_iteration, t_eval * 1 / 2, p["seconds_startup"], start > 0,
                                     every)
    assert ("the final run will start over: another validation split; give --val-size "
            f"{result.val_images}" in plan_line) == (not val_size), plan_line
    assert "0 s of it" not in plan_line
    if share == 0.1:  # evaluations every 10 score iterations before the winner's: it starts over
        assert f"evaluating every {every} iterations (--eval-share) scores iterations before the winner's" in plan_line
        assert f"all {full} iterations" in plan_line and every < win.reached, plan_line
    elif not val_size:  # planned from iteration 0: too long to keep in this budget
        assert f"all {full} iterations" in plan_line and result.plan["reserve_s"] == 0, plan_line
    elif full == 30:
        assert result.plan["reserve_s"] > 0 and "kept for the final run" in plan_line, plan_line
        assert result.seconds + final_s <= budget_s + t_eval, (result.seconds, final_s)
    else:
        assert result.plan["reserve_s"] == 0 and "the final run then takes about" in plan_line, plan_line
        assert result.seconds <= budget_s + t_eval


def test_a_tiny_real_budget_is_kept(convex_buffer: Path, data_dir: Path) -> None:
    """Wall time: a 4-second budget on a 1000-iteration run ends within the budget and one
    evaluation, on however busy a machine (the watchdog stops what runs over); on a machine so
    busy that the starting images' evaluation, or every candidate, does not fit, it ends with the
    one line that says so, as soon."""
    import time

    started = time.perf_counter()
    try:
        base, result = _tune(convex_buffer, data_dir, minutes=4 / 60, iterations=0, full=1000)
    except UsageError as exc:
        assert "--tune-minutes" in str(exc) and ("the budget ran out" in str(exc)
                                                 or "no candidate could be scored within the budget" in str(exc))
        assert time.perf_counter() - started <= 4 + 10.0  # the data and the temporary folder around it
        return
    wall = time.perf_counter() - started
    slack = result.probe["seconds_per_evaluation"] + result.probe.get("seconds_startup", 0.0) + 1.0
    assert result.seconds <= 4 + slack, (result.seconds, slack)
    assert wall <= 4 + slack + 10.0  # preparing the data and the temporary folder around it


def test_a_budget_too_small_to_measure_the_machine_is_one_line(convex_buffer: Path, data_dir: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from mctool.distill import tune as tune_mod

    ticks = [0.0]

    def clock() -> float:
        ticks[0] += 1.0
        return ticks[0]

    monkeypatch.setattr(tune_mod, "_now", clock)
    with pytest.raises(UsageError, match=r"^--tune-minutes 0\.1: the budget ran out while (measuring this machine|"
                                         r"scoring the starting images)"):
        _tune(convex_buffer, data_dir, minutes=0.1, iterations=0, full=1000)
    assert ticks[0] < 6 + 40  # stopped at once: a few readings past the 6 'seconds'


def test_budget_watchdog_asks_loops_to_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    from mctool.distill import tune as tune_mod
    from mctool.core.progress import Reporter

    now = [0.0]
    monkeypatch.setattr(tune_mod, "_now", lambda: now[0])

    class Inner(Reporter):
        signal = 0
        lines: list = []

        def should_stop(self) -> int:
            return self.signal

        def update(self, key, advance=0, **fields):
            self.lines.append(fields)

    inner = Inner()
    watch = tune_mod._Budget(inner, deadline=10.0)
    assert watch.should_stop() == 0 and not watch.expired
    watch.task("distill", "distill tune", 10)
    watch.update("distill", 3)  # a resumed run's jump to its iteration: not a step
    assert "time" not in inner.lines[-1]
    now[0] = 1.0
    watch.update("distill", 1, loss=1.0)
    now[0] = 1.5
    watch.update("distill", 1, loss=1.0)
    assert inner.lines[-1]["time"] == "0.75 s/it, search 8 s left"  # (1.5 - 0) / 2 steps
    inner.signal = 2
    assert watch.should_stop() == 2  # Ctrl-C passes through
    inner.signal = 0
    now[0] = 10.0
    assert watch.should_stop() == tune_mod.BUDGET_STOP and watch.expired


def test_distill_tune_cli(tmp_path: Path, convex_buffer: Path, data_dir: Path) -> None:
    """--tune --tune-only prints the table and writes the preset that --preset then uses."""
    out = tmp_path / "s.h5"
    r = cli("distill", "--tune", "--tune-only", "--tune-minutes", "0.25", "--tune-epochs", "4", "--buffer",
            convex_buffer, "-o", out,
            "--data-dir", data_dir, "--ipc", "2", "--syn-steps", "2", "--max-start-epoch", "1", "--iterations", "40")
    assert r.exit_code == 0, r.output
    preset = tmp_path / "tuned-mnist-ipc2.toml"
    assert preset.is_file() and not out.exists()
    assert "validation" in r.stdout and "tuned preset:" in r.stdout and "* " in r.stdout
    assert "starting images" in r.stdout and "successive halving" in r.stdout
    assert "min of a 0.25 min budget" in r.stdout
    assert "s per iteration" in r.stderr and "s per evaluation" in r.stderr  # the probe, measured
    # --tune chooses lr_img: its preset does not cut it (--lr-backoff 0), so its final run may continue the winner.
    assert load_preset(preset).values["lr_backoff"] == 0.0 and load_preset(preset).values["eval_share"] == 0.1
    r2 = cli("distill", "--preset", preset, "--buffer", convex_buffer, "-o", out, "--data-dir", data_dir, "--quiet",
             "--iterations", "2")
    assert r2.exit_code == 0, r2.output
    r3 = cli("distill", "--tune-only", "--buffer", convex_buffer)
    assert r3.exit_code == 2 and "--tune-only needs --tune" in r3.stderr
    r4 = cli("distill", "--tune", "--tune-epochs", "1", "--buffer", convex_buffer, "-o", out, "--data-dir", data_dir)
    assert r4.exit_code == 2 and "--tune-epochs must be >= 2" in r4.stderr


# ------------------------------------------------------------------ the preset file --tune writes


def _digest(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tune_cli(tmp_path: Path, convex_buffer: Path, data_dir: Path, *extra, minutes: str = "0.02"):
    # 1.2 s: enough where the command is refused before the search; a search that must succeed
    # passes a budget a busy machine can score a candidate in.
    return cli("distill", "--tune", "--tune-only", "--tune-minutes", minutes, "--tune-epochs", "2", "--buffer",
               convex_buffer, "-o", tmp_path / "s.h5", "--data-dir", data_dir, "--ipc", "1", "--syn-steps", "1",
               "--iterations", "4", *extra)


def test_tune_out_never_replaces_an_input_or_an_artifact(tmp_path: Path, convex_buffer: Path, data_dir: Path,
                                                         buffer: Path) -> None:
    """Issue 24 item 1: --tune-out naming the input buffer, another HDF5 artifact or any file
    --tune did not write: one line, exit 2, before any work, the file untouched."""
    import shutil

    copy = tmp_path / "copy.h5"
    shutil.copyfile(buffer, copy)
    notes = tmp_path / "notes.toml"
    notes.write_text("# my own notes\nlr_img = 3\n")
    before = {p: _digest(p) for p in (convex_buffer, copy, notes)}
    for target, says in ((convex_buffer, "an input or output of this command"),
                         (copy, "is not a preset written by `mctool distill --tune`"),
                         (notes, "is not a preset written by `mctool distill --tune`"),
                         (tmp_path / "s.h5", "an input or output of this command")):
        r = _tune_cli(tmp_path, convex_buffer, data_dir, "--tune-out", target)
        assert r.exit_code == 2, r.output
        assert says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "Traceback" not in r.output and "measuring" not in r.stderr  # refused before the search
    assert {p: _digest(p) for p in before} == before
    assert not (tmp_path / "s.h5").exists()
    # A preset --tune wrote is replaced (rerunning the same command works).
    own = tmp_path / "tuned.toml"
    assert _tune_cli(tmp_path, convex_buffer, data_dir, "--tune-out", own, minutes="0.2").exit_code == 0
    first = own.stat().st_ino
    r = _tune_cli(tmp_path, convex_buffer, data_dir, "--tune-out", own, minutes="0.2")
    assert r.exit_code == 0, r.output
    # Written anew (the atomic writer's temporary file, made while the old one exists, takes its
    # place: another inode), whether or not the search found the same settings in its short budget.
    assert own.stat().st_ino != first and own.read_text().startswith("# Found by `mctool distill --tune`")


def test_tune_out_never_writes_through_a_link(tmp_path: Path, convex_buffer: Path, data_dir: Path) -> None:
    """Issue 24 item 2: a symlink planted at the preset's path (dangling or to a file outside)
    is refused, the outside file untouched; one planted after the check is not followed either."""
    from mctool.distill import preset_schema
    from mctool.distill.tune import write_preset
    from mctool.distill.tune import PRESET_MARK

    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "precious.txt"
    victim.write_text("keep me\n")
    link = tmp_path / "tuned-mnist-ipc1.toml"  # the default path beside -o
    link.symlink_to(victim)
    r = _tune_cli(tmp_path, convex_buffer, data_dir)
    assert r.exit_code == 2 and "symbolic link" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert victim.read_text() == "keep me\n" and link.is_symlink()
    dangling = tmp_path / "dangling.toml"
    dangling.symlink_to(outside / "new.toml")
    r = _tune_cli(tmp_path, convex_buffer, data_dir, "--tune-out", dangling)
    assert r.exit_code == 2 and not (outside / "new.toml").exists()
    # The writer itself refuses a link (planted between the check and the write) — and even a
    # link to a preset it wrote: it never writes through one.
    own = outside / "own.toml"
    own.write_text(PRESET_MARK + " earlier\n")
    late = tmp_path / "late.toml"
    late.symlink_to(own)
    with pytest.raises(UsageError, match="symbolic link"):
        write_preset(late, {"ipc": 1}, "Found by `mctool distill --tune` now", preset_schema(), replaces=PRESET_MARK)
    assert own.read_text() == PRESET_MARK + " earlier\n"
    assert not list(tmp_path.glob(".late.toml.*"))  # no temporary left behind


def test_preset_write_is_atomic(tmp_path: Path) -> None:
    """Issue 24 item 6: a kill at any point of the write leaves the old preset or the new one —
    here right after the temporary file is written and before the rename (the process kills
    itself in fsync): the old preset is intact; the same write then succeeds."""
    import subprocess
    import sys

    path = tmp_path / "tuned.toml"
    old = "# Found by `mctool distill --tune` earlier\nipc = 1\n"
    path.write_text(old)
    code = f"""
import os, signal
from pathlib import Path
from mctool.presets import Schema
from mctool.distill.tune import write_preset
if {{kill}}:
    os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
write_preset(Path({str(path)!r}), {{{{"ipc": 2}}}}, "Found by `mctool distill --tune` now", Schema({{{{"ipc": int}}}}, ()),
             replaces="# Found by `mctool distill --tune`")
"""
    killed = subprocess.run([sys.executable, "-c", code.format(kill=True)], capture_output=True, timeout=120)
    assert killed.returncode == -9, killed.stderr
    assert path.read_text() == old  # not empty, not half-written: the old preset
    done = subprocess.run([sys.executable, "-c", code.format(kill=False)], capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert path.read_text().endswith("ipc = 2\n") and path.read_text().startswith("# Found by")
    assert oct(path.stat().st_mode & 0o777) != "0o600"  # an ordinary text file, not mkstemp's 0600


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
    (never more often than HEARTBEAT_MIN); the last figures are repeated on such lines once known,
    marked as the last ones (they are not the current step's)."""
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
                                                    "expert 0: 62/100 (last figures: epoch 1/2, loss 0.5)"]
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
    """lr_img × 100 may blow the images up: that candidate is marked and dropped, the search goes on."""
    from mctool.distill import tune as tune_mod
    from mctool.core.errors import TrainingDiverged

    real = tune_mod.run_prepared

    def run_prepared(cfg, *a, **kw):
        if cfg.lr_img > 1000 and cfg.iterations > 0:
            raise TrainingDiverged("diverged")
        return real(cfg, *a, **kw)

    monkeypatch.setattr(tune_mod, "run_prepared", run_prepared)
    _, result = _tune(convex_buffer, data_dir, poison=False, overrides={"lr_img": 200.0},
                      fixed=frozenset({"syn_steps", "max_start_epoch", "expert_epochs"}))
    notes = {c.values["lr_img"]: c.note for c in result.candidates}
    assert notes[2000.0].startswith("diverged") and notes[20000.0].startswith("diverged")
    assert result.candidates[result.best_index].values["lr_img"] <= 1000


def _result(start: float, curves: dict[float, list[float]], std: float = 0.002):
    from mctool.distill.tune import Candidate, TuneResult

    cands = []
    for lr, means in curves.items():
        c = Candidate(stage="lr_img", values={"lr_img": lr, "max_start_epoch": 1.0, "syn_steps": 2,
                                              "expert_epochs": 1.0})
        c.curve = [{"iteration": 10 * 2**k, "mean": m, "std": std, "runs": 2, "alpha": 0.01}
                   for k, m in enumerate(means)]
        cands.append(c)
    return TuneResult(buffer="b.h5", dataset="x", ipc=10, base={}, best={}, best_index=0, candidates=cands,
                      random_real={"mean": start, "std": std, "runs": 2, "lr": 0.01, "iteration": 0}, iterations=0,
                      val_images=100, budget_s=60, seconds=1, probe={})


def test_closing_notes_name_the_cause_from_what_was_measured() -> None:
    from mctool.distill.tune import diagnose

    # The starting images best everywhere, experts no better than them: the experts.
    r = _result(0.80, {10.0: [0.70, 0.72], 100.0: [0.60]})
    notes = diagnose(r, r.candidates[0], reference=0.79, full_iterations=80, lr_free=True)
    assert "starting images (iteration 0) scored best at every horizon" in notes[0]
    assert "the experts reach 79.0 %" in notes[0] and "train the experts longer" in notes[0]
    # … experts well above them, the smallest lr came closest: the lr.
    notes = diagnose(r, r.candidates[0], reference=0.95, full_iterations=80, lr_free=True)
    assert "the lr is likely too large" in notes[0] and "--lr-img 1" in notes[0]
    # The chosen curve still rising at the last horizon: more iterations.
    r = _result(0.60, {1.0: [0.55], 10.0: [0.61], 100.0: [0.62, 0.65, 0.70]})
    notes = diagnose(r, r.candidates[2], reference=0.95, full_iterations=400, lr_free=True)
    assert any("still rising at iteration 40" in n and "10× further" in n for n in notes), notes
    assert not any("every horizon" in n for n in notes)
    assert any("the largest that was scored" in n for n in notes)
    # Peaked, then fell beyond the runs' spread: say where, and what to do.
    r = _result(0.60, {10.0: [0.61], 100.0: [0.66, 0.70, 0.64]})
    notes = diagnose(r, r.candidates[1], reference=0.95, full_iterations=40, lr_free=True)
    assert any("peaked at iteration 20" in n and "fell to 64.0 % at 40" in n for n in notes), notes
    # The preset --tune writes selects (eval_share): the advice says so rather than ask for --eval-every.
    assert any("the tuned preset's runs keep their best images on validation" in n for n in notes), notes
    # Within the noise: no story told.
    r = _result(0.60, {100.0: [0.66, 0.663, 0.661]}, std=0.01)
    assert diagnose(r, r.candidates[0], reference=0.95, full_iterations=40, lr_free=False) == [
        "the chosen settings score 66.1 % at iteration 40, +6.1 points over the starting images (60.0 %)"]
    # A horizon far short of the run is said.
    notes = diagnose(r, r.candidates[0], reference=0.95, full_iterations=5000, lr_free=False)
    assert any("saw 40 of the full run's 5000 iterations" in n for n in notes)


def test_tune_says_when_the_starting_images_score_best(convex_buffer: Path, data_dir: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The starting images are a candidate: when they beat every distilled set at every horizon
    the search says so, with the experts' accuracy as the evidence."""
    from mctool.distill import tune as tune_mod
    from mctool.store.experts import ExpertsReference

    real = tune_mod._Search.score

    def score(self, images, labels, lr, kind="synset"):
        mean, std, runs, seconds = real(self, images, labels, lr, kind)
        return (0.99 if kind == "starting images" else min(mean, 0.9)), std, runs, seconds

    monkeypatch.setattr(tune_mod._Search, "score", score)
    monkeypatch.setattr(store.Buffer, "reference", lambda self: ExpertsReference(0.5, 0.0, 2, 4))
    _, result = _tune(convex_buffer, data_dir, poison=False, fixed=frozenset({"syn_steps", "max_start_epoch",
                                                                              "expert_epochs"}))
    assert result.random_real["mean"] == 0.99
    assert any("the starting images (iteration 0) scored best at every horizon: 99.0 %" in n
               and "the experts reach 50.0 %" in n for n in result.notes), result.notes


@pytest.mark.parametrize("point", ["mkdir", "read", "open", "link", "fdopen", "fsync", "chmod", "chown", "replace",
                                   "after-replace", "fsync-folder"])
def test_a_kill_at_each_point_of_the_preset_write_leaves_old_or_new(tmp_path: Path, point: str) -> None:
    """Issue 24 item 6, at exact points: the writer killed (SIGKILL, in a forked child) before or
    after each step of the write — `read` is the check that the old file is a preset --tune
    wrote — leaves the old preset or the new one, whole; writing again works."""
    import os
    import signal

    from mctool.distill.tune import PRESET_MARK, write_preset
    from mctool.presets import Schema

    schema = Schema({"ipc": int}, ())
    comment = "Found by `mctool distill --tune` now"
    new = write_preset(tmp_path / "reference.toml", {"ipc": 2}, comment, schema).read_text()
    path = tmp_path / "tuned.toml"
    old = f"{PRESET_MARK} earlier\nipc = 1\n"
    path.write_text(old)
    pid = os.fork()
    if pid == 0:  # the child: dies at `point`
        try:
            def die(*args, **kwargs):
                os.kill(os.getpid(), signal.SIGKILL)

            if point == "mkdir":
                Path.mkdir = die  # type: ignore[method-assign]
            elif point in ("after-replace", "fsync-folder"):
                real_replace, real_open, real_fsync = os.replace, os.open, os.fsync
                done = []

                def replace(a, b):
                    real_replace(a, b)
                    done.append(True)
                os.replace = replace
                if point == "after-replace":
                    os.open = lambda *a, **k: die() if done else real_open(*a, **k)
                else:
                    os.fsync = lambda fd: die() if done else real_fsync(fd)
            else:
                setattr(os, point, die)
            write_preset(path, {"ipc": 2}, comment, schema, replaces=PRESET_MARK)
        finally:
            os._exit(3)  # not killed: the point was never reached
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    assert path.read_text() in (old, new)  # never empty, never half-written
    if point in ("after-replace", "fsync-folder"):
        assert path.read_text() == new
    else:
        assert path.read_text() == old
    write_preset(path, {"ipc": 2}, comment, schema, replaces=PRESET_MARK)  # the same write then succeeds
    assert path.read_text() == new
