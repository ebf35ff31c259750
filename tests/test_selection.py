"""Never worse than the start (issue 23): a run without a preset (and `--tune`'s final run) keeps
its best images on the validation split, the starting images (iteration 0) included; the cost of
the checks is measured, bounded and said; progress lines give seconds per iteration and time left."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from mctool import store
from mctool.distill import resolve_config, run_prepared
from mctool.distill.runner import (FORWARD_COST, MATCH_STEP_COST, _nice_up, _Run, planned_every,
                                   selection_protocol, selection_scored, standard_error)
from mctool.evaluate.scores import score_text
from mctool.data.prepared import prepare_like
from mctool.core.progress import Reporter
from tests.helpers import cli

# A small step-size and expert setting on the tests' tiny experts; --lr-img chooses the fate.
SETTINGS = ["--ipc", "2", "--syn-steps", "3", "--expert-epochs", "1.5", "--max-start-epoch", "2", "--lr-lr", "1e-5",
            "--lr-init", "0.01", "--eval-epochs", "50", "--seed", "3"]


def _distill(buffer: Path, out: Path, data_dir: Path, *extra: str):
    return cli("distill", "--buffer", buffer, "-o", out, "--data-dir", data_dir, *SETTINGS, *extra)


def test_a_run_that_goes_wrong_returns_the_starting_images_and_says_so(tmp_path: Path, convex_buffer: Path,
                                                                       data_dir: Path) -> None:
    """lr_img 1e6 wrecks the images slowly (no divergence is detected: every update is applied):
    the final images score below the starting ones on validation; the run keeps the starting
    images as its best, which `export`/`evaluate` use, and says so."""
    out = tmp_path / "s.h5"
    r = _distill(convex_buffer, out, data_dir, "--lr-img", "1000000", "--iterations", "30", "--lr-backoff", "0",
                 "--json")  # the selection alone: no cut of lr_img (tests/test_backoff.py)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["skipped_iterations"] == 0  # not a divergence the bounds catch: a slow one
    scored = {e["iteration"]: e["mean"] for e in doc["evaluations"] if e["split"] == "validation"}
    assert 0 in scored and 30 in scored
    assert scored[30] < scored[0]  # it did go wrong
    assert doc["best"]["iteration"] == 0 and doc["best"]["score"]["mean"] >= max(scored.values())
    assert any(n.startswith("the starting images scored best on validation: ") for n in doc["notes"])
    assert any(n.endswith("--init-draws 4 starts from the best of four") for n in doc["notes"])  # one draw made
    assert "the starting images scored best on validation" in r.stderr
    with store.open_synsets(out) as sf:
        syn = sf.read(sf.pick(None))
    assert syn.best is not None and syn.best.iteration == 0
    assert not torch.equal(syn.best.images, syn.images)  # the final ones are kept beside them


def test_presets_keep_their_final_images_and_short_runs_say_why(tmp_path: Path, convex_buffer: Path,
                                                               data_dir: Path) -> None:
    preset = tmp_path / "p.toml"
    preset.write_text('dataset = "mnist"\nipc = 2\nsyn_steps = 3\nexpert_epochs = 1.5\nmax_start_epoch = 2.0\n'
                      'lr_img = 100.0\nlr_lr = 1e-5\nlr_init = 0.01\nzca = false\ninterior = 1\n')
    with store.open_buffer(convex_buffer) as buf:
        zca = buf.data.zca
    preset.write_text(preset.read_text().replace("zca = false", f"zca = {str(zca).lower()}"))
    r = cli("distill", "--preset", preset, "--buffer", convex_buffer, "-o", tmp_path / "p.h5", "--data-dir", data_dir,
            "--iterations", "20", "--json", "--quiet")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["config"]["eval_share"] == 0.0 and doc["best"] is None and doc["evaluations"] == []
    assert doc["selection"] is None
    r = _distill(convex_buffer, tmp_path / "short.h5", data_dir, "--lr-img", "100", "--iterations", "4", "--json")
    doc = json.loads(r.stdout)
    assert doc["config"]["eval_share"] == 0.1 and doc["best"] is None
    assert any("a run of 4 iteration(s) keeps its final images" in n for n in doc["notes"])
    assert "a run of 4 iteration(s) keeps its final images" in r.stderr  # said, not only in the JSON


def test_the_cost_of_the_checks_is_planned_and_measured(tmp_path: Path, convex_buffer: Path, data_dir: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The spacing comes from a count of network passes (`planned_every`), so it is the same on every
    machine and at every load; the evaluations made are the start, every N-th iteration and the
    end; their measured cost is reported."""
    chosen: list[int] = []
    real = _Run._planned_every

    def spy(self):
        n = real(self)
        chosen.append(n)
        return 2  # every second iteration from here on, to see the schedule
    monkeypatch.setattr(_Run, "_planned_every", spy)
    with store.open_buffer(convex_buffer) as buf:
        cfg = resolve_config(None, {"ipc": 2, "syn_steps": 3, "iterations": 22, "seed": 3, "eval_epochs": 5}, buf)
        assert cfg.eval_share == 0.1
        prepared = prepare_like(buf.data, data_dir, torch.device("cpu"))
        result = run_prepared(cfg, buf, tmp_path / "s.h5", prepared)
    assert len(chosen) == 1
    its = [e["iteration"] for e in result.evaluations]
    assert its == list(range(0, 23, 2))  # start, every 2, the end
    sel = result.selection
    assert sel["evaluations"] == len(its) and sel["seconds"] > 0 and 0 < sel["share"] < 1 and sel["bound"] == 0.1
    assert any(n.startswith(f"selection on validation: {len(its)} evaluation(s) took ") for n in result.notes)
    assert [_nice_up(n) for n in (1, 2, 3, 6, 11, 180, 201)] == [1, 2, 5, 10, 20, 200, 500]


def test_planned_spacing_counts_network_passes() -> None:
    """N iterations cost at least (1 - share) / share evaluations, by the count: an evaluation
    trains eval_runs × eval_epochs × images and scores the split; an iteration matches syn_steps ×
    batch images at MATCH_STEP_COST each."""
    cfg = resolve_config(None, {"ipc": 1, "syn_steps": 40, "eval_runs": 1, "eval_epochs": 300})
    every, ratio = planned_every(cfg, 10, 135)
    assert ratio == pytest.approx((300 * 10 + FORWARD_COST * 135) / (40 * 10 * MATCH_STEP_COST))
    assert every == _nice_up(math.ceil(ratio * 9)) and every * cfg.eval_share >= ratio * (1 - cfg.eval_share)
    # --batch-syn makes iterations cheaper, so evaluations come less often; a batch above the set is the set.
    small = resolve_config(None, {"ipc": 50, "batch_syn": 100})
    assert planned_every(small, 500, 1000)[1] == pytest.approx(5 * planned_every(resolve_config(None, {"ipc": 50}),
                                                                                  500, 1000)[1])
    assert planned_every(resolve_config(None, {"batch_syn": 999}), 100, 10) == planned_every(
        resolve_config(None, {}), 100, 10)


def test_progress_lines_give_seconds_per_iteration_and_time_left(tmp_path: Path, convex_buffer: Path,
                                                                 data_dir: Path) -> None:
    class Lines(Reporter):
        def __init__(self) -> None:
            self.fields: list[dict[str, Any]] = []

        def update(self, key: str, advance: int = 0, **fields: Any) -> None:
            if key == "distill" and fields:
                self.fields.append(fields)

    lines = Lines()
    with store.open_buffer(convex_buffer) as buf:
        cfg = resolve_config(None, {"ipc": 2, "syn_steps": 3, "iterations": 5, "seed": 3}, buf)
        prepared = prepare_like(buf.data, data_dir, torch.device("cpu"))
        run_prepared(cfg, buf, tmp_path / "s.h5", prepared, reporter=lines)
    times = [f["time"] for f in lines.fields if "time" in f]
    assert len(times) >= 3 and all(re.fullmatch(r"[0-9.e+-]+ s/it, [0-9.]+ (s|min|h) left", t) for t in times), times


def test_stopped_while_scoring_the_final_images_the_run_is_saved_and_resumes(
        tmp_path: Path, convex_buffer: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C during the evaluation of the last iteration's images (after the loop) saves the
    checkpoint the message names (before, nothing was saved: a run shorter than --checkpoint-every
    lost all its iterations); the same command with --resume scores them and ends where an
    uninterrupted run ends, bit for bit on the CPU."""
    from mctool.evaluate import evaluation

    args = ("--lr-img", "100", "--iterations", "6", "--eval-every", "4", "--eval-epochs", "5", "--quiet")
    whole, part = tmp_path / "whole.h5", tmp_path / "part.h5"
    assert _distill(convex_buffer, whole, data_dir, *args).exit_code == 0
    original = evaluation.evaluate_set
    calls = [0]

    def stop_at_the_end(*a: Any, **k: Any) -> Any:
        calls[0] += 1
        if calls[0] == 3:  # iteration 0, 4, then the final images (iteration 6)
            raise KeyboardInterrupt
        return original(*a, **k)

    monkeypatch.setattr(evaluation, "evaluate_set", stop_at_the_end)
    r = _distill(convex_buffer, part, data_dir, *args)
    assert r.exit_code == 130 and "checkpoint saved" in r.stderr, r.output
    monkeypatch.setattr(evaluation, "evaluate_set", original)
    with store.open_synsets(part) as sf:
        stopped = sf.read(sf.pick(None), checkpoint=True)
    assert stopped.iterations == 6 and not stopped.complete
    assert [e["iteration"] for e in stopped.evaluations] == [0, 4]
    r = _distill(convex_buffer, part, data_dir, *args, "--resume")
    assert r.exit_code == 0, r.output
    with store.open_synsets(whole) as a, store.open_synsets(part) as b:
        x, y = a.read(a.pick(None)), b.read(b.pick(None))
    assert y.complete and [e["iteration"] for e in y.evaluations] == [0, 4, 6]
    assert [e["mean"] for e in x.evaluations] == [e["mean"] for e in y.evaluations]
    assert torch.equal(x.images, y.images) and x.best is not None and y.best is not None
    assert x.best.iteration == y.best.iteration and torch.equal(x.best.images, y.best.images)
    # A finished run stays finished: --resume with the same --iterations is refused as before.
    r = _distill(convex_buffer, part, data_dir, *args, "--resume")
    assert r.exit_code == 2 and "raise --iterations above 6" in r.stderr


def test_evaluate_s_scores_beside_the_run_are_not_the_selection_s(tmp_path: Path, convex_buffer: Path,
                                                                  data_dir: Path) -> None:
    """`mctool evaluate` stores its scores in the synset's evaluations, which `--resume` reads back:
    with `--select-on test` they are on the selection's split, under another protocol (here 2
    networks of 3 epochs, not 1 of 50). The resumed run measures its margin from its own score of
    the starting images and names its own best later score, never evaluate's."""
    out = tmp_path / "s.h5"
    first = ["--lr-img", "1000000", "--select-on", "test", "--eval-every", "2", "--select-margin", "1", "--json",
             "--quiet"]  # lr_img 1e6 wrecks the images: the starting ones stay the best
    r = _distill(convex_buffer, out, data_dir, *first, "--iterations", "2")
    assert r.exit_code == 0, r.output
    own = {e["iteration"]: e for e in json.loads(r.stdout)["evaluations"]}
    assert sorted(own) == [0, 2] and all(e["split"] == "test" for e in own.values())
    r = cli("evaluate", out, "--runs", "2", "--epochs", "3", "--data-dir", data_dir, "--quiet")
    assert r.exit_code == 0, r.output
    with store.open_synsets(out) as sf:
        syn = sf.read(sf.pick(None))
    theirs = syn.evaluations[len(own):]
    assert syn.best is not None and syn.best.iteration == 0, "the images no longer go wrong: the test needs them to"
    assert {(e["target"], e["iteration"], e["split"]) for e in theirs} == {("final", 2, "test"), ("best", 0, "test")}
    with store.open_buffer(convex_buffer) as buf:
        tests = int(prepare_like(buf.data, data_dir, torch.device("cpu")).test_y.numel())  # the selection's split
    their = {e["iteration"]: e for e in theirs}

    def below(scores: dict[int, dict[str, Any]]) -> bool:  # --lr-backoff's test at iteration 2
        return scores[2]["mean"] < scores[0]["mean"] - standard_error(scores[0]["mean"], tests)

    # evaluate's scores would decide otherwise than the run's own (else the test could not tell them apart)
    assert their[0]["mean"] != own[0]["mean"] and below(their) != below(own)

    r = _distill(convex_buffer, out, data_dir, *first, "--iterations", "3", "--resume")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    # The resumed sitting's --lr-backoff test at iteration 2 (the first sitting's end) and its margin:
    # the run's own scores.
    assert [c["iteration"] for c in doc["selection"]["backoffs"]] == ([2] if below(own) else [])
    assert doc["selection"]["start_margin"] == pytest.approx(standard_error(own[0]["mean"], tests))
    mine = [e for e in doc["evaluations"] if e.get("selection")]
    assert [e["iteration"] for e in mine] == [0, 2, 3] and all(e.get("selection") is None for e in theirs)
    assert doc["best"]["iteration"] == 0
    top = max((e for e in mine if e["iteration"] > 0), key=lambda e: e["mean"])
    (note,) = [n for n in doc["notes"] if n.startswith("the starting images ")]
    assert f"the distilled ones at most {score_text(top['mean'], top['std'], top['runs'])} % " \
           f"(iteration {top['iteration']})" in note, note


def test_which_stored_evaluations_are_the_selection_s() -> None:
    """The selection's own entries carry its mark, whatever runs and epochs they had (--eval-runs
    and --eval-epochs may change on --resume); an unmarked entry (earlier releases) counts only
    when it records no other protocol than the selection's; evaluate's never carry the mark."""
    cfg = resolve_config(None, {"select_on": "test", "seed": 3})
    p = selection_protocol(cfg)
    legacy = {"kind": "synset", "split": "test", "model": "ConvNet", "runs": p.runs, "epochs": p.epochs,
              "seed": 3, "target": "final", "config": {"augment": p.augment, "lr": None}, "mean": 0.5}
    assert selection_scored(legacy, cfg)
    assert selection_scored({"kind": "synset", "split": "test", "mean": 0.5}, cfg)  # records no protocol
    for other in ({"runs": 5}, {"epochs": 1000}, {"seed": 0}, {"model": "MLP"}, {"target": "best"},
                  {"config": {"augment": "none", "lr": None}}, {"config": {"augment": p.augment, "lr": 0.01}}):
        assert not selection_scored({**legacy, **other}, cfg), other
    assert selection_scored({**legacy, "runs": 5, "epochs": 7, "selection": True}, cfg)
    assert not selection_scored({**legacy, "selection": False}, cfg)
    assert not selection_scored({**legacy, "split": "validation", "selection": True}, cfg)
    assert not selection_scored({**legacy, "kind": "random-real"}, cfg)
    # On the validation split (which only the selection scores) an unmarked entry is the selection's,
    # whatever its protocol: an earlier sitting's, before --eval-runs changed on --resume.
    on_validation = resolve_config(None, {"seed": 3})
    assert selection_scored({**legacy, "split": "validation", "runs": 2}, on_validation)
