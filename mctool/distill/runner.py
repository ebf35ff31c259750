"""A distillation run: settings, data, the loop with its checkpoints and periodic evaluations, the output.

Selection (never worse than the start): with `--eval-every N` — or by default without a preset,
`--eval-share 0.1`, where N is planned from a count of network passes so that evaluations take
about that share of the run — the starting images (iteration 0), every N-th iteration's and the final
images are scored on a validation split held out of the training set (never the test split,
unless `--select-on test` reproduces the authors' protocol), and the best ones are kept beside
the final ones: a run that goes wrong returns what it started from, and says so; with
`--lr-backoff` it also cuts an image learning rate that makes its images worse. A run may
continue a prefix of itself computed elsewhere (`Continuation`: --tune's winner); a resume of it
that finds the starting images unscored draws them again from the seed. Under torchrun every
process draws its own trajectory per iteration; the gradients are averaged and rank 0 writes.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch

from mctool.core import distributed as dist
from mctool import store
from mctool.distill.checkpoint import resume_name, _load_state, _synset, stored_config
from mctool.distill.config import (AUTO_SELECT_MIN_ITERATIONS, MAX_BACKOFFS, DistillConfig, buffer_note,
                                   check_buffer_matches, check_synset_name, missing_buffer_hint, resolve_config,
                                   synset_name)
from mctool.distill.learnables import (ALPHA_BOUND, IMAGE_BOUND, LEARNABLES, Value, averaged, best_value,
                                       learned_in, learning_rate, zero_like)
from mctool.distill import sizes
from mctool.distill.loop import MAX_BAD_FRACTION, MAX_BAD_IN_A_ROW, Distiller, ExpertSource, choose_micro_batch
from mctool.distill.draws import draw_chooser
from mctool.distill.state import State, _rank_seed, initial_state
from mctool.core.errors import Interrupted, TrainingDiverged, UsageError
from mctool.training.labels import expert_predictor
from mctool.data.prepared import Prepared, auto_val_size, split_validation
from mctool.core.progress import SIGNAL_NAMES, SILENT, Muted, Reporter, duration
from mctool.evaluate.scores import score_text

_RESUME_HINT = "add --resume to the same command to continue"
# The cost model of `planned_every`, in plain training steps of one image: a matching inner step
# costs about 3 (bench/README.md, "Matching cost": constant/plain 2.9-3.1), scoring an image
# (forward only) about a third of one.
MATCH_STEP_COST = 3.0
FORWARD_COST = 1 / 3


def _copy(value: Value) -> Value:
    return value.clone() if isinstance(value, torch.Tensor) else value


def state_bytes(state: State) -> int:
    """Bytes of the learnables' tensor values and `--ema` averages (float32 as stored): a save writes
    about 3× this."""
    return sum(4 * v.numel() for d in (state.values, state.averages) for v in d.values() if isinstance(v, torch.Tensor))


@dataclass
class DistillResult:
    """What `mctool distill` did."""

    file: str
    synset: str
    iterations: int
    alpha: float
    loss_first: float | None
    loss_last_mean: float | None
    skipped_iterations: int
    evaluations: list[dict[str, Any]]
    seconds: float
    config: dict[str, Any]
    png: str | None = None
    best: dict[str, Any] | None = None  # iteration, lr, selected_on, score of the best images
    png_best: str | None = None
    notes: list[str] = field(default_factory=list)
    selection: dict[str, Any] | None = None  # the best-images selection: evaluations and their measured cost
    start: dict[str, Any] | None = None  # --init-draws: the draw the run started from, each draw's score


# Settings that do not change a run's trajectory — how long it runs, when it saves, how and where its
# images are scored (which training images it starts from is checked on the indices) — unless the run
# cuts lr_img after its evaluations (`--lr-backoff`, checked apart; with it, `select_margin` decides which
# images a cut goes on from): a run differing from a candidate's
# only in these may continue the candidate's run (`continuation_problem`).
TRAJECTORY_FREE = ("iterations", "checkpoint_every", "checkpoint_minutes", "eval_every", "eval_share", "eval_runs",
                   "eval_epochs", "select_on", "val_size", "select_margin", "preset")


def continuation_problem(candidate: DistillConfig, final: DistillConfig, what: str = "the candidate",
                         every: int | None = None) -> str | None:
    """Why a run with `final` settings is not the run `candidate`'s settings started, longer (None:
    it is). Its trajectory must depend on the same settings (all but TRAJECTORY_FREE), it must be no
    shorter, and its selection must see what a restart's would: with evaluations every N < the
    candidate's iterations — `every`, the final run's spacing (`selection_every`; default
    --eval-every) — a restart scores iterations whose images a continuation never has.
    A run that may cut lr_img (`--lr-backoff` with a selection) starts over: its cuts follow
    evaluations a continuation never made. No schedule depends on the total number of iterations
    (the sampling window grows over --start-upper-iterations, the EMA and the momenta are in the
    state), so continuing equals restarting bit for bit on the CPU (tests/test_tune.py)."""
    # With --init-draws N > 1 the evaluations' networks score the starting draws: they choose the start.
    free = [k for k in TRAJECTORY_FREE if final.init_draws == 1 or k not in ("eval_runs", "eval_epochs")]
    differ = [f.name for f in dataclasses.fields(DistillConfig) if f.name not in free
              and getattr(final, f.name) != getattr(candidate, f.name)]
    if differ:
        return f"its settings differ from those of {what}: " + ", ".join(differ)
    if final.iterations < candidate.iterations:
        return f"it is shorter than {what} ({final.iterations} iterations, not {candidate.iterations})"
    every = final.eval_every if every is None else every
    if 1 <= every < candidate.iterations:
        how = f"--eval-every {every}" if final.eval_every else f"evaluating every {every} iterations (--eval-share)"
        return (f"{how} scores images from before the {candidate.iterations} iterations of {what}, which only a "
                "restart has")
    if final.lr_backoff > 0 and final.selecting:
        return (f"--lr-backoff {final.lr_backoff:g} may cut lr_img before the {candidate.iterations} iterations of "
                f"{what}, which only a restart does")
    return None


def continues(candidate: DistillConfig, final: DistillConfig) -> bool:
    """Whether a run with `final` settings is the run `candidate`'s settings started, longer."""
    return continuation_problem(candidate, final) is None


def val_split_size(cfg: DistillConfig, num_train: int) -> int:
    """The validation images a run with `cfg` holds out of `num_train` training images."""
    return cfg.val_size or auto_val_size(num_train)


def selection_protocol(cfg: DistillConfig) -> Any:
    """How a run with `cfg` scores its images when it selects them (an EvaluateConfig)."""
    from mctool.evaluate.evaluation import EvaluateConfig

    return EvaluateConfig(runs=cfg.eval_runs, epochs=cfg.eval_epochs, seed=cfg.seed, augment=cfg.augment)


def selection_scored(e: dict[str, Any], cfg: DistillConfig) -> bool:
    """Whether stored evaluation `e` is a score of the selection of a run with `cfg` — not one that
    `mctool evaluate` stored beside it (the same list: a resume reads both back), possibly on the
    same split under another protocol. The selection marks its own (`selection`: true); an entry
    without the mark (files of earlier releases) counts on the validation split, which only the
    selection scores, and on the test split unless it records another protocol than
    `selection_protocol(cfg)`'s: another model, runs, epochs, seed, augmentation or lr, or the best
    images (the selection scores each iteration's images as they are: target final). A marked entry
    counts whatever its runs and epochs: --eval-runs and --eval-epochs may change on --resume,
    and the run's earlier scores stay its own (method.md, "changes where a cut may come")."""
    if e.get("kind") != "synset" or e.get("split") != cfg.select_on:
        return False
    if "selection" in e:
        return e["selection"] is True
    if e.get("split") == "validation":
        return True  # only the selection scores on the validation split (`mctool evaluate` never does)
    p = selection_protocol(cfg)
    config = e.get("config") if isinstance(e.get("config"), dict) else {}
    recorded = {"model": e.get("model", p.models[0]), "runs": e.get("runs", p.runs),
                "epochs": e.get("epochs", p.epochs), "seed": e.get("seed", p.seed),
                "augment": config.get("augment", p.augment), "lr": config.get("lr"),
                "target": e.get("target", "final")}
    return recorded == {"model": p.models[0], "runs": p.runs, "epochs": p.epochs, "seed": p.seed,
                        "augment": p.augment, "lr": None, "target": "final"}


@dataclass
class Continuation:
    """A prefix of this very run computed elsewhere (`--tune`'s winning candidate): the run goes on
    from its state instead of starting over, which gives the same images — and, with --eval-every,
    the same best images — bit for bit on the CPU. `run_prepared` checks that it is a prefix: the
    same settings but TRAJECTORY_FREE (`continuation_problem`) and the same training images to
    start from (the same validation split held out); else it starts over and says why.

    `scores`: evaluations already measured under this run's selection protocol (the same images,
    validation split and networks), by iteration — 0 for the starting images, the state's own
    iteration for its images — recorded instead of evaluated again."""

    state: State
    config: DistillConfig  # the settings it ran with (iterations: the state's)
    keep: torch.Tensor  # the training indices it distilled from: the complement of its validation split
    val_size: int = 0  # the validation split's size it held out (--val-size gives this run the same)
    scores: dict[int, dict[str, Any]] = field(default_factory=dict)
    what: str = "a prefix of this run"  # for the log: "candidate 9 of the search"
    by: str = "elsewhere"  # who measured `scores`: "the search"


class _Run:
    """One distillation's loop, checkpoints and periodic evaluations (rank-aware)."""

    def __init__(self, distiller: Distiller, cfg: DistillConfig, buffer: store.Buffer, out: Path, name: str,
                 reporter: Reporter, selection: tuple[torch.Tensor, torch.Tensor] | None,
                 continued: Continuation | None = None, starting: Callable[[], State] | None = None,
                 resume_hint: str = _RESUME_HINT) -> None:
        self.d, self.cfg, self.buffer, self.out, self.name = distiller, cfg, buffer, out, name
        self.reporter, self.selection, self.resume_hint = reporter, selection, resume_hint
        # A continued run's prefix, and how to rebuild the run's iteration-0 state (its starting
        # images) when the state is past it and they were never scored: a continued run, or a resume
        # of one interrupted before they were.
        self.continued, self.starting = continued, starting
        self.reused = 0  # evaluations recorded from `continued.scores` instead of measured
        self.source = buffer.source()
        ref = buffer.reference()
        self.reference = dataclasses.asdict(ref) if ref is not None else None
        self.selecting = False
        self.evaluations, self.eval_seconds, self.last_eval = 0, 0.0, 0.0  # this sitting's selection cost
        self.summary: dict[str, Any] | None = None

    def checkpoint(self, final: bool) -> None:
        state = self.d.state
        gens = dist.gather(self.d.generator.get_state())
        queues = dist.gather(list(self.d.queue))
        if gens is not None and queues is not None:
            state.generators, state.queues = gens, queues
        if dist.is_main():
            syn = _synset(self.name, self.cfg, state, final, self.source, self.reference)
            prov = store.provenance(dataclasses.asdict(self.cfg), self.cfg.seed, self.source)
            size = 3 * state_bytes(state) + 8 * len(state.losses)
            store.ensure_free_space(self.out, size, f"saving {self.name}")
            store.save_synset(self.out, syn, self.buffer.data, self.buffer.spec, self.buffer.layout, prov, size)

    def evaluate(self, at: State | None = None, reused: dict[str, Any] | None = None) -> None:
        """Score the images of `at` (default: the current state) on the selection split — or record
        `reused`, the same evaluation measured elsewhere —; keep them if they are the best so far."""
        from mctool.evaluate.evaluation import evaluate_set

        state, cfg = self.d.state, self.cfg
        at = at or state
        assert self.selection is not None
        if reused is None:
            started = time.perf_counter()
            ev = evaluate_set(at.shown("images"), at.labels, at.alpha, self.d.prepared, self.buffer.spec,
                              selection_protocol(cfg), "synset", self.reporter, score_on=self.selection,
                              split=cfg.select_on,
                              stop_hint=f"checkpoint saved at iteration {state.iteration}; {self.resume_hint}")[0]
            self.last_eval = time.perf_counter() - started
            self.eval_seconds += self.last_eval
            self.evaluations += 1
            ev.iteration = at.iteration
            scored = ev.to_dict()
        else:
            scored = {**reused, "iteration": at.iteration}
            self.reused += 1
        scored["selection"] = True  # the selection's own, apart from `mctool evaluate`'s (`selection_scored`)
        state.evaluations.append(scored)
        best = state.best
        bar = None if best is None else float(best.score.get("mean", -1.0))
        margin = 0.0 if best is None or best.iteration != 0 else cfg.select_margin * self._margin(bar or 0.0)
        better = bar is None or scored["mean"] > bar + margin
        what = " (the starting images)" if at.iteration == 0 else ""
        how = "" if reused is None else f", measured by {self.continued.by if self.continued else 'another run'}"
        within = (f" (above the starting images by no more than --select-margin {cfg.select_margin:g} standard "
                  f"error(s), {100 * margin:.2g} points: the start is kept)"
                  if bar is not None and not better and scored["mean"] > bar else "")
        self.reporter.log(f"iteration {at.iteration}{what}: {scored['model']} {cfg.select_on} accuracy "
                          f"{score_text(scored['mean'], scored.get('std'), scored.get('runs', 1))} %{how}"
                          + (" (best so far)" if better else within))
        if better:
            kept = {e.stored: _copy(at.shown(e.name)) for e in learned_in(cfg) if e.stored is not None}
            state.best = store.BestImages(**{"labels": at.labels.clone(), **kept}, iteration=at.iteration,
                                          selected_on=cfg.select_on, score=scored)

    def _catch_up(self) -> None:
        """The selection's first candidate: the starting images (always the bar to pass; their score
        reused when a continued run has it, else measured — a resume of a continued run draws them
        again from the seed, as the run did). The loop's schedule scores what follows — a continued
        run's images only when a restart would (N divides their iteration), with --eval-every N or
        the spacing planned for --eval-share alike."""
        state = self.d.state
        if not self._evaluated_at(0):
            start = state if state.iteration == 0 else (self.starting() if self.starting is not None else None)
            if start is not None:
                self.evaluate(start, self._reused(0))

    def _reused(self, iteration: int) -> dict[str, Any] | None:
        """The score of this run's images at `iteration` measured elsewhere (a continued run's), if any."""
        return self.continued.scores.get(iteration) if self.continued is not None else None

    def _evaluated_at(self, iteration: int) -> bool:
        """Whether this run's selection already scored its images at `iteration` (a resume)."""
        return self._scored_at(iteration) is not None

    def _planned_every(self) -> int:
        """The spacing of evaluations that keeps them at about eval_share of the run (`planned_every`),
        logged once; the same on every rank and machine."""
        assert self.selection is not None
        cfg, n = self.cfg, int(self.d.state.images.shape[0])
        every, ratio = planned_every(cfg, n, int(self.selection[1].numel()))
        none = "" if every < cfg.iterations else (
            f"; a run of {cfg.iterations} iterations is scored at its start and its end only"
            + (", so --lr-backoff cannot cut (--eval-every N scores sooner)" if cfg.lr_backoff > 0 else ""))
        self.reporter.log(f"selection on {cfg.select_on}: an evaluation costs about {ratio:.3g} iterations (a count of "
                          f"network passes); evaluating every {every} iterations (and at the end) keeps them at about "
                          f"{100 * cfg.eval_share:g} % of the run{none}")
        return every

    def _time_left(self, per_iteration: float | None, every: int) -> str | None:
        """'0.52 s/it, 3.1 min left' (the evaluations still to come included)."""
        if per_iteration is None:
            return None
        left = self.cfg.iterations - self.d.state.iteration
        seconds = left * per_iteration
        if self.selecting:
            evals = (left // every if every else 0) + 1
            seconds += evals * (self.last_eval or _stored_eval_seconds(
                [e for e in self.d.state.evaluations if selection_scored(e, self.cfg)]))
        return f"{per_iteration:.3g} s/it, {duration(seconds)} left"

    def loop(self) -> float:
        """Run the remaining iterations; returns the seconds taken.

        Selecting (--eval-every N, or --eval-share S from AUTO_SELECT_MIN_ITERATIONS iterations on):
        the starting images are scored first (iteration 0, the bar to pass), then every N
        iterations — with --eval-share, N is planned (`planned_every`) so that the evaluations take
        about S of the run's time — and the final images at the end."""
        d, cfg, reporter = self.d, self.cfg, self.reporter
        state, device = d.state, d.device
        reporter.task("distill", f"distill {self.name}", total=cfg.iterations)
        reporter.update("distill", advance=state.iteration)
        started = last_save = time.perf_counter()
        first_iteration, bad_in_a_row, bad_here = state.iteration, 0, 0
        # Whether this run selects (the same on every rank; only rank 0 evaluates).
        may_select = self.selection is not None and (cfg.eval_every > 0 or (
            cfg.eval_share > 0 and cfg.iterations >= AUTO_SELECT_MIN_ITERATIONS))
        self.selecting = dist.is_main() and may_select
        # The spacing: --eval-every, else the one a resumed run chose (earlier builds measured it), else planned.
        every = cfg.eval_every or int(state.run.get("eval_every", 0))
        if may_select and not every:
            every = self._planned_every()  # on every rank (the others' reporter is muted)
            state.run = {**state.run, "eval_every": every}  # a resume keeps the spacing
        elif may_select and not cfg.eval_every and self.selecting:
            assert self.selection is not None
            now = planned_every(cfg, int(state.images.shape[0]), int(self.selection[1].numel()))[0]
            if now != every:  # e.g. --eval-epochs changed on --resume: the run's schedule stays its own
                reporter.log(f"selection on {cfg.select_on}: evaluating every {every} iterations as the run's first "
                             f"sitting planned (these settings would plan {now})")
        steps: list[float] = []  # when each of this sitting's last iterations ended
        try:
            if self.selecting:
                self._catch_up()  # the starting images: the bar every later iteration must pass
            while state.iteration < cfg.iterations:
                signum = reporter.should_stop()
                if dist.any_flag(bool(signum), device):
                    raise Interrupted(f"interrupted ({SIGNAL_NAMES.get(signum, 'by another process')}); checkpoint "
                                      f"saved at iteration {state.iteration}; {self.resume_hint}", signum or 15)
                # Every N-th iteration's images (a resume stopped during their evaluation scores them now).
                if (self.selecting and every and state.iteration > 0 and state.iteration % every == 0
                        and not self._evaluated_at(state.iteration)):
                    self.evaluate(reused=self._reused(state.iteration))
                    steps.clear()  # the pace of iterations, not of evaluations
                if cfg.lr_backoff > 0 and may_select and state.iteration > 0 and state.iteration % every == 0:
                    self._back_off_if_worse(every)
                per_iteration = (steps[-1] - steps[0]) / (len(steps) - 1) if len(steps) > 1 else None
                if not self._iteration(self._time_left(per_iteration, every)):
                    state.skipped += 1
                    bad_in_a_row, bad_here = bad_in_a_row + 1, bad_here + 1
                    if bad_in_a_row >= MAX_BAD_IN_A_ROW:
                        self._diverged(f"{MAX_BAD_IN_A_ROW} iterations in a row")
                else:
                    bad_in_a_row = 0
                state.iteration += 1
                steps = (steps + [time.perf_counter()])[-21:]
                due_time = cfg.checkpoint_minutes > 0 and time.perf_counter() - last_save >= 60 * cfg.checkpoint_minutes
                if state.iteration < cfg.iterations and (state.iteration % cfg.checkpoint_every == 0 or
                                                         dist.any_flag(due_time, device)):
                    self.checkpoint(final=False)
                    last_save = time.perf_counter()
        except (KeyboardInterrupt, Interrupted):
            reporter.done("distill")
            self.checkpoint(final=False)  # the state is whole: updates are applied all at once
            raise
        reporter.done("distill")
        ran = state.iteration - first_iteration
        if bad_here >= 2 and bad_here > MAX_BAD_FRACTION * ran:
            self._diverged(f"{bad_here} of {ran} iterations")
        if self.selecting and not self._evaluated_at(state.iteration):
            try:
                self.evaluate(reused=self._reused(state.iteration))
            except (KeyboardInterrupt, Interrupted):
                self.checkpoint(final=False)  # the iterations are done: a resume only scores their images
                raise
        self.checkpoint(final=True)
        seconds = time.perf_counter() - started
        if self.selecting:
            self.summary = {"evaluations": self.evaluations, "seconds": self.eval_seconds,
                            "share": self.eval_seconds / seconds if seconds > 0 else 0.0, "every": every,
                            "bound": cfg.eval_share if not cfg.eval_every else None, "split": cfg.select_on,
                            "reused": self.reused, "reused_by": self.continued.by if self.continued else None,
                            "backoffs": list(state.run.get("backoffs", [])),
                            "select_margin": cfg.select_margin, "start_margin": self._start_margin(),
                            "from_iteration": first_iteration}  # > 0: a resumed (or continued) run's sitting
        return seconds

    def _back_off_if_worse(self, every: int) -> None:
        """`--lr-backoff`: when this iteration's evaluation scored the images below the starting
        images by more than the selection split's standard error (`_below_start`) — an evaluation
        of the schedule (every `every` iterations), not the end of a shorter sitting —, go on from
        the best images so far (momenta reset, `--ema` averages restarted there) with the image
        learning rate cut by the factor — at most MAX_BACKOFFS times. Decided on rank
        0 (the only one that evaluates), carried out on every rank; a resume stopped between the
        evaluation and the cut makes the cut (the state lists each cut with its iteration)."""
        state, cfg = self.d.state, self.cfg
        due = (self.selecting and every > 0 and state.iteration % every == 0 and state.best is not None
               and state.backoffs < MAX_BACKOFFS
               and all(b["iteration"] != state.iteration for b in state.run.get("backoffs", []))
               and self._below_start(state.iteration))
        if not dist.any_flag(due, self.d.device):
            return
        # Broadcast from the CPU: a pickled CUDA tensor unpickles onto rank 0's GPU on every rank.
        best = state.best
        if dist.world_size() > 1:
            best = dist.broadcast(dataclasses.replace(best, images=best.images.cpu(), labels=best.labels.cpu())
                                  if dist.is_main() and best is not None else None)
        assert best is not None
        device = self.d.device
        values = {e.name: best_value(e, best) for e in learned_in(cfg)}
        values = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in values.items()}
        images = next(e for e in LEARNABLES if e.backs_off)
        was, lr = learning_rate(images, cfg, state.backoffs), learning_rate(images, cfg, state.backoffs + 1)
        if dist.is_main():
            scored = self._scored_at(state.iteration)
            start = self._scored_at(0)
            assert scored is not None and start is not None
            self.reporter.log(
                f"iteration {state.iteration}: {cfg.select_on} accuracy "
                f"{score_text(scored['mean'], scored.get('std'), scored.get('runs', 1))} % is below the starting "
                f"images' {score_text(start['mean'], start.get('std'), start.get('runs', 1))} % by more than the "
                f"split's standard error ({100 * self._margin(start['mean']):.2g} points): "
                f"{images.lr} {was:.3g} → {lr:.3g} (--lr-backoff "
                f"{cfg.lr_backoff:g}, cut {state.backoffs + 1} of at most {MAX_BACKOFFS}), going on from the best "
                f"images (iteration {best.iteration})")
        state.values = values
        state.velocities = {k: zero_like(v) for k, v in values.items()}
        state.averages = {e.name: _copy(values[e.name]) for e in learned_in(cfg) if averaged(e, cfg)}
        state.sync_labels()
        if dist.world_size() > 1:  # every rank must go on from the same images, or the averaged gradients mix runs
            digests = dist.gather(hashlib.sha256(state.images.cpu().numpy().tobytes()).hexdigest())
            if dist.any_flag(digests is not None and len(set(digests)) > 1, self.d.device):
                raise RuntimeError(f"the ranks disagree after the --lr-backoff cut at iteration {state.iteration}")
        state.run = {**state.run, "backoffs": [*state.run.get("backoffs", []),
                                               {"iteration": state.iteration, "from_iteration": best.iteration,
                                                "lr_img_was": was, "lr_img": lr}]}

    def _scored_at(self, iteration: int) -> dict[str, Any] | None:
        """The selection's evaluation of the images at `iteration`, if any (one stored without a
        mean, which the store allows, is none: those images are scored again)."""
        found = [e for e in self.d.state.evaluations if selection_scored(e, self.cfg) and e.get("mean") is not None
                 and e.get("iteration") == iteration]
        return found[-1] if found else None

    def _margin(self, accuracy: float) -> float:
        """`standard_error` on this run's selection split (what --lr-backoff and --select-margin count)."""
        assert self.selection is not None
        return standard_error(accuracy, int(self.selection[1].numel()))

    def _start_margin(self) -> float | None:
        """By how much (a fraction) later images had to score above the starting images to replace
        them (--select-margin standard errors; None: the start was not scored)."""
        start = self._scored_at(0)
        return None if start is None else self.cfg.select_margin * self._margin(start["mean"])

    def _below_start(self, iteration: int) -> bool:
        """Whether the images at `iteration` scored below the starting images by more than the
        split's standard error (both scored)."""
        scored, start = self._scored_at(iteration), self._scored_at(0)
        return (iteration > 0 and scored is not None and start is not None
                and scored["mean"] < start["mean"] - self._margin(start["mean"]))

    def _iteration(self, pace: str | None = None) -> bool:
        """One update; False when it was not applied (non-finite or out of bounds). `pace`: seconds
        per iteration and time left, for the progress line."""
        d, state, device = self.d, self.d.state, self.d.device
        result = d.step()
        entries = learned_in(self.cfg)
        ok = result is not None and math.isfinite(result.loss) and all(
            bool(torch.isfinite(result.grads[e.name]).all()) for e in entries)
        if dist.any_flag(not ok, device):
            return False  # skipped on every rank: the learnables keep their last good values
        assert result is not None
        # Tensors are averaged across ranks as they are; scalars and the loss in one float64 tensor.
        grads: dict[str, Value] = {e.name: dist.all_mean_(result.grads[e.name]) for e in entries if not e.scalar}
        scalars = [e.name for e in entries if e.scalar]
        mean = dist.all_mean_(torch.tensor([float(result.grads[k]) for k in scalars] + [result.loss],
                                           dtype=torch.float64, device=device))
        grads.update({k: float(mean[i]) for i, k in enumerate(scalars)})
        if not d.apply_update(grads):
            return False
        state.losses.append(float(mean[-1]))
        recent = state.losses[-20:]
        fields: dict[str, Any] = {"loss": sum(recent) / len(recent), "alpha": state.alpha}
        if pace is not None:
            fields["time"] = pace
        self.reporter.update("distill", advance=1, **fields)
        return True

    def _diverged(self, how: str) -> None:
        state = self.d.state
        self.checkpoint(final=False)
        kept = "" if state.best is None else (
            f"; its best images (iteration {state.best.iteration}"
            + (", the starting images" if state.best.iteration == 0 else "") + ") are kept")
        raise TrainingDiverged(
            f"the distillation diverged: {how} gave a non-finite loss or gradient, or images beyond "
            f"±{IMAGE_BOUND:g} / a step size beyond {ALPHA_BOUND:g}× lr_init (last good state saved in "
            f"{store.shown(self.out)} at iteration {state.iteration}{kept}); try a smaller --lr-img or --lr-lr")


def planned_every(cfg: DistillConfig, images: int, val_images: int) -> tuple[int, float]:
    """(N, r): evaluating every N iterations keeps the evaluations at about `cfg.eval_share` of the
    run (at most, by a count of network passes), so that the spacing — and with it the best images and the
    `--lr-backoff` cuts — is the same on every machine and at every load (`--seed` repeats the
    run); r is an evaluation's cost in iterations. An evaluation trains `eval_runs` networks for
    `eval_epochs` epochs over the `images` and scores the `val_images`; an iteration takes
    `syn_steps` matching steps on `batch_syn` (or all) images. The measured cost is reported at the
    end of the run (`selection_notes`)."""
    evaluation = cfg.eval_runs * (cfg.eval_epochs * images + FORWARD_COST * val_images)
    iteration = cfg.syn_steps * min(cfg.batch_syn or images, images) * MATCH_STEP_COST
    ratio = evaluation / max(iteration, 1e-9)
    share = cfg.eval_share
    return _nice_up(max(1, math.ceil(ratio * (1 - share) / share))), ratio


def selection_spacing(cfg: DistillConfig, images: int, val_images: int) -> int:
    """The spacing of the selection's evaluations between a run's start and its end (0: none) with
    `images` synthetic and `val_images` selection images: --eval-every, else `planned_every` for
    --eval-share runs of AUTO_SELECT_MIN_ITERATIONS iterations or more — what the run's loop uses."""
    if cfg.eval_every or not (cfg.eval_share > 0 and cfg.iterations >= AUTO_SELECT_MIN_ITERATIONS):
        return cfg.eval_every
    return planned_every(cfg, images, val_images)[0]


def selection_images(cfg: DistillConfig, prepared: Prepared) -> int:
    """How many images a run with `cfg` on `prepared` scores its selection on (its split's size)."""
    if cfg.select_on == "test":
        return int(prepared.test_y.numel())
    size = val_split_size(cfg, prepared.train_y.numel())
    return int(split_validation(prepared.train_y, prepared.meta.num_classes, size, cfg.seed)[1].numel())


def selection_every(cfg: DistillConfig, prepared: Prepared) -> int:
    """`selection_spacing` of a run with `cfg` on `prepared`, before it holds out its split."""
    return selection_spacing(cfg, cfg.ipc * prepared.meta.num_classes, selection_images(cfg, prepared))


def standard_error(accuracy: float, n: int) -> float:
    """The standard error of an accuracy near `accuracy` (a fraction) measured on `n` images
    (binomial: √(p(1 − p)/n), at least one image's 1/n): a score this far below another on the
    same split may be noise."""
    p, n = min(max(accuracy, 0.0), 1.0), max(1, n)
    return max(math.sqrt(p * (1 - p) / n), 1 / n)  # at least one image: at p = 1 any drop is no noise


def _stored_eval_seconds(evaluations: list[dict[str, Any]]) -> float:
    """The cost of the last stored evaluation (a resumed run's estimate before it measures one)."""
    for e in reversed(evaluations):
        if e.get("kind") == "synset" and e.get("seconds_per_run") is not None:
            return float(e["seconds_per_run"]) * int(e.get("runs") or 1)
    return 0.0


def _nice_up(n: int) -> int:
    """The smallest of 1, 2, 5, 10, 20, 50, … at least n (evaluations at round iterations)."""
    scale = 1
    while True:
        for step in (1, 2, 5):
            if step * scale >= n:
                return step * scale
        scale *= 10


def selection_notes(summary: dict[str, Any], state: State, seconds: float, cfg: DistillConfig) -> list[str]:
    """What the selection cost (measured), and — when the starting images won — that the run
    returns them (beside the selection's own scores, never `mctool evaluate`'s: `selection_scored`)."""
    split = summary["split"]
    bound = (f"bound {100 * summary['bound']:g} % besides the start and the end" if summary["bound"]
             else f"every {summary['every']} iterations, --eval-every")
    reused = (f"; {summary['reused']} more reused, measured by {summary['reused_by']}" if summary.get("reused")
              else "")
    since = summary.get("from_iteration") or 0
    # Counted over this sitting: a resumed run's earlier evaluations and time are not in it.
    span = f"this run's {duration(seconds)}" if not since else \
        f"this sitting's {duration(seconds)}, from iteration {since}"
    if summary["evaluations"] or not summary.get("reused"):
        notes = [f"selection on {split}: {summary['evaluations']} evaluation(s) took {duration(summary['seconds'])}, "
                 f"{100 * summary['share']:.0f} % of {span} ({bound}{reused})"]
    else:
        notes = [f"selection on {split}: no evaluation needed: {summary['reused']} reused, measured by "
                 f"{summary['reused_by']}"]
    cuts = summary.get("backoffs") or []
    if cuts:
        lrs = " → ".join([f"{cuts[0]['lr_img_was']:.3g}"] + [f"{c['lr_img']:.3g}" for c in cuts])
        notes.append(f"lr_img was cut {len(cuts)} time(s) (--lr-backoff), {lrs}, at iteration(s) "
                     f"{', '.join(str(c['iteration']) for c in cuts)}: the images fell below the starting ones; "
                     f"a run with --lr-img {cuts[-1]['lr_img']:.3g} from the start may do better")
    best = state.best
    if best is not None and best.iteration == 0 and state.iteration > 0:
        later = [e for e in state.evaluations if selection_scored(e, cfg)
                 and (e.get("iteration") or 0) > 0 and e.get("mean") is not None]
        top = max(later, key=lambda e: e["mean"]) if later else None
        s = best.score
        beaten = "" if top is None else (f", the distilled ones at most "
                                         f"{score_text(top['mean'], top.get('std'), top.get('runs', 1))} % "
                                         f"(iteration {top['iteration']})")
        margin = summary.get("start_margin") or 0.0
        verdict = "scored best"
        if top is not None and s["mean"] < top["mean"] <= s["mean"] + margin:
            # Above the start, but by no more than the split can tell apart (--select-margin).
            verdict = "are kept"
            beaten += (f", above them by no more than --select-margin {summary.get('select_margin', 0):g} standard "
                       f"error(s) of the split ({100 * margin:.2g} points)")
        notes.append(f"the starting images {verdict} on {split}: "
                     f"{score_text(s['mean'], s.get('std'), s.get('runs', 1))} % at iteration 0{beaten} — the run "
                     "returns them as its best images (the final ones are kept beside them); these settings did not "
                     f"improve on the start{' by more than the margin' if verdict == 'are kept' else ''}: try "
                     "`mctool distill --tune`, a smaller --lr-img, a larger --val-size or --eval-runs, or check the "
                     f"experts (`mctool inspect`){_draw_hint(cfg)}")
    return notes


def _draw_hint(cfg: DistillConfig) -> str:
    """A run that returns its one starting draw may have drawn badly (bench/README.md, "Choosing the
    starting draw"): say how to choose among several."""
    if cfg.init_draws > 1 or cfg.pix_init == "noise":
        return ""
    return "; the starting draw itself may be a poor one: --init-draws 4 starts from the best of four"


def shared_start(state: State, device: torch.device) -> State:
    """Rank 0's starting `state` on every rank (under torchrun; the state itself otherwise).

    Every rank draws the same images from the seed, but `--init correct` and `--learn-labels` also
    take the expert's float predictions, which on GPUs may differ in the last bits between ranks:
    at a near-tie the ranks would start from other images or label logits and average the
    gradients of different runs. Done for every multi-rank run, not only for those: once per run,
    as cheap as the draw, and no start rule added later can let the ranks drift apart."""
    if dist.world_size() <= 1:
        return state
    # Broadcast from the CPU: a pickled CUDA tensor unpickles onto rank 0's GPU on every rank.
    state = dist.broadcast(state.to(torch.device("cpu")) if dist.is_main() else None).to(device)
    state.sync_labels()  # each rank's labels from the shared logits, as a resume makes them
    return state


def _selection(cfg: DistillConfig, prepared: Prepared) -> tuple[tuple[torch.Tensor, torch.Tensor] | None,
                                                                 torch.Tensor | None]:
    """(the split periodic evaluations score on, the training indices distillation may use)."""
    if not cfg.selecting:
        return None, None
    if cfg.select_on == "test":
        return (prepared.test_x, prepared.test_y), None
    size = val_split_size(cfg, prepared.train_y.numel())
    keep, held = split_validation(prepared.train_y, prepared.meta.num_classes, size, cfg.seed)
    if held.numel() == 0:
        raise UsageError("--select-on validation needs a validation split, but the training split is too small; "
                         "use --val-size or --select-on test")
    if not cfg.eval_every and cfg.pix_init != "noise":
        # The default selection must not make a run impossible that would run without it.
        left = torch.bincount(prepared.train_y.cpu()[keep], minlength=prepared.meta.num_classes)
        if int(left.min()) < cfg.ipc:
            raise UsageError("holding out a validation split would leave fewer than ipc training images in a class")
    held = held.to(prepared.train_x.device)
    return (prepared.train_x[held], prepared.train_y[held]), keep


def _split_why(cfg: DistillConfig, pool: torch.Tensor | None) -> str:
    """Why a run holds out another validation split than a candidate's, or none."""
    if pool is not None:
        return "another validation split"
    if cfg.select_on == "test":
        return "this run selects on the test split and holds out none"
    return "this run holds out no validation split"


def run_prepared(cfg: DistillConfig, buffer: store.Buffer, out: Path, prepared: Prepared, name: str | None = None,
                 resume: bool = False, reporter: Reporter = SILENT,
                 continuation: Continuation | None = None, resume_hint: str = _RESUME_HINT) -> DistillResult:
    """Distill (or resume) synset `name` of `out` from an open buffer and prepared data; with
    `continuation`, go on from a prefix of this run computed elsewhere (see `Continuation`).
    `resume_hint`: what an interruption's message says to continue the run."""
    if resume and continuation is not None:
        raise ValueError("a run either resumes its own checkpoint or continues a prefix computed elsewhere")
    cfg.validate()
    check_buffer_matches(cfg, buffer)
    name = name or synset_name(cfg)
    check_synset_name(name)
    device = prepared.train_x.device
    shape = sizes.shape_of_buffer(cfg, buffer)
    sizes.check_epochs(cfg, shape.epochs)
    sizes.check_sizes(cfg, shape, device, data_loaded=True)  # library callers (--tune) too
    notes: list[str] = []
    source = ExpertSource(buffer, cfg.method, device)
    if cfg.method == "mct" and len(source.positions) - 2 != cfg.interior:
        notes.append(f"note: the settings expect {cfg.interior} interior waypoint(s) but {store.shown(buffer.path)} "
                     f"has {len(source.positions) - 2} (positions {','.join(map(str, source.positions))}); using the "
                     "buffer's")
        reporter.log(notes[-1])
    if cfg.depth and buffer.spec.depth != cfg.depth:
        notes.append(f"note: the settings were made for depth-{cfg.depth} experts but {store.shown(buffer.path)} holds "
                     f"depth-{buffer.spec.depth} ones; using them as they are")
        reporter.log(notes[-1])
    try:
        selection, pool = _selection(cfg, prepared)
    except UsageError:
        if cfg.eval_every:
            raise  # asked for: say why it cannot be done
        selection, pool = None, None  # the default selection: a note, not a failure
        notes.append("note: the training split is too small to hold out a validation split: the run keeps its "
                     "final images (--val-size, or --eval-share 0 to silence this)")
        reporter.log(notes[-1])
    for option, value in (("--lr-backoff", cfg.lr_backoff), ("--select-margin", cfg.select_margin)):
        if value > 0 and not cfg.selecting:
            notes.append(f"note: {option} {value:g} follows the evaluations of a run that selects its images; "
                         "this one does not (--eval-every N or --eval-share S)")
            reporter.log(notes[-1])
    if selection is not None and cfg.eval_share > 0 and not cfg.eval_every and cfg.iterations < AUTO_SELECT_MIN_ITERATIONS:
        notes.append(f"note: a run of {cfg.iterations} iteration(s) keeps its final images: the best-images "
                     f"selection starts at {AUTO_SELECT_MIN_ITERATIONS} iterations (two evaluations would cost more "
                     "than the run); --eval-every N selects anyway")
        reporter.log(notes[-1])
    if continuation is not None:
        every = cfg.eval_every if selection is None else selection_spacing(cfg, cfg.ipc * prepared.meta.num_classes,
                                                                            int(selection[1].numel()))
        why = continuation_problem(continuation.config, cfg, continuation.what, every)
        if why is None and (pool is None or not torch.equal(pool.cpu(), continuation.keep.cpu())):
            # Not the same training images to start from (another validation split, or none): not a prefix.
            give = (f"; give --val-size {continuation.val_size} to hold out its split"
                    if continuation.val_size and pool is not None else "")
            why = f"{continuation.what} started from other training images ({_split_why(cfg, pool)}{give})"
        elif why is None and dist.world_size() != len(continuation.state.generators):
            why = (f"{continuation.what} ran in {len(continuation.state.generators)} process(es), this run in "
                   f"{dist.world_size()}")
        if why is not None:
            notes.append(f"note: the run starts over: {why}")
            reporter.log(notes[-1])
            continuation = None
    if cfg.select_on != "test":
        prepared = dataclasses.replace(prepared, test_x=prepared.test_x[:0], test_y=prepared.test_y[:0])
    world, me = dist.world_size(), dist.rank()
    expert = None

    def starting(chosen: int | None = None) -> State:
        """The run's iteration-0 state, drawn again from the seed (deterministic: as the run drew it;
        `chosen`: the starting draw the run chose, when it made several — not scored again)."""
        nonlocal expert  # learned labels and --init correct: the expert's, made once
        if (cfg.learn_labels or cfg.pix_init == "correct") and expert is None:
            expert = expert_predictor(buffer, cfg.method, device)
        choose = None
        if cfg.init_draws > 1 and chosen is None:
            labels = store.class_major_labels(prepared.meta.num_classes, cfg.ipc)
            choose = draw_chooser(prepared, buffer.spec, selection_protocol(cfg), cfg.lr_init, labels, pool, reporter)
        begun = initial_state(cfg, prepared, torch.Generator().manual_seed(cfg.seed), pool, expert, choose, chosen)
        scored = begun.run.get("init_draws", {})
        if "scores" in scored:
            shown = ", ".join(f"{100 * v:.1f}" for v in scored["scores"])
            held = " and the validation split" if pool is not None else ""
            reporter.log(f"starting draw {scored['chosen'] + 1} of {cfg.init_draws} (--init-draws): accuracy {shown} % "
                         f"on {scored['scored_on']} training images outside the draws{held} "
                         f"({cfg.eval_runs} network(s) × {cfg.eval_epochs} epochs each, {duration(scored['seconds'])})")
        return begun

    start: State | None = None  # a continued run's iteration-0 state (its starting images, for the selection)
    if resume:
        # Broadcast from the CPU: a pickled CUDA tensor unpickles onto rank 0's GPU on every rank.
        state = _load_state(out, name, cfg) if dist.is_main() else None
        state = dist.broadcast(state).to(device)
        state.sync_labels()
        if len(state.generators) != world:
            raise UsageError(f"{store.shown(out)}: the checkpoint was written by {len(state.generators)} process(es); "
                             f"resume with the same number (now {world})")
        if state.iteration > cfg.iterations or (state.iteration == cfg.iterations and state.complete):
            raise UsageError(f"{store.shown(out)}: synset '{name}' is already at iteration {state.iteration}; "
                             f"raise --iterations above {state.iteration} to continue it")
        generator = torch.Generator().manual_seed(0)
        generator.set_state(state.generators[me])
    else:
        if out.exists() and dist.is_main():
            with store.open_synsets(out) as sf:
                if name in sf.names:
                    raise UsageError(f"{store.shown(out)}: already holds synset '{name}'; use --resume to continue "
                                     "it, --name for another, or another -o FILE")
        # Every rank draws (a failing draw fails on each), then all take rank 0's (`shared_start`). A run
        # that continues another (--tune's winner) starts from the draw that run chose: scoring the
        # draws again could choose another at a near-tie on a GPU, and would spend the time twice.
        handed = continuation.state.run.get("init_draws", {}).get("chosen") if continuation is not None else None
        state = shared_start(starting(handed), device)
        generator = torch.Generator().manual_seed(_rank_seed(cfg.seed, me))
        state.queues = [[] for _ in range(world)]
        if continuation is not None:
            if state.iteration >= continuation.state.iteration or continuation.state.iteration > cfg.iterations:
                raise ValueError(f"a continuation must be at an iteration in 1 … {cfg.iterations}")
            start = state  # the starting images stay a candidate of the selection
            state = copy.deepcopy(continuation.state).to(device)  # its owner keeps its own
            state.sync_labels()
            # A resume of this run may find its starting images unscored (stopped while scoring them):
            # it then draws them again from the seed.
            state.run = {**state.run, "continued_from": state.iteration}
            generator = torch.Generator().manual_seed(0)
            generator.set_state(state.generators[me])
            notes.append(f"the run continues {continuation.what} from iteration {state.iteration} (the same "
                         f"settings and seed: the first {state.iteration} iterations are not run again)")
            reporter.log(notes[-1])
    distiller = Distiller(cfg, buffer.spec, source, prepared, state, generator)
    distiller.queue = (store.check_queue(out, name, state.queues[me], source.indices, buffer.path)
                       if state.queues else [])
    distiller.micro_batch = choose_micro_batch(distiller, cfg, buffer, state.run, reporter)
    state.run = {**state.run, "micro_batch": distiller.micro_batch or 0}
    # The starting images, for a state past iteration 0 that has not scored them: a continued run's
    # (drawn above), or drawn again for a resume of one. Other runs score them at iteration 0, before
    # any checkpoint (a resume of a run made before they were scored leaves it so).
    # (Only rank 0 scores, so only rank 0 rebuilds: with the recorded choice, the start it drew before.)
    chosen = state.run.get("init_draws", {}).get("chosen")
    rebuild = ((lambda: start) if start is not None else (lambda: starting(chosen)) if "continued_from" in state.run
               else None)
    run = _Run(distiller, cfg, buffer, out, name, reporter, selection, continuation, rebuild, resume_hint)
    seconds = run.loop()
    if run.summary is not None:
        for note in selection_notes(run.summary, state, seconds, cfg):
            notes.append(note)
            reporter.log(note)
    best = None
    if state.best is not None:
        best = {"iteration": state.best.iteration, "lr": state.best.lr, "selected_on": state.best.selected_on,
                "score": state.best.score}
    recent = state.losses[-20:]
    return DistillResult(file=str(out), synset=name, iterations=state.iteration, alpha=state.alpha,
                         loss_first=state.losses[0] if state.losses else None,
                         loss_last_mean=sum(recent) / len(recent) if recent else None,
                         skipped_iterations=state.skipped, evaluations=state.evaluations, seconds=seconds,
                         config=dataclasses.asdict(cfg), best=best, notes=notes, selection=run.summary,
                         start=state.run.get("init_draws"))


def run(preset: str | None, overrides: dict[str, Any], buffer: Path, out: Path, name: str | None = None,
        resume: bool = False, data_dir: Path | None = None, device: str = "auto", default_buffer: bool = False,
        reporter: Reporter = SILENT, prepared: Prepared | None = None,
        continuation: Continuation | None = None, resume_hint: str = _RESUME_HINT) -> DistillResult | None:
    """`mctool distill`: settings from the preset, the buffer and the options; the data; the
    loop (under torchrun, one trajectory per process per iteration); the pictures. Under
    torchrun only rank 0 returns the result (the others None). `prepared`: the buffer's data,
    already prepared on this device (--tune's); `continuation`, `resume_hint`: see `run_prepared`."""
    from mctool.core.device import resolve_device
    from mctool.plots import synset_picture, synset_png_path
    from mctool.data.prepared import prepare_like

    if name is not None:
        check_synset_name(name)
    probe = resolve_config(preset, overrides)  # bad settings fail before any file is opened
    stored = None
    if resume:
        derived = synset_name(probe)
        taken = resume_name(out, name, derived)
        if name is None and taken != derived:
            reporter.log(f"--resume: {store.shown(out)} holds no synset '{derived}'; continuing its only synset "
                         f"'{taken}' with its stored settings")
            name = taken
        stored = stored_config(out, name or derived)
    if not buffer.exists():
        raise UsageError(missing_buffer_hint(buffer, probe.dataset, default_buffer))
    if dist.writes_output():  # rank 0 may already hold `out` for its run while another rank gets here
        store.check_writable(out)
    with store.open_buffer(buffer) as buf:
        cfg = resolve_config(preset, overrides, buf, stored)
        check_buffer_matches(cfg, buf)
        if cfg.method == "mct":
            buf.convex_experts()  # a buffer without /convex fails here, before the data is prepared
        dev = resolve_device(device)
        # Every epoch setting against K, and every size the run would allocate against this device's
        # memory, before the data is loaded or anything is allocated.
        shape = sizes.shape_of_buffer(cfg, buf)
        sizes.check_epochs(cfg, shape.epochs)
        sizes.check_sizes(cfg, shape, dev, given={k for k, v in overrides.items() if v is not None})
        dist.init_from_env(dev)
        if not dist.is_main():
            reporter = Muted(reporter)
        note = None
        if preset is None and stored is None:
            note = buffer_note(buf, cfg, {k for k, v in overrides.items() if v is not None})
            reporter.log(note)
        if prepared is None:
            prepared = prepare_like(buf.data, data_dir, dev, reporter)
        # The writer (rank 0) holds `out` for the whole run: another mctool's write (evaluate storing
        # scores) is refused with one line instead of being erased by the next checkpoint.
        with store.holding(out) if dist.is_main() else contextlib.nullcontext():
            result = run_prepared(cfg, buf, out, prepared, name=name or synset_name(cfg), resume=resume,
                                  reporter=reporter, continuation=continuation, resume_hint=resume_hint)
        if note is not None:
            result.notes.insert(0, note)
        main = dist.is_main()
        dist.shutdown()
    if main:
        with store.open_synsets(out) as sf:
            syn = sf.read(result.synset)
        png = synset_png_path(out, result.synset)
        result.png = str(synset_picture(syn, prepared.meta, prepared.prep, png))
        if syn.best is not None:
            result.png_best = str(synset_picture(syn, prepared.meta, prepared.prep,
                                                 png.with_name(f"{png.stem}-best.png"), best=True))
    return result if main else None
