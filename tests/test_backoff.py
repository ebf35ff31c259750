"""`--lr-backoff` (issue 23): a run that selects its images and finds them scored below the
starting images by more than the split's standard error goes on from its best images with the
image learning rate cut; on by default without a preset, off with one; resumable bit for bit."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import h5py
import pytest
import torch

from mctool import store
from mctool.distill import resolve_config
from mctool.distill.config import DEFAULT_LR_BACKOFF, MAX_BACKOFFS
from mctool.distill.learnables import LEARNABLES, best_value, learning_rate, logits_of
from mctool.distill.runner import _Run, standard_error
from tests.helpers import assert_one_line_error, cli

# The selection tests' small setting; lr_img 1e6 wrecks the images slowly (every update applied).
SETTINGS = ["--ipc", "2", "--syn-steps", "3", "--expert-epochs", "1.5", "--max-start-epoch", "2", "--lr-lr", "1e-5",
            "--lr-init", "0.01", "--eval-epochs", "50", "--seed", "3", "--lr-img", "1000000", "--eval-every", "5"]


def _distill(buffer: Path, out: Path, data_dir: Path, *extra: str) -> Any:
    return cli("distill", "--buffer", buffer, "-o", out, "--data-dir", data_dir, *SETTINGS, *extra)


def _images() -> Any:
    return next(e for e in LEARNABLES if e.backs_off)


def test_learning_rate_after_cuts() -> None:
    cfg = resolve_config(None, {"lr_img": 1.6, "lr_backoff": 0.1, "learn_labels": True})
    images = _images()
    assert learning_rate(images, cfg, 0) == 1.6  # untouched (bit for bit as before) without a cut
    assert math.isclose(learning_rate(images, cfg, 2), 0.016)
    labels = next(e for e in LEARNABLES if e.name == "labels")
    assert learning_rate(labels, cfg, 2) == cfg.lr_label  # only the images' rate is cut
    assert [e.name for e in LEARNABLES if e.backs_off] == ["images"]


def test_the_margin_is_the_splits_standard_error() -> None:
    assert standard_error(0.5, 100) == pytest.approx(0.05)
    assert standard_error(0.9, 400) == pytest.approx(0.015)
    assert standard_error(1.0, 50) == pytest.approx(1 / 50)  # at least one image: not every drop is a cut
    assert standard_error(0.5, 0) == pytest.approx(1.0)  # no split: no division


def test_a_drop_within_the_standard_error_is_no_cut() -> None:
    run = object.__new__(_Run)
    run.cfg = resolve_config(None, {})
    run.selection = (torch.zeros(100, 1, 2, 2), torch.zeros(100, dtype=torch.long))  # SE at 50 %: 5 points
    scores = {0: 0.5, 10: 0.46, 20: 0.44}
    evaluations = [{"kind": "synset", "split": "validation", "iteration": i, "mean": m} for i, m in scores.items()]
    run.d = SimpleNamespace(state=SimpleNamespace(evaluations=evaluations))  # type: ignore[assignment]
    assert not run._below_start(10) and run._below_start(20)
    assert not run._below_start(0) and not run._below_start(30)  # the start itself; an iteration not scored


def test_an_evaluation_without_a_mean_is_not_a_score() -> None:
    """A stored evaluation may have a null or no mean (the store allows it): the selection takes it
    for unscored (a resume scores those images again) instead of failing on it."""
    run = object.__new__(_Run)
    run.cfg = resolve_config(None, {})
    run.selection = (torch.zeros(100, 1, 2, 2), torch.zeros(100, dtype=torch.long))
    evaluations = [{"kind": "synset", "split": "validation", "iteration": 0, "mean": None},
                   {"kind": "synset", "split": "validation", "iteration": 10}]
    run.d = SimpleNamespace(state=SimpleNamespace(evaluations=evaluations))  # type: ignore[assignment]
    assert not run._evaluated_at(0) and not run._evaluated_at(10) and not run._below_start(10)
    evaluations.append({"kind": "synset", "split": "validation", "iteration": 0, "mean": 0.5})
    assert run._evaluated_at(0) and run._scored_at(0) == evaluations[-1]


def test_best_values_are_copies_and_labels_come_back_as_logits() -> None:
    probs = torch.softmax(torch.randn(6, 10, dtype=torch.float64) * 4, dim=1)
    best = store.BestImages(images=torch.randn(6, 1, 4, 4), labels=probs, lr=0.02, iteration=5,
                            selected_on="validation", score={"mean": 0.5})
    by_name = {e.name: best_value(e, best) for e in LEARNABLES}
    assert torch.equal(by_name["images"], best.images) and by_name["images"] is not best.images
    assert by_name["alpha"] == 0.02
    assert torch.allclose(torch.softmax(by_name["labels"], dim=1), probs, atol=1e-12, rtol=0)
    assert torch.isfinite(logits_of(torch.tensor([[1.0, 0.0]]))).all()  # a zero probability stays finite


def test_defaults_with_and_without_a_preset_and_older_files() -> None:
    assert resolve_config(None, {}).lr_backoff == DEFAULT_LR_BACKOFF
    assert resolve_config(None, {"eval_share": 0.0}).lr_backoff == 0.0  # off with the default selection
    assert resolve_config(None, {"eval_share": 0.0, "eval_every": 10}).lr_backoff == DEFAULT_LR_BACKOFF
    assert resolve_config("fashion-mnist-ipc10", {}).lr_backoff == 0.0  # presets: MCT as published
    assert resolve_config(None, {}, stored={"ipc": 2}).lr_backoff == 0.0  # files of earlier releases: off


@pytest.mark.parametrize("value", ["1", "-0.1", "nan", "inf"])
def test_bad_factors_are_one_line(tmp_path: Path, convex_buffer: Path, data_dir: Path, value: str) -> None:
    assert_one_line_error(_distill(convex_buffer, tmp_path / "s.h5", data_dir, "--lr-backoff", value,
                                   "--iterations", "5"), 2, "--lr-backoff")
    assert not (tmp_path / "s.h5").exists()


def test_a_worsening_run_is_cut_and_goes_on_from_its_best_images(tmp_path: Path, convex_buffer: Path,
                                                                 data_dir: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Each cut follows an evaluation below the start by more than the standard error; right
    after it the run's images are its best images, with momenta at zero; the output lists the
    cuts and says what to try."""
    seen: list[tuple[int, bool, bool]] = []
    original = _Run._back_off_if_worse

    def spy(self: _Run, every: int) -> None:
        before = self.d.state.backoffs
        original(self, every)
        s = self.d.state
        if s.backoffs > before:
            assert s.best is not None
            seen.append((s.iteration, torch.equal(s.images, s.best.images),
                         bool((s.velocities["images"] == 0).all()) and s.velocities["alpha"] == 0.0))

    monkeypatch.setattr(_Run, "_back_off_if_worse", spy)
    r = _distill(convex_buffer, tmp_path / "s.h5", data_dir, "--iterations", "40", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    cuts = doc["selection"]["backoffs"]
    assert cuts and len(cuts) <= MAX_BACKOFFS and doc["config"]["lr_backoff"] == DEFAULT_LR_BACKOFF
    assert [c["iteration"] for c in cuts] == [it for it, _, _ in seen]
    assert all(same and still for _, same, still in seen)
    scored = {e["iteration"]: e["mean"] for e in doc["evaluations"] if e["split"] == "validation"}
    for k, cut in enumerate(cuts):
        assert cut["lr_img"] == pytest.approx(1e6 * 0.1 ** (k + 1))
        assert cut["lr_img_was"] == pytest.approx(1e6 * 0.1 ** k)
        assert scored[cut["iteration"]] < scored[0]  # below the start (by more than the standard error)
    assert doc["best"]["score"]["mean"] >= scored[0]
    assert any(n.startswith("lr_img was cut ") for n in doc["notes"])
    assert "is below the starting images'" in r.stderr


def test_off_with_zero(tmp_path: Path, convex_buffer: Path, data_dir: Path) -> None:
    r = _distill(convex_buffer, tmp_path / "s.h5", data_dir, "--iterations", "20", "--lr-backoff", "0", "--json",
                 "--quiet")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["selection"]["backoffs"] == []
    scored = {e["iteration"]: e["mean"] for e in doc["evaluations"]}
    assert min(scored[i] for i in (5, 10, 15)) < scored[0]  # it did go wrong, and nothing was cut


def test_default_runs_repeat_at_any_pace(tmp_path: Path, convex_buffer: Path, data_dir: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --eval-every the spacing of the evaluations — and so the best images and the cuts —
    comes from a count, not from the clock: a run whose clock jumps erratically repeats a plain one."""
    # --eval-share 0.5: a planned spacing of 10, so evaluations (and a cut) come within the 40 iterations.
    args = [a for a in SETTINGS if a not in ("--eval-every", "5")] + ["--iterations", "40", "--eval-share", "0.5",
                                                                    "--json", "--quiet"]
    first = cli("distill", "--buffer", convex_buffer, "-o", tmp_path / "a.h5", "--data-dir", data_dir, *args)
    assert first.exit_code == 0, first.output
    import mctool.distill.runner as runner

    clock = {"t": 0.0, "n": 0}

    def erratic() -> float:  # monotonic, with steps from a millisecond to a minute
        clock["n"] += 1
        clock["t"] += (0.001, 60.0, 0.5, 7.0)[clock["n"] * 7 % 4]
        return clock["t"]

    monkeypatch.setattr(runner.time, "perf_counter", erratic)
    second = cli("distill", "--buffer", convex_buffer, "-o", tmp_path / "b.h5", "--data-dir", data_dir, *args)
    assert second.exit_code == 0, second.output
    a, b = json.loads(first.stdout), json.loads(second.stdout)
    assert [e["iteration"] for e in a["evaluations"]] == [e["iteration"] for e in b["evaluations"]]
    assert len(a["evaluations"]) > 3 and a["selection"]["backoffs"], "the test needs evaluations between and a cut"
    assert a["selection"]["backoffs"] == b["selection"]["backoffs"]
    assert a["best"]["iteration"] == b["best"]["iteration"]
    with store.open_synsets(tmp_path / "a.h5") as x, store.open_synsets(tmp_path / "b.h5") as y:
        sa, sb = x.read(x.pick(None)), y.read(y.pick(None))
    assert torch.equal(sa.images, sb.images) and sa.best is not None and sb.best is not None
    assert torch.equal(sa.best.images, sb.best.images)


@pytest.mark.parametrize("stop_before_cut, levers",
                         [(False, ()), (True, ()), (False, ("--ema", "0.8", "--learn-labels"))])
def test_resume_across_a_cut_is_bit_for_bit(tmp_path: Path, convex_buffer: Path, data_dir: Path,
                                            monkeypatch: pytest.MonkeyPatch, stop_before_cut: bool,
                                            levers: tuple[str, ...]) -> None:
    """A run stopped after the first cut — or between the evaluation that calls for it and the cut
    itself — and resumed ends where an uninterrupted run ends, bit for bit (CPU); with the EMA and
    learned labels, every learnable goes back to the best images' (the raw values too)."""
    whole = tmp_path / "whole.h5"
    r = _distill(convex_buffer, whole, data_dir, *levers, "--iterations", "30", "--json", "--quiet")
    assert r.exit_code == 0, r.output
    cuts = json.loads(r.stdout)["selection"]["backoffs"]
    assert cuts, "the setting no longer wrecks the images: the test needs a cut"
    first = cuts[0]["iteration"]
    part = tmp_path / "part.h5"
    stop_at = first if stop_before_cut else first + 2
    # Ctrl-C between the evaluation and the cut at `first`, or at the start of iteration first + 2.
    hook = "_back_off_if_worse" if stop_before_cut else "_iteration"
    original = getattr(_Run, hook)

    def interrupt(self: _Run, *args: Any) -> Any:
        if self.d.state.iteration == stop_at:
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(_Run, hook, interrupt)
    r = _distill(convex_buffer, part, data_dir, *levers, "--iterations", "30", "--quiet")
    assert r.exit_code != 0
    monkeypatch.setattr(_Run, hook, original)
    with store.open_synsets(part) as sf:
        stopped = sf.read(sf.pick(None), checkpoint=True)
    assert stopped.iterations == stop_at and stopped.checkpoint is not None
    made = stopped.checkpoint.run.get("backoffs", [])
    # Stopped between the evaluation that calls for the first cut and the cut: scored, not yet cut.
    assert (not made and any(e["iteration"] == first for e in stopped.evaluations)) if stop_before_cut else made
    r = _distill(convex_buffer, part, data_dir, *levers, "--iterations", "30", "--resume", "--json", "--quiet")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["selection"]["backoffs"] == cuts
    # Its cost note counts this sitting's evaluations and time, and says so.
    assert json.loads(r.stdout)["selection"]["from_iteration"] == stop_at
    assert any("of this sitting's " in n and f", from iteration {stop_at} (" in n
               for n in json.loads(r.stdout)["notes"]), json.loads(r.stdout)["notes"]
    with store.open_synsets(whole) as a, store.open_synsets(part) as b:
        x, y = a.read(a.pick(None), checkpoint=True), b.read(b.pick(None), checkpoint=True)
    assert torch.equal(x.images, y.images) and x.lr == y.lr
    assert x.best is not None and y.best is not None and torch.equal(x.best.images, y.best.images)
    assert x.checkpoint is not None and y.checkpoint is not None
    assert x.checkpoint.run["backoffs"] == y.checkpoint.run["backoffs"]
    assert x.checkpoint.learned.keys() == y.checkpoint.learned.keys()
    for key, value in x.checkpoint.learned.items():  # raw images and logits, momenta: all equal
        other = y.checkpoint.learned[key]
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, key
    assert torch.equal(x.labels, y.labels)
    if levers:
        assert {"images_raw", "label_logits", "label_logits_raw"} <= set(x.checkpoint.learned)


def test_a_factor_without_a_selection_says_it_does_nothing(tmp_path: Path, convex_buffer: Path,
                                                           data_dir: Path) -> None:
    r = _distill(convex_buffer, tmp_path / "s.h5", data_dir, "--iterations", "3", "--eval-every", "0",
                 "--eval-share", "0", "--lr-backoff", "0.1", "--json", "--quiet")
    assert r.exit_code == 0, r.output
    notes = json.loads(r.stdout)["notes"]
    assert any("--lr-backoff 0.1 follows the evaluations of a run that selects" in n for n in notes)
    # Not asked for: the default cut is off with the default selection, and nothing is said.
    r = _distill(convex_buffer, tmp_path / "t.h5", data_dir, "--iterations", "3", "--eval-every", "0",
                 "--eval-share", "0", "--json", "--quiet")
    doc = json.loads(r.stdout)
    assert doc["config"]["lr_backoff"] == 0.0 and not any("--lr-backoff" in n for n in doc["notes"])


def test_a_resume_keeps_its_planned_spacing_and_says_so(tmp_path: Path, convex_buffer: Path, data_dir: Path) -> None:
    """The spacing the first sitting planned stays (the run's schedule, and its cuts, are its own)."""
    out = tmp_path / "s.h5"
    args = [a for a in SETTINGS if a not in ("--eval-every", "5")]
    r = cli("distill", "--buffer", convex_buffer, "-o", out, "--data-dir", data_dir, *args, "--eval-share", "0.5",
            "--iterations", "20", "--quiet")
    assert r.exit_code == 0, r.output
    r = cli("distill", "--buffer", convex_buffer, "-o", out, "--data-dir", data_dir, *args, "--eval-share", "0.5",
            "--iterations", "30", "--eval-epochs", "5", "--resume", "--json")
    assert r.exit_code == 0, r.output
    assert "as the run's first sitting planned (these settings would plan" in r.stderr


@pytest.mark.parametrize("run, says", [
    ({"backoffs": 3}, "'backoffs' must be a list"), ({"backoffs": [{}] * 9}, "at most 3"),
    ({"backoffs": [{"iteration": 5}]}, "not {iteration"), ({"eval_every": -2}, "'eval_every' must be a whole"),
    ({"micro_batch": "x"}, "'micro_batch'"),
    ({"continued_from": 50}, "'continued_from' must be a whole number >= 0 and at most"),
    ({"backoffs": [{"iteration": 50, "from_iteration": 0, "lr_img_was": 1e6, "lr_img": 1e5}]}, "not {iteration"),
    ({"backoffs": [{"iteration": 5, "from_iteration": 6, "lr_img_was": 1e6, "lr_img": 1e5}]}, "not {iteration"),
    ({"backoffs": [{"iteration": 5, "from_iteration": 0, "lr_img_was": 1e6, "lr_img": 1e5},
                   {"iteration": 5, "from_iteration": 0, "lr_img_was": 1e5, "lr_img": 1e4}]}, "not {iteration"),
    ({"backoffs": [{"iteration": 5, "from_iteration": 0, "lr_img_was": 1e6, "lr_img": True}]}, "not {iteration")])
def test_a_damaged_run_record_is_one_line(tmp_path: Path, convex_buffer: Path, data_dir: Path, run: dict,
                                          says: str) -> None:
    out = tmp_path / "s.h5"
    r = _distill(convex_buffer, out, data_dir, "--iterations", "6", "--quiet")
    assert r.exit_code == 0, r.output
    with h5py.File(out, "r+") as f:
        g = f["synsets"][sorted(f["synsets"])[0]]["checkpoint"]
        g.attrs["run"] = json.dumps({**json.loads(g.attrs["run"]), **run})
    before = out.read_bytes()
    r = _distill(convex_buffer, out, data_dir, "--iterations", "8", "--resume")
    assert_one_line_error(r, 2, says, after_progress=True)
    assert out.read_bytes() == before
