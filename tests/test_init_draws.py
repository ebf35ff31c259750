"""`distill --init-draws N`: N starting draws, each scored by the selection's protocol on the
training images outside every draw and the validation split; the run starts from the best."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import h5py
import pytest
import torch

from mctool import store
from mctool.core.progress import SILENT
from mctool.data.prepared import Prepared, prepare_like, sample_per_class
from mctool.distill import DistillConfig, resolve_config
from mctool.distill import draws as draws_module
from mctool.distill.draws import DrawChoice, draw_chooser, scoring_indices
from mctool.distill.runner import _selection, continuation_problem, selection_protocol
from mctool.distill.state import initial_state
from mctool.evaluate.evaluation import evaluate_set
from tests.helpers import assert_one_line_error, cli
from tests.test_levers import distill, same, synset

TINY_RUN = ["--ipc", "3", "--syn-steps", "2", "--expert-epochs", "1", "--max-start-epoch", "1", "--eval-runs", "1",
            "--eval-epochs", "3", "--seed", "2", "--quiet"]


def _setup(buffer: Path, data_dir: Path, draws: int) -> tuple[DistillConfig, Prepared, torch.Tensor, store.Buffer]:
    """(the settings, the data, the run's training pool, the buffer) of `distill --ipc 3 --init-draws`."""
    with store.open_buffer(buffer) as buf:
        prepared = prepare_like(buf.data, data_dir, torch.device("cpu"))
        cfg = resolve_config(None, {"ipc": 3, "seed": 2, "init_draws": draws, "eval_runs": 1, "eval_epochs": 3}, buf)
    _, pool = _selection(cfg, prepared)
    assert pool is not None
    return cfg, prepared, pool, buf


def test_scoring_images_are_outside_every_draw_and_the_validation_split(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = torch.arange(0, 40, 2)  # the validation split: the odd indices
    drawn = [torch.tensor([0, 4, 8]), torch.tensor([8, 12])]
    rest = scoring_indices(40, drawn, pool)
    assert set(rest.tolist()) == set(range(0, 40, 2)) - {0, 4, 8, 12}
    assert set(scoring_indices(10, [torch.tensor([1])], None).tolist()) == set(range(10)) - {1}
    monkeypatch.setattr(draws_module, "MAX_SCORING_IMAGES", 5)
    capped = scoring_indices(40, drawn, pool)
    assert capped.numel() == 5 and set(capped.tolist()) <= set(rest.tolist())
    assert capped[0] == rest[0] and capped[-1] == rest[-1]  # spread over all of them, not the first five


def test_one_draw_is_the_first_of_several(convex_buffer: Path, data_dir: Path) -> None:
    """--init-draws 1 draws what a run always drew, and it is draw 1 of N (the same generator)."""
    cfg, prepared, pool, _ = _setup(convex_buffer, data_dir, 3)
    one = initial_state(dataclasses.replace(cfg, init_draws=1), prepared,
                        torch.Generator().manual_seed(2), pool)
    first = initial_state(cfg, prepared, torch.Generator().manual_seed(2), pool, chosen=0)
    third = initial_state(cfg, prepared, torch.Generator().manual_seed(2), pool, chosen=2)
    assert torch.equal(one.images, first.images) and not torch.equal(first.images, third.images)
    assert "init_draws" not in one.run and first.run["init_draws"] == {"chosen": 0}
    with pytest.raises(ValueError, match="choose"):
        initial_state(cfg, prepared, torch.Generator().manual_seed(2), pool)


def test_the_best_scored_draw_is_the_start(convex_buffer: Path, data_dir: Path) -> None:
    """The chooser's scores are each draw's accuracy on the images outside them all (recomputed
    here by evaluate_set on those images), and the run starts from the highest."""
    cfg, prepared, pool, buf = _setup(convex_buffer, data_dir, 3)
    labels = store.class_major_labels(prepared.meta.num_classes, cfg.ipc)
    seen: list[list[torch.Tensor]] = []

    def recording(candidates: list[torch.Tensor]) -> DrawChoice:
        seen.append(candidates)
        return chooser(candidates)

    chooser = draw_chooser(prepared, buf.spec, selection_protocol(cfg), cfg.lr_init, labels, pool, SILENT)
    state = initial_state(cfg, prepared, torch.Generator().manual_seed(2), pool, choose=recording)
    record = state.run["init_draws"]
    candidates = seen[0]
    rest = scoring_indices(prepared.train_y.numel(), candidates, pool)
    assert record["scored_on"] == rest.numel() > 0
    again = [evaluate_set(prepared.train_x[c], labels, cfg.lr_init, prepared, buf.spec, selection_protocol(cfg),
                          score_on=(prepared.train_x[rest], prepared.train_y[rest]))[0].mean for c in candidates]
    assert record["scores"] == pytest.approx(again, abs=0)
    assert record["chosen"] == max(range(3), key=lambda i: (again[i], -i))
    assert torch.equal(state.images, prepared.train_x[candidates[record["chosen"]]])


def test_distill_reports_the_choice_and_starts_from_it(tmp_path: Path, convex_buffer: Path, data_dir: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end, with a chooser that prefers the last draw: the synset starts from draw 3, and
    --json and the checkpoint's run record say so."""
    from mctool.distill import runner

    def last(*args: object, **kwargs: object):
        return lambda candidates: DrawChoice(len(candidates) - 1, [0.1] * len(candidates), 7, 0.0)

    monkeypatch.setattr(runner, "draw_chooser", last)
    r = cli("distill", "--buffer", convex_buffer, "-o", tmp_path / "s.h5", "--data-dir", data_dir, *TINY_RUN,
            "--iterations", "0", "--init-draws", "3", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["config"]["init_draws"] == 3 and doc["start"]["chosen"] == 2 and doc["start"]["scored_on"] == 7
    cfg, prepared, pool, _ = _setup(convex_buffer, data_dir, 3)
    third = initial_state(cfg, prepared, torch.Generator().manual_seed(2), pool, chosen=2)
    with store.open_synsets(tmp_path / "s.h5") as sf:
        syn = sf.read(sf.pick(None), checkpoint=True)
    assert torch.equal(syn.images, third.images)
    assert syn.checkpoint.run["init_draws"]["chosen"] == 2


def test_resume_equals_one_sitting(tmp_path: Path, convex_buffer: Path, data_dir: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped after 2 iterations and resumed to 4, a run with --init-draws 3 (periodic selection on)
    equals 4 uninterrupted iterations in every stored array; each run scores its draws afresh (no
    memo across runs here), and the choice is not draw 1 (the same draw as one draw would make)."""
    # (seed 1 with 10 epochs scores draw 2 above draw 1 by five images of the fixture's split)
    args = [*TINY_RUN, "--init-draws", "3", "--eval-every", "2", "--seed", "1", "--eval-epochs", "10"]
    full, part = tmp_path / "full.h5", tmp_path / "part.h5"
    monkeypatch.setattr(draws_module, "_CHOICES", {})
    assert (r := distill(convex_buffer, full, data_dir, *args, "--json", iterations=4)).exit_code == 0, r.output
    assert json.loads(r.stdout)["start"]["chosen"] != 0
    monkeypatch.setattr(draws_module, "_CHOICES", {})
    assert distill(convex_buffer, part, data_dir, *args, iterations=2).exit_code == 0
    assert (r := distill(convex_buffer, part, data_dir, *args, "--resume", iterations=4)).exit_code == 0, r.output
    same(synset(full), synset(part))


def _scorings(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The kinds of the evaluations made from now on ("starting draw i/N": a draw scored)."""
    import mctool.evaluate.evaluation as evaluation

    kinds: list[str] = []
    real = evaluation.evaluate_set

    def counting(*args: object, **kwargs: object) -> object:
        kinds.append(str(args[6] if len(args) > 6 else kwargs.get("kind")))
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate_set", counting)
    return kinds


def test_a_continued_run_starts_from_its_candidate_s_draw_and_resumes(tmp_path: Path, convex_buffer: Path,
                                                                     data_dir: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """--tune's final run continues the winner: it takes the draw the winner chose instead of scoring
    the draws again (the candidate ran on other indices, so nothing is memoised), and a resume of it
    that needs its starting images again takes the recorded choice; the result equals a restart's."""
    from mctool.core.errors import Interrupted
    from mctool.distill import run_prepared
    from tests.test_tune import StopAfterContinuing, _candidate_run, _same_selection

    kinds = _scorings(monkeypatch)
    with store.open_buffer(convex_buffer) as buf:
        cfg = resolve_config(None, {"ipc": 3, "syn_steps": 2, "iterations": 6, "seed": 3, "lr_backoff": 0.0,
                                    "eval_every": 6, "eval_epochs": 2, "eval_runs": 1, "val_size": 100,
                                    "init_draws": 3}, buf)
        prepared = prepare_like(buf.data, data_dir, torch.device("cpu"))
        cont = _candidate_run(buf, prepared, cfg, 4, tmp_path / "c.h5")
        assert sum(k.startswith("starting draw") for k in kinds) == 3
        monkeypatch.setattr(draws_module, "_CHOICES", {})  # as if in a new process: only the record helps
        kinds.clear()
        out = tmp_path / "a.h5"
        with pytest.raises(Interrupted):
            run_prepared(cfg, buf, out, prepared, name="a", continuation=cont, reporter=StopAfterContinuing())
        assert not any(k.startswith("starting draw") for k in kinds)
        a = run_prepared(cfg, buf, out, prepared, name="a", resume=True)
        assert not any(k.startswith("starting draw") for k in kinds)
        b = run_prepared(cfg, buf, tmp_path / "b.h5", prepared, name="b")
    assert a.start is not None and b.start is not None and a.start["chosen"] == b.start["chosen"]
    _same_selection(a, b, out, tmp_path / "b.h5")


@pytest.mark.parametrize("record, words", [
    ({"chosen": 5}, "must record the chosen draw"), ({"chosen": True}, "must record the chosen draw"),
    ({"chosen": 1, "scores": "x"}, "must record each draw's score"), ({"chosen": 1, "scores": [0.5]}, "must record each draw's score"),
    ({"chosen": 1, "scores": [0.5, float("nan")]}, "must record each draw's score"),
    ({"chosen": 1, "scores": [0.5, 0.6], "scored_on": -1}, "must record each draw's score")])
def test_a_damaged_choice_is_one_line(tmp_path: Path, convex_buffer: Path, data_dir: Path, record: dict,
                                      words: str) -> None:
    out = tmp_path / "s.h5"
    assert distill(convex_buffer, out, data_dir, *TINY_RUN, "--init-draws", "2", iterations=1).exit_code == 0
    with h5py.File(out, "a") as f:
        ck = f[f"synsets/{sorted(f['synsets'])[0]}/checkpoint"]
        ck.attrs["run"] = json.dumps({**json.loads(ck.attrs["run"]), "init_draws": record})
    r = distill(convex_buffer, out, data_dir, *TINY_RUN, "--init-draws", "2", "--resume", iterations=2)
    assert_one_line_error(r, 2, f"'init_draws' {words}")


@pytest.mark.parametrize("extra, words", [(["--init-draws", "0"], "--init-draws must be in 1 … 64"),
                                          (["--init-draws", "65"], "--init-draws must be in 1 … 64"),
                                          (["--init-draws", "2", "--init", "noise"], "1 with --init noise")])
def test_bad_values_are_one_line(tmp_path: Path, convex_buffer: Path, data_dir: Path, extra: list[str],
                                 words: str) -> None:
    out = tmp_path / "s.h5"
    assert_one_line_error(distill(convex_buffer, out, data_dir, *extra, iterations=1), 2, words)
    assert not out.exists()


def test_its_networks_are_part_of_the_trajectory() -> None:
    """With several draws, --eval-runs and --eval-epochs choose the start: a run differing in them
    is not a continuation (with one draw they stay free)."""
    base = DistillConfig(ipc=2, iterations=10, init_draws=3)
    assert continuation_problem(base, DistillConfig(ipc=2, iterations=20, init_draws=3)) is None
    why = continuation_problem(base, DistillConfig(ipc=2, iterations=20, init_draws=3, eval_runs=2))
    assert why is not None and "eval_runs" in why
    assert continuation_problem(DistillConfig(ipc=2, iterations=10),
                                DistillConfig(ipc=2, iterations=20, eval_runs=2)) is None


def test_no_image_left_to_score_on_is_a_usage_error(convex_buffer: Path, data_dir: Path) -> None:
    """Draws that cover every training image the run may use leave nothing to score them on: one
    line naming the option, not an internal error."""
    from mctool.core.errors import UsageError

    cfg, prepared, pool, buf = _setup(convex_buffer, data_dir, 2)
    labels = store.class_major_labels(prepared.meta.num_classes, cfg.ipc)
    choose = draw_chooser(prepared, buf.spec, selection_protocol(cfg), cfg.lr_init, labels, pool[:6], SILENT)
    with pytest.raises(UsageError, match="--init-draws 2: no training image is left"):
        choose([pool[:3], pool[3:6]])


@pytest.mark.parametrize("overrides, preset, draws", [
    ({"ipc": 10}, False, 4),  # a run nobody tuned, at ipc 10: it chooses among four draws
    ({"ipc": 49}, False, 4),
    ({"ipc": 50}, False, 1),  # from ipc 50 on: minutes of evaluations, unmeasured
    ({"ipc": 9}, False, 1),  # below ipc 10 distillation moves the images far from their draw
    ({"ipc": 10, "init_draws": 2}, False, 2),  # asked
    ({"ipc": 10, "init_draws": 1}, False, 1),
    ({"ipc": 10, "pix_init": "noise"}, False, 1),  # no draw to choose
    ({"ipc": 10, "eval_share": 0.0}, False, 1),  # no selection: its networks would score the draws
    ({"ipc": 10, "iterations": 19}, False, 1),  # too short to select (it keeps its final images)
    ({"ipc": 10, "iterations": 19, "eval_every": 5}, False, 4),  # selecting all the same
    ({"ipc": 10}, True, 1),  # a preset means MCT as published
])
def test_runs_without_a_preset_choose_among_four_draws_at_ipc_10_to_49(convex_buffer: Path, tmp_path: Path,
                                                                 overrides: dict, preset: bool, draws: int) -> None:
    path = None
    if preset:
        path = tmp_path / "p.toml"
        path.write_text('dataset = "mnist"\nipc = 10\nsyn_steps = 3\nexpert_epochs = 1.5\nmax_start_epoch = 2.0\n'
                        'lr_img = 100\nlr_lr = 1e-5\nlr_init = 0.01\n')
    with store.open_buffer(convex_buffer) as buf:
        cfg = resolve_config(str(path) if path else None, overrides, buf)
    assert cfg.init_draws == draws
    with store.open_buffer(convex_buffer) as buf:  # a resume keeps what the run stored (absent: one draw)
        stored = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "init_draws"}
        assert resolve_config(None, {}, buf, stored=stored).init_draws == 1


def test_the_same_draws_are_scored_once(convex_buffer: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--tune's candidates draw the same sets from the same seed: the second chooser in a process
    returns the first one's choice without training a network (and says it took no time); other
    networks score again."""
    import mctool.evaluate.evaluation as evaluation

    cfg, prepared, pool, buf = _setup(convex_buffer, data_dir, 2)
    labels = store.class_major_labels(prepared.meta.num_classes, cfg.ipc)
    monkeypatch.setattr(draws_module, "_CHOICES", {})
    trained: list[int] = []
    real = evaluation.evaluate_set

    def counting(*args: object, **kwargs: object) -> object:
        trained.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate_set", counting)
    g = torch.Generator().manual_seed(0)
    candidates = [pool[sample_per_class(prepared.train_y[pool], prepared.meta.num_classes, cfg.ipc, g)]
                  for _ in range(2)]
    first = draw_chooser(prepared, buf.spec, selection_protocol(cfg), cfg.lr_init, labels, pool, SILENT)(candidates)
    again = draw_chooser(prepared, buf.spec, selection_protocol(cfg), cfg.lr_init, labels, pool, SILENT)(candidates)
    assert len(trained) == 2 and again.seconds == 0.0 and (again.chosen, again.scores) == (first.chosen, first.scores)
    other = dataclasses.replace(selection_protocol(cfg), epochs=4)
    draw_chooser(prepared, buf.spec, other, cfg.lr_init, labels, pool, SILENT)(candidates)
    assert len(trained) == 4


def test_tune_does_not_charge_the_draws_to_every_candidate(tmp_path: Path, convex_buffer: Path,
                                                          data_dir: Path) -> None:
    """--tune's probe candidate scores the draws once for all (the memo): the time it took is what
    `_draw_seconds` reads back from its checkpoint, which the probe subtracts from its start-up."""
    from mctool.distill import run_prepared
    from mctool.distill.tune import _draw_seconds

    cfg, prepared, _, buf = _setup(convex_buffer, data_dir, 3)
    with store.open_buffer(convex_buffer) as buf:
        done = run_prepared(dataclasses.replace(cfg, iterations=1), buf, tmp_path / "c.h5", prepared, name="tune")
    assert done.start is not None and _draw_seconds(tmp_path / "c.h5") == done.start["seconds"]
    assert _draw_seconds(tmp_path / "missing.h5") == 0.0
