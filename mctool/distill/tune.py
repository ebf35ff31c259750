"""`mctool distill --tune`: a search that keeps its budget and sees the run it tunes.

Method: successive halving on learning curves, in two brackets (docs: README, "--tune").

* Every candidate is a distillation from the same seed (the same starting images, experts,
  starts and augmentations), scored at fixed horizons by training `eval_runs` fresh networks
  on its images and measuring them on a validation split held out of the training set, class
  by class; the distillation never sees those images, and nothing here reads the test split.
  Same seeds make the comparison paired: differences are less noisy than the scores.
* The starting images (iteration 0) are a candidate too: scored first, they are the bar every
  distilled set must pass, and the closing notes say when none did.
* Bracket 1, lr_img by decades (× 0.01 … × 100 around the preset's or the buffer's value):
  all run to the first horizon h and are scored; the better half continues to 2h, and so on
  (h, 2h, 4h, …) until one survives. A candidate is continued, not restarted: it resumes its
  own checkpoint, so its scores at the horizons form its learning curve.
* Bracket 2, around the winner: max_start_epoch, syn_steps and expert_epochs × ½ and × 2, then
  lr_img × 0.3 and × 3, halved the same way at the same horizons (the winner's scores there
  are reused). Then the winner runs on alone, doubling its horizon, to read its curve further.
* The budget is hard: a probe measures this machine first (a few iterations of the first
  candidate, timed after the first one, and the starting images' evaluation: seconds per
  iteration and per evaluation, measured, never assumed), the plan is fitted to what is left
  (the brackets' sizes, h, how far the winner runs alone: the richest search whose survivors
  reach a quarter of the full run, or the richest reaching at least half the horizon the budget
  allows at all), work whose estimate would not fit is skipped (and said), and a watchdog stops
  whatever still runs when the budget is spent: the search ends by `--tune-minutes`, give or
  take one evaluation epoch or iteration. Interrupted, it writes the best settings so far.
* The final run (unless --tune-only) continues the winner: the winner's run is a prefix of it
  (the same settings but its length and evaluations, the same seed and validation split, and no
  --eval-every N below the winner's iteration: runner.continuation_problem), so it goes on from
  the winner's checkpoint — the same images, and with --eval-every the same best images, bit for
  bit on the CPU, as starting over — and records the search's scores of the starting images and
  of the winner's images when they were measured its way (the final run's networks the first of
  the search's; else measured again, and it says why); otherwise it starts over, and says why.
  With --eval-share its selection sees the starting images, the winner's and what follows. A final
  run that will hold out another validation split (final_restart) is planned from iteration 0.
  Its predicted time (the iterations left, its evaluations, its start-up: measured costs) is
  kept inside the budget when it is at most a third of it: the plan fits the search and that run
  together, and while each rung runs the longest final run it could end with is held back from
  the search (the watchdog's deadline moves with it). A longer final run comes after the search;
  the plan line says how long. Interrupted, it names the `distill --preset … --resume` command.
* The closing notes name a likely cause from what was measured: the starting images best at
  every horizon (with the experts' accuracy against them: weak experts, or an lr too large
  when the smallest lr tried came closest), a curve still rising at the last horizon (more
  iterations), a curve that peaked and fell (the full run keeps its best images when it selects
  on validation; a smaller lr or fewer iterations), a winner at the end of the lr range.

The winner's settings are written as they were scored (no rescaling): the survivors' horizon
is a real fraction of the full run, and its curve says how the run goes on. The plan's arithmetic
is in tune_plan, the preset file's writing in tune_preset (their names are re-exported here).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mctool import store
from mctool.distill import DistillConfig, check_buffer_matches, run_prepared
from mctool.distill.config import AUTO_SELECT_MIN_ITERATIONS, DEFAULT_EVAL_SHARE
from mctool.distill.tune_result import Candidate, TuneResult  # noqa: F401
from mctool.distill.tune_plan import (LR_DECADES, LR_DECADES_SMALL, MIN_HORIZON, NEIGHBOURS,  # noqa: F401
                                      TOP_FRACTION, Plan, _survivors, describe, plan_search)
from mctool.distill.tune_preset import (PRESET_MARK, check_preset_target, curve_text, default_preset_path,  # noqa: F401
                                        preset_comment, preset_values, write_preset, write_result_preset, _show)
from mctool.distill.runner import (TRAJECTORY_FREE, continuation_problem, continues,  # noqa: F401
                                   selection_every, selection_images, selection_protocol, selection_spacing,
                                   val_split_size)
from mctool.core.errors import Interrupted, TrainingDiverged, UsageError
from mctool.evaluate.evaluation import EvaluateConfig, Evaluation, evaluate_set
from mctool.data.prepared import Prepared, split_validation
from mctool.core.progress import SILENT, Pace, Reporter, duration
from mctool.evaluate.scores import score_text
from mctool.core.settings import above, at_least, first_problem, setting

PROBE_ITERATIONS = 3  # the first candidate's first iterations, timed after the first (warm-up)
PLAN_SHARE = 0.9  # the plan fills this share of the budget left: a busy machine's speed changes
TUNED = ("lr_img", "max_start_epoch", "syn_steps", "expert_epochs")
BUDGET_STOP = -1  # what should_stop() answers once the budget is spent (not a signal number)
FINAL_SHARE = 1 / 3  # the final run's predicted time is kept inside the budget when at most this share of it

_now = time.perf_counter  # the search's clock (tests replace it)


@dataclass(frozen=True)
class TuneConfig:
    """How long and how carefully to search."""

    minutes: float = setting(20.0, "The whole search's budget in minutes, probe and starting images included.",
                             flags=("--tune-minutes",), check=above(0))
    iterations: int = setting(0, "The first rung's horizon in iterations (0 = fitted to the budget).",
                              flags=("--tune-iterations",), check=at_least(0, ">= 0 (0 = fitted to the budget)"))
    eval_runs: int = setting(2, "Networks trained to score each candidate.", flags=("--tune-runs",),
                             check=at_least(1))
    eval_epochs: int = setting(300, "Epochs per scoring network.", flags=("--tune-epochs",), check=at_least(2))
    val_size: int = setting(0, "Validation images (0 = 10 % of the training split, at least 30 per class, at most "
                            "a third).", flags=("--val-size",), check=at_least(0))
    seed: int = setting(0, "Seed of the search.")

    def validate(self) -> None:
        """One usage line for settings that cannot run (each setting's check is declared with it)."""
        found = first_problem(self)
        if found is not None:
            raise UsageError(found.message("{option} must be {words}"))


class _NoLogs(Reporter):
    """Passes progress and stop requests on, drops the inner runs' log lines."""

    def __init__(self, inner: Reporter) -> None:
        self.inner = inner

    def task(self, key: str, description: str, total: int | None) -> None:
        self.inner.task(key, f"tune: {description}", total)

    def update(self, key: str, advance: int = 0, **fields: Any) -> None:
        self.inner.update(key, advance, **fields)

    def done(self, key: str) -> None:
        self.inner.done(key)

    def should_stop(self) -> int:
        return self.inner.should_stop()


class _Budget(_NoLogs):
    """The watchdog: once the deadline has passed, every loop inside is asked to stop
    (BUDGET_STOP); progress lines also show seconds per iteration and the search's time left."""

    def __init__(self, inner: Reporter, deadline: float) -> None:
        super().__init__(inner)
        self.deadline = deadline
        self.expired = False
        self.pace = Pace(window=10, clock=lambda: _now())

    def task(self, key: str, description: str, total: int | None) -> None:
        if key == "distill":
            self.pace.start()
        super().task(key, description, total)

    def update(self, key: str, advance: int = 0, **fields: Any) -> None:
        left = f"search {duration(max(0.0, self.deadline - _now()))} left"
        if key == "distill" and advance > 0 and fields:  # an iteration (a resume's jump has no figures)
            self.pace.step()
            each = self.pace.per_step()
            own = fields.get("time")  # the run's own pace and time left, when it gives them
            fields["time"] = f"{own}; {left}" if own else (f"{each:.3g} s/it, {left}" if each else left)
        elif fields:
            fields["time"] = left
        super().update(key, advance, **fields)

    def should_stop(self) -> int:
        signum = self.inner.should_stop()
        if signum:
            return signum
        if _now() >= self.deadline:
            self.expired = True
            return BUDGET_STOP
        return 0


class _Clock(_NoLogs):
    """Also notes when each step of each task ended, to time steady-state steps (the first step
    of a task pays for warm-up)."""

    def __init__(self, inner: Reporter) -> None:
        super().__init__(inner)
        self.times: dict[str, list[float]] = {}

    def task(self, key: str, description: str, total: int | None) -> None:
        self.times[key] = [_now()]
        self.inner.task(key, description, total)

    def update(self, key: str, advance: int = 0, **fields: Any) -> None:
        if advance > 0 and key in self.times:
            self.times[key].append(_now())
        super().update(key, advance, **fields)

    def steady(self, prefix: str) -> tuple[float | None, float]:
        """(median seconds per step after each task's first, seconds of all steps) of the tasks
        whose key starts with `prefix`."""
        later: list[float] = []
        total = 0.0
        for key, ts in self.times.items():
            if key.startswith(prefix) and len(ts) > 1:
                steps = [b - a for a, b in zip(ts, ts[1:])]
                later += steps[1:]
                total += sum(steps)
        return (statistics.median(later) if later else None), total


def tuning_val_size(num_train: int, classes: int, asked: int = 0) -> int:
    """Validation images for tuning: `asked`, else 10 % of the training split but at least 30 per
    class (a score on fewer moves in steps of several percent), at most a third, at most 5000."""
    if asked:
        return asked
    return min(5000, num_train // 3, max(num_train // 10, 30 * classes))


def split_for_tuning(prepared: Prepared, size: int, seed: int) -> tuple[Prepared, tuple[torch.Tensor, torch.Tensor]]:
    """(data the candidates distil from — the training split minus the validation images, and no
    test split at all —, the validation split they are scored on)."""
    keep, held = split_validation(prepared.train_y, prepared.meta.num_classes, size, seed)
    if held.numel() == 0:
        raise UsageError("--tune needs a validation split, but the training split is too small (see --val-size)")
    dev = prepared.train_x.device
    keep, held = keep.to(dev), held.to(dev)
    empty_x, empty_y = prepared.train_x[:0], prepared.train_y[:0]
    tuning = dataclasses.replace(prepared, train_x=prepared.train_x[keep], train_y=prepared.train_y[keep],
                                 test_x=empty_x, test_y=empty_y)
    return tuning, (prepared.train_x[held], prepared.train_y[held])


# --------------------------------------------------------------------------- the final run


def reuse_problem(measured: EvaluateConfig, wanted: EvaluateConfig, device: torch.device) -> str | None:
    """Why an evaluation measured with `measured` on `device` does not hold, in its first
    `wanted.runs` runs, the one `wanted` would measure on the same images and split (None: it does).
    It does with the same protocol and as many runs, or more runs each trained alone (each seeded by
    its index alone, evaluation.run_seed; stacked networks round differently)."""
    from mctool.training.ensemble import together_by_default

    if wanted.runs > measured.runs:
        return f"it trains {wanted.runs} networks, the search {measured.runs}"
    differ = [f.name for f in dataclasses.fields(EvaluateConfig)
              if f.name != "runs" and getattr(measured, f.name) != getattr(wanted, f.name)]
    if differ:
        return "its networks are trained otherwise (" + ", ".join(
            f"{k} {getattr(wanted, k)}, the search's {getattr(measured, k)}" for k in differ) + ")"
    alone = not (measured.together if measured.together is not None else together_by_default(device))
    if wanted.runs != measured.runs and not alone:
        return (f"the search trained its {measured.runs} networks stacked together, which rounds otherwise than "
                f"{wanted.runs} alone")
    return None


def reusable(measured: EvaluateConfig, wanted: EvaluateConfig, device: torch.device) -> bool:
    """Whether an evaluation measured with `measured` on `device` holds the one `wanted` would
    measure (see `reuse_problem`)."""
    return reuse_problem(measured, wanted, device) is None


def reused_score(ev: Evaluation, wanted: EvaluateConfig, split: str) -> dict[str, Any]:
    """`ev`'s first `wanted.runs` runs as the evaluation `wanted` would have stored (see `reusable`)."""
    accs = ev.accuracies[:wanted.runs]
    return dataclasses.replace(ev, kind="synset", accuracies=accs, mean=statistics.fmean(accs),
                               std=statistics.pstdev(accs), runs=wanted.runs, seeds=ev.seeds[:wanted.runs],
                               config=dataclasses.asdict(wanted), split=split).to_dict()


def final_seconds(final: DistillConfig, start: int, per_iteration: float, per_eval: float, startup: float,
                  reused: bool, every: int | None = None) -> float:
    """The predicted seconds of the final run when it continues the winner from iteration `start`
    (0: it starts over): its start-up, the iterations left, and — when it selects its images — the
    evaluations its loop makes: the starting images' unless `reused` (the search's scores), every
    `every`-th iteration's from `start` on (the final run's spacing, runner.selection_spacing;
    default --eval-every; the winner's own at `start` when N divides it, unless reused) and the end's."""
    left = max(0, final.iterations - start)
    seconds = startup + left * per_iteration
    if final.eval_every > 0 or (final.eval_share > 0 and final.iterations >= AUTO_SELECT_MIN_ITERATIONS):
        every = final.eval_every if every is None else every
        periodic = 0
        if every > 0:  # multiples of N in [max(start, 1), iterations): the end is scored apart
            periodic = (final.iterations - 1) // every - (max(start, 1) - 1) // every
            periodic -= int(reused and start > 0 and start % every == 0)
        seconds += ((0 if reused else 1) + periodic + 1) * per_eval
    return seconds


def final_restart(final: DistillConfig, size: int, num_train: int) -> str | None:
    """Why the final run will start over whatever the winner, for the plan (None: it can continue
    it): it does not distil from the training images the candidates did (runner.run_prepared)."""
    if not final.selecting:
        return "it holds out no validation split (--eval-share 0)"
    if final.lr_backoff > 0:
        return f"--lr-backoff {final.lr_backoff:g} may cut lr_img before the winner's iterations"
    if final.select_on == "test":
        return "it selects on the test split (--select-on test) and holds out no validation split"
    if val_split_size(final, num_train) != size:
        return f"another validation split; give --val-size {size}"
    return None


def _seconds(seconds: float) -> str:
    """A planned duration ('under 1 s' rather than '0 s')."""
    return "under 1 s" if seconds < 0.5 else duration(seconds)


# --------------------------------------------------------------------------- the search


class _Search:
    """The candidates' runs against one buffer, scored on one validation split, within the budget."""

    def __init__(self, base: DistillConfig, buffer: store.Buffer, data: Prepared,
                 val: tuple[torch.Tensor, torch.Tensor], tcfg: TuneConfig, workdir: Path, watch: _Budget,
                 started: float, budget: float, result: TuneResult) -> None:
        self.base, self.buffer, self.data, self.val, self.tcfg = base, buffer, data, val, tcfg
        self.workdir, self.watch, self.inner = workdir, watch, watch
        self.started, self.budget, self.result = started, budget, result
        self.ecfg = EvaluateConfig(runs=tcfg.eval_runs, epochs=tcfg.eval_epochs, seed=tcfg.seed, augment=base.augment)
        self.files: dict[int, Path] = {}
        self.cut = False  # the budget stopped or skipped something
        # Measured costs (refreshed by every run: the machine's load changes).
        self.t_startup = 0.0  # a distillation's fixed cost (experts, network, checkpoint)
        self.t_unit = 0.0  # seconds per iteration per inner step
        self.t_eval = 0.0
        self.evals: dict[tuple[int, int], Evaluation] = {}  # (id of a candidate, iteration) -> its score there
        # The final run kept inside the budget (None: it comes after the search): its predicted
        # seconds when it continues a candidate from an iteration.
        self.final: Callable[[Candidate, int], float] | None = None
        self.leader: Candidate | None = None  # what the search would choose if it stopped now
        self.hold = 0.0  # seconds kept for the final run while the current rung runs
        self.last: Evaluation | None = None  # the last score's whole evaluation
        self.start_eval: Evaluation | None = None  # the starting images'
        self.keep = torch.zeros(0, dtype=torch.long)  # the training indices the candidates distil from

    def keep_for_final(self, alive: list[Candidate], horizon: int) -> None:
        """Before candidates `alive` go on to `horizon`: keep the final run's time out of the search
        — the longest final run the search could then end with: the leader's as it stands (the rung
        may be cut), or any of `alive`'s continued from `horizon` (one of them may lead after it) —
        and move the watchdog's deadline to match."""
        if self.final is None:
            return
        runs = [self.final(c, horizon) for c in alive]
        if self.leader is not None and not (len(alive) == 1 and alive[0] is self.leader):
            runs.append(self.final(self.leader, self.leader.reached))
        self.hold = max(runs, default=0.0)
        self.watch.deadline = self.started + self.budget - self.hold

    def spent(self) -> float:
        return _now() - self.started

    def config(self, values: dict[str, Any], iterations: int) -> DistillConfig:
        """The base settings with `values`, for a short run without periodic evaluations, saved
        only at its end (the next rung resumes from there)."""
        return dataclasses.replace(self.base, **values, iterations=iterations, eval_every=0, eval_share=0.0,
                                   checkpoint_every=iterations + 1, checkpoint_minutes=0.0)

    def file(self, cand: Candidate) -> Path:
        return self.files.setdefault(id(cand), self.workdir / f"candidate-{len(self.files) + 1}.h5")

    def new(self, stage: str, values: dict[str, Any]) -> Candidate:
        """A candidate, listed in the result (unless the same settings are listed already)."""
        for c in self.result.candidates:
            if c.values == values:
                return c
        cand = Candidate(stage=stage, values=dict(values))
        self.result.candidates.append(cand)
        return cand

    def estimate(self, cand: Candidate, horizon: int) -> float:
        steps = (horizon - cand.reached) * cand.values["syn_steps"]
        return self.t_startup + steps * self.t_unit + self.t_eval

    def distil(self, cand: Candidate, horizon: int) -> bool:
        """Run `cand` on to `horizon` iterations (resuming its checkpoint); False when it diverged,
        cannot run, or the budget stopped it (its note says which)."""
        if horizon <= cand.reached:  # the probe's iterations may already have reached it
            return True
        cfg = self.config(cand.values, horizon)
        problem = cfg.problem()
        if problem is None and cfg.max_start_epoch >= _K(self.buffer, cfg):
            problem = ("max_start_epoch", "must be below K")
        if problem is not None:
            cand.note, cand.dead = f"not run: {problem[0]} {problem[1]}", True
            return False
        started = _now()
        try:
            run_prepared(cfg, self.buffer, self.file(cand), self.data, name="tune", resume=cand.reached > 0,
                         reporter=self.inner)
        except TrainingDiverged:
            cand.note, cand.dead = f"diverged before iteration {horizon}", True  # a result, not a failure
            return False
        except UsageError as exc:
            cand.note, cand.dead = f"not run: {exc}", True
            return False
        except Interrupted:
            cand.seconds += _now() - started
            if not self.watch.expired:
                raise
            cand.note, cand.dead, self.cut = f"stopped by the budget before iteration {horizon}", True, True
            return False
        seconds = _now() - started
        cand.seconds += seconds
        steps = (horizon - cand.reached) * cand.values["syn_steps"]
        if steps > 0 and self.t_unit > 0:
            # Keep the start-up cost, rescale the per-step cost to what this run took.
            self.t_unit = max(1e-6, (seconds - self.t_startup) / steps)
        cand.reached = horizon
        return True

    def images(self, cand: Candidate) -> tuple[torch.Tensor, torch.Tensor, float]:
        with store.open_synsets(self.file(cand)) as sf:
            syn = sf.read("tune")
        return syn.images, syn.labels, float(syn.lr)

    def score(self, images: torch.Tensor, labels: torch.Tensor, lr: float, kind: str = "synset") \
            -> tuple[float, float, int, float]:
        """(mean, std, runs, seconds) of networks trained on the images, measured on the validation
        split (the whole evaluation is kept as `self.last`)."""
        started = _now()
        ev = evaluate_set(images, labels, lr, self.data, self.buffer.spec, self.ecfg, kind, self.inner,
                          score_on=self.val, split="validation",
                          stop_hint="tuning stopped; the best settings so far are kept")[0]
        self.last = ev
        return ev.mean, ev.std, ev.runs, _now() - started

    def advance(self, cand: Candidate, horizon: int) -> bool:
        """Distil `cand` to `horizon` and score it there; False when it did not get there (dead,
        or skipped because its estimate does not fit the budget left)."""
        if cand.at(horizon) is not None:
            return True
        if cand.dead:
            return False
        est = self.estimate(cand, horizon)
        if self.spent() + est + self.hold > self.budget:
            self.cut = True
            kept = f", {duration(self.hold)} kept for the final run" if self.hold else ""
            self.result.skipped.append(f"{cand.stage} {_show(cand.values)} to iteration {horizon} (budget: "
                                       f"{duration(self.spent())} of {duration(self.budget)} spent{kept}, "
                                       f"~{duration(est)} needed)")
            if not cand.curve:
                cand.note = "skipped (budget)"
            return False
        if not self.distil(cand, horizon):
            return False
        images, labels, alpha = self.images(cand)
        cand.alpha = alpha
        if not all(math.isfinite(v) for v in (alpha, float(images.abs().max()))):
            cand.note, cand.dead = f"diverged before iteration {horizon}", True
            return False
        try:
            mean, std, runs, seconds = self.score(images, labels, alpha)
        except Interrupted:
            if not self.watch.expired:
                raise
            cand.note, cand.dead, self.cut = f"stopped by the budget while scored at iteration {horizon}", True, True
            return False
        self.t_eval = seconds
        self.evals[(id(cand), horizon)] = self.last
        cand.seconds += seconds
        cand.curve.append({"iteration": horizon, "mean": mean, "std": std, "runs": runs, "alpha": alpha})
        cand.mean, cand.std, cand.runs = mean, std, runs
        shown = score_text(mean, std, runs)
        left = max(0.0, self.budget - self.hold - self.spent())
        self.watch.inner.log(f"tune: {cand.stage}: {_show(cand.values)} at iteration {horizon} → validation "
                             f"{shown} %  [{cand.seconds:.0f} s; search {duration(left)} left]")
        return True

    def halving(self, cands: list[Candidate], horizons: tuple[int, ...]) -> Candidate | None:
        """Successive halving: every candidate to the first horizon, the better half on to the next,
        and so on; the best at the last rung every survivor reached (None: none was scored)."""
        alive = list(cands)
        winner = None
        for k, h in enumerate(horizons):
            alive = alive[:_survivors(len(cands), k)]
            self.keep_for_final(alive, h)
            for c in alive:
                self.advance(c, h)
            complete = not self.cut  # every survivor scored, or dead for a reason of its own
            scored = sorted((c for c in alive if c.at(h) is not None), key=lambda c: -c.at(h)["mean"])
            if not scored:
                break
            if complete or winner is None:
                winner = self.leader = scored[0]
            if not complete:
                break
            alive = scored
        return winner


def _K(buffer: store.Buffer, cfg: DistillConfig) -> int:
    return int(buffer.convex.meta.epochs) if cfg.method == "mct" else int(buffer.require_experts().epochs)


def _lr(v: float) -> float:
    return float(f"{v:.2g}")


def neighbours(best: dict[str, Any], K: int, settings: tuple[str, ...], method: str = "mct") \
        -> list[tuple[str, dict[str, Any]]]:
    """Bracket 2's candidates around `best`: × ½ and × 2 of each setting (max_start_epoch below
    K, whole numbers where the method needs them), lr_img × 0.3 and × 3."""
    out: list[tuple[str, dict[str, Any]]] = []
    for key in settings:
        v = best[key]
        if key == "max_start_epoch":
            values = [round(v / 2, 2), round(min(2 * v if v > 0 else 1.0, K - 1.0), 2)]
        elif key == "syn_steps":
            values = [max(1, v // 2), 2 * v]
        elif key == "expert_epochs":
            values = [v / 2, 2 * v] if method == "mct" else [max(1.0, float(v // 2)), 2.0 * v]
            values = [round(min(x, float(K)), 2) for x in values]
        else:
            values = [_lr(v * 0.3), _lr(v * 3.0)]
        for x in values:
            cand = {**best, key: x}
            if x != v and cand not in [c for _, c in out]:
                out.append((key, cand))
    return out


def diagnose(result: TuneResult, winner: Candidate, reference: float | None, full_iterations: int,
             lr_free: bool) -> list[str]:
    """The closing notes: the likely cause of what the curves show, from what was measured."""
    notes: list[str] = []
    start = result.random_real
    scored = [c for c in result.candidates if c.curve]
    horizons = sorted({p["iteration"] for c in scored for p in c.curve})
    best_at = {h: max(p["mean"] for c in scored for p in c.curve if p["iteration"] == h) for h in horizons}
    curve = winner.curve
    top = curve[-1]["iteration"]

    def margin(a: dict[str, Any], b: dict[str, Any]) -> float:
        """A difference smaller than this is noise: half a point, or the runs' spread."""
        return max(0.005, 0.5 * ((a.get("std") or 0.0) + (b.get("std") or 0.0)))

    if start is not None and best_at and all(v <= start["mean"] for v in best_at.values()):
        per = ", ".join(f"{100 * best_at[h]:.1f} at {h}" for h in horizons)
        lrs = sorted({c.values["lr_img"] for c in scored})
        smallest = min(scored, key=lambda c: c.values["lr_img"])
        if reference is not None and reference <= start["mean"] + 0.02:
            cause = (f"the experts reach {100 * reference:.1f} % (test, whole training set), no better than these "
                     "images: distillation reproduces what the experts learned, so it cannot beat them; train the "
                     "experts longer or with a larger --lr")
        elif lr_free and len(lrs) > 1 and winner.values["lr_img"] == lrs[0] and smallest is winner:
            cause = (f"the smallest lr_img tried ({lrs[0]:g}) came closest: the lr is likely too large — try "
                     f"--lr-img {_lr(lrs[0] / 10):g}")
        elif len(curve) >= 2 and curve[-1]["mean"] - curve[-2]["mean"] > margin(curve[-1], curve[-2]):
            cause = f"the chosen settings' score was still rising at iteration {top}: more iterations may pass them"
        else:
            gap = "" if reference is None else (f" though the experts reach {100 * reference:.1f} % (test), "
                                                f"{100 * (reference - start['mean']):.1f} points above them")
            cause = (f"no setting improved on them within {top} iterations{gap}: the images per class may be too many "
                     "for what the experts' trajectories can add")
        notes.append(f"the starting images (iteration 0) scored best at every horizon: "
                     f"{100 * start['mean']:.1f} % on validation against the best distilled {per} — {cause}")
    if len(curve) >= 2:
        peak = max(curve, key=lambda p: p["mean"])
        last = curve[-1]
        if peak is not last and peak["mean"] - last["mean"] > margin(peak, last):
            notes.append(f"the chosen settings' score peaked at iteration {peak['iteration']} "
                         f"({100 * peak['mean']:.1f} %) and fell to {100 * last['mean']:.1f} % at {top}: a longer run "
                         "would likely fall further — the tuned preset's runs keep their best images on "
                         "validation (its eval_share; --eval-every N scores more often), or run about "
                         f"{peak['iteration']} iterations, or a smaller --lr-img")
        elif last["mean"] - curve[-2]["mean"] > margin(last, curve[-2]):
            more = (f"the full run's {full_iterations} iterations go {full_iterations / top:.3g}× further"
                    if full_iterations > top else "consider more --iterations")
            notes.append(f"the chosen settings' score was still rising at iteration {top} "
                         f"({100 * curve[-2]['mean']:.1f} → {100 * last['mean']:.1f} %): more iterations should help; "
                         f"{more}")
    if start is not None and curve[-1]["mean"] > start["mean"]:
        notes.append(f"the chosen settings score {100 * curve[-1]['mean']:.1f} % at iteration {top}, "
                     f"{100 * (curve[-1]['mean'] - start['mean']):+.1f} points over the starting images "
                     f"({100 * start['mean']:.1f} %)")
    lrs = sorted({c.values["lr_img"] for c in scored})
    if lr_free and len(lrs) >= 3 and winner.values["lr_img"] in (lrs[0], lrs[-1]):
        end = "smallest" if winner.values["lr_img"] == lrs[0] else "largest"
        notes.append(f"the chosen lr_img {winner.values['lr_img']:g} is the {end} that was scored: a better one may "
                     "lie beyond")
    if top < TOP_FRACTION * full_iterations:
        notes.append(f"the search saw {top} of the full run's {full_iterations} iterations "
                     f"({100 * top / full_iterations:.2g} %; the budget allowed no more): what happens later was not "
                     "seen")
    return notes


@dataclass
class Handoff:
    """What the final run may take over from the search (valid while the search's files exist)."""

    file: Path  # the winner's checkpoint (synset "tune")
    config: DistillConfig  # the settings it ran with (iterations: where its checkpoint is)
    keep: torch.Tensor  # the training indices the candidates distilled from (the rest: the validation split)
    val_size: int  # the validation split's size asked (--val-size N holds out the same)
    scores: dict[int, Evaluation]  # its evaluations by iteration; 0: the starting images'
    ecfg: EvaluateConfig  # how they were measured
    what: str  # "candidate 9 (syn_steps: …)"


def tune_prepared(base: DistillConfig, buffer: store.Buffer, prepared: Prepared, tcfg: TuneConfig,
                  fixed: set[str] | frozenset[str] = frozenset(), reporter: Reporter = SILENT,
                  final: DistillConfig | None = None) -> TuneResult:
    """Search the settings not in `fixed` around `base` on `buffer`, within the budget.

    Never reads `prepared`'s test split: candidates distil from the training split minus a
    held-out validation split and are scored there. `final`: the run that follows with the
    winner's settings (its protocol: length, evaluations), whose predicted time is kept inside the
    budget when it is a small part of it (FINAL_SHARE)."""
    with tempfile.TemporaryDirectory(prefix="mctool-tune-") as tmp:
        return _tune(base, buffer, prepared, tcfg, fixed, reporter, final, Path(tmp))[0]


def _tune(base: DistillConfig, buffer: store.Buffer, prepared: Prepared, tcfg: TuneConfig,
          fixed: set[str] | frozenset[str], reporter: Reporter, final: DistillConfig | None,
          workdir: Path, started: float | None = None) -> tuple[TuneResult, Handoff | None]:
    """`tune_prepared`, its candidates' files in `workdir`, its budget counted from `started` (default:
    now); also what the final run may take over."""
    tcfg.validate()
    base.validate()
    check_buffer_matches(base, buffer)
    if base.iterations < 1:
        raise UsageError("--tune needs --iterations >= 1: the length of the run it tunes")
    started = _now() if started is None else started
    budget = 60.0 * tcfg.minutes
    size = tuning_val_size(prepared.train_y.numel(), prepared.meta.num_classes, tcfg.val_size)
    data, val = split_for_tuning(prepared, size, tcfg.seed)
    K = _K(buffer, base)
    free = tuple(s for s in TUNED if s not in fixed)
    base_values = {k: getattr(base, k) for k in TUNED}
    full = base.iterations
    result = TuneResult(buffer=store.shown(buffer.path), dataset=base.dataset or buffer.data.name, ipc=base.ipc,
                        base=dict(base_values), best=dataclasses.asdict(base), best_index=-1, candidates=[],
                        random_real=None, iterations=0, val_images=int(val[1].numel()), budget_s=budget,
                        seconds=0.0, probe={})
    probe_iterations = min(PROBE_ITERATIONS, tcfg.iterations or MIN_HORIZON, full)
    watch = _Budget(reporter, started + budget)
    search = _Search(base, buffer, data, val, tcfg, workdir, watch, started, budget, result)
    search.keep = split_validation(prepared.train_y, prepared.meta.num_classes, size, tcfg.seed)[0]
    try:
        reporter.log(f"tune: measuring this machine ({probe_iterations} iterations of the first candidate, then "
                     f"the starting images scored by {tcfg.eval_runs} × {tcfg.eval_epochs} epochs); budget "
                     f"{tcfg.minutes:g} min, validation split of {result.val_images} training images")
        clock = _Clock(watch)
        search.inner = clock
        first = search.new("lr_img" if "lr_img" in free else "base", base_values)
        t0 = _now()
        if not search.distil(first, probe_iterations) and (watch.expired or first.note.startswith("not run")):
            _raise_probe(first, search, tcfg)
        # The probe's candidate scored the starting draws (--init-draws), which later candidates take
        # from mctool.distill.draws' memo: not a start-up cost every candidate pays.
        t_probe = _now() - t0 - _draw_seconds(search.file(first))
        per_iteration, _ = clock.steady("distill")
        t_iteration = per_iteration if per_iteration is not None else t_probe / probe_iterations
        # The starting images (iteration 0): the bar every candidate must pass, and the
        # measured cost of one evaluation.
        zero = search.workdir / "start.h5"
        run_prepared(search.config(base_values, 0), buffer, zero, data, name="tune", reporter=clock)
        with store.open_synsets(zero) as sf:
            syn = sf.read("tune")
        try:
            mean, std, runs, t_eval = search.score(syn.images, syn.labels, float(syn.lr), kind="starting images")
        except Interrupted:
            if not watch.expired:
                raise
            raise UsageError(f"--tune-minutes {tcfg.minutes:g}: the budget ran out while scoring the starting "
                             f"images ({tcfg.eval_runs} networks × {tcfg.eval_epochs} epochs); raise "
                             "--tune-minutes or lower --tune-epochs / --tune-runs") from None
        search.inner = watch
        search.start_eval = search.last
        result.random_real = {"mean": mean, "std": std, "runs": runs, "lr": float(syn.lr), "iteration": 0}
        reporter.log(f"tune: the starting images (iteration 0, ipc {base.ipc}) → validation "
                     f"{score_text(mean, std, runs)} %")
        search.t_startup = max(0.0, t_probe - probe_iterations * t_iteration)
        search.t_unit = t_iteration / max(1, base.syn_steps)
        search.t_eval = t_eval
        result.probe = {"seconds_per_iteration": t_iteration, "seconds_per_evaluation": t_eval,
                        "seconds_startup": search.t_startup, "syn_steps": float(base.syn_steps)}
        left = budget - search.spent()
        plan = plan_search(PLAN_SHARE * left, t_iteration, t_eval + search.t_startup, free, full, tcfg.iterations)
        final_line = ""
        if final is not None:
            # The final run continues the winner (runner.Continuation) when it can: after the search
            # it runs the iterations the winner did not, and its evaluations (the search's scores
            # reused when its protocol is the search's); else it starts over. Kept inside the budget
            # when that is a small part of it.
            restart = final_restart(final, size, prepared.train_y.numel())
            # The final run's spacing of evaluations, with the winner's settings (syn_steps changes it).
            val_images, synthetic = selection_images(final, prepared), final.ipc * prepared.meta.num_classes

            def spacing(values: dict[str, Any]) -> int:
                return selection_spacing(dataclasses.replace(final, **values), synthetic, val_images)
            every = spacing({})
            reuse = restart is None and reusable(search.ecfg, selection_protocol(final), prepared.train_x.device)
            per_eval = t_eval * final.eval_runs * final.eval_epochs / (tcfg.eval_runs * tcfg.eval_epochs)

            def start_at(at: int, every: int = every) -> int:
                """Where the final run starts when the winner reached `at` (runner.continuation_problem)."""
                return 0 if restart is not None or 1 <= every < at else at

            def final_time(cand: Candidate, at: int) -> float:
                per_iteration = search.t_unit * cand.values["syn_steps"]
                its = spacing(cand.values)
                start = start_at(at, its)
                return final_seconds(dataclasses.replace(final, **cand.values), start, per_iteration, per_eval,
                                     search.t_startup, reuse and start > 0, its)

            def final_top(top: int) -> float:
                start = start_at(top)
                return final_seconds(final, start, t_iteration, per_eval, search.t_startup, reuse and start > 0,
                                     every)

            predicted = final_top(plan.top)
            kept = plan_search(PLAN_SHARE * left, t_iteration, t_eval + search.t_startup, free, full, tcfg.iterations,
                               final_top)
            if kept.fits and kept.reserve_s <= FINAL_SHARE * left:
                plan = kept
                search.final = final_time

            def what(top: int) -> str:
                if start_at(top) > 0 and top >= full:
                    return f"no iteration: the winner's {top} are the whole run; its evaluations"
                if start_at(top) > 0:
                    return f"{full - top} iteration(s) after the winner's {top}, and its evaluations"
                how = (f"--eval-every {every}" if final.eval_every
                       else f"evaluating every {every} iterations (--eval-share)")
                why = restart or f"{how} scores iterations before the winner's {top}"
                return f"all {full} iterations and its evaluations: the final run will start over: {why}"

            if search.final is not None:
                final_line = f", {_seconds(plan.reserve_s)} of it kept for the final run ({what(plan.top)})"
            else:
                final_line = (f"; the final run then takes about {_seconds(predicted)} more ({what(plan.top)}): too "
                              "long to fit the budget")
        result.plan = {"lr_factors": list(plan.lr_factors), "neighbours": list(plan.neighbours),
                       "horizons": list(plan.horizons), "extension": list(plan.extension),
                       "estimate_s": plan.estimate_s, "dropped": list(plan.dropped), "reserve_s": plan.reserve_s}
        result.skipped += [f"{d} (budget)" for d in plan.dropped]
        if not plan.fits:
            result.notes.append(f"the budget is too small even for the smallest search (estimated "
                                f"{plan.estimate_s / 60:.1f} min of {left / 60:.1f} left): what does not fit is "
                                "skipped")
        reporter.log(f"tune: {t_iteration:.3g} s per iteration, {t_eval:.3g} s per evaluation → " + describe(plan)
                     + f"; about {duration(plan.estimate_s)} of {duration(left)} left" + final_line)

        bracket1 = [first] + [search.new("lr_img", {**base_values, "lr_img": _lr(base.lr_img * f)})
                              for f in plan.lr_factors if f != 1.0]
        winner = search.halving(bracket1, plan.horizons)
        if winner is not None and plan.neighbours:
            around = [search.new(stage, values)
                      for stage, values in neighbours(winner.values, K, plan.neighbours, base.method)]
            winner = search.halving([winner] + around, plan.horizons) or winner
        if winner is not None:
            search.leader = winner
            for h in plan.extension:
                search.keep_for_final([winner], h)
                if not search.advance(winner, h):
                    break
    except Interrupted as exc:
        chosen = _best_so_far(result)
        result.notes.append("interrupted: the best settings found so far")
        if chosen is not None:
            _finish(result, chosen, base, buffer, "lr_img" in free)
        result.seconds = search.spent()
        raise TuneInterrupted(result, exc.signum) from None
    result.horizons = sorted({p["iteration"] for c in result.candidates for p in c.curve})
    if winner is None:
        dead = "; ".join(f"{_show(c.values)}: {c.note}" for c in result.candidates if c.note)
        raise UsageError("--tune: no candidate could be scored within the budget" + (f" ({dead})" if dead else "")
                         + "; raise --tune-minutes, or try a smaller --lr-img if they diverged")
    _finish(result, winner, base, buffer, "lr_img" in free)
    result.seconds = _now() - started
    handoff = None
    if winner.reached > 0 and not winner.note.startswith(("diverged", "not run")):
        scores = {h: search.evals[(id(winner), h)] for h in range(winner.reached + 1)
                  if (id(winner), h) in search.evals}
        if search.start_eval is not None:
            scores[0] = search.start_eval
        index = result.candidates.index(winner) + 1
        handoff = Handoff(file=search.file(winner), config=search.config(winner.values, winner.reached),
                          keep=search.keep, val_size=size, scores=scores, ecfg=search.ecfg,
                          what=f"candidate {index} of the search ({winner.stage}: {_show(winner.values)})")
    return result, handoff


def _draw_seconds(path: Path) -> float:
    """How long the run in `path` took to score its starting draws (0: one draw, or no run)."""
    if not path.exists():
        return 0.0
    with store.open_synsets(path) as sf:
        if "tune" not in sf.names:
            return 0.0
        syn = sf.read("tune", checkpoint=True)
    record = syn.checkpoint.run.get("init_draws", {}) if syn.checkpoint is not None else {}
    return float(record.get("seconds", 0.0))


def _raise_probe(first: Candidate, search: _Search, tcfg: TuneConfig) -> None:
    """The probe could not run: say why in one line."""
    if search.watch.expired:
        raise UsageError(f"--tune-minutes {tcfg.minutes:g}: the budget ran out while measuring this machine; raise "
                         "--tune-minutes")
    raise UsageError(f"--tune: the settings searched around cannot run: {first.note}")


def _best_so_far(result: TuneResult) -> Candidate | None:
    """The best of the candidates scored at the farthest horizon any reached (an interrupted search)."""
    scored = [c for c in result.candidates if c.curve]
    if not scored:
        return None
    far = max(c.curve[-1]["iteration"] for c in scored)
    return max((c for c in scored if c.at(far) is not None), key=lambda c: c.at(far)["mean"])


def _finish(result: TuneResult, winner: Candidate, base: DistillConfig, buffer: store.Buffer, lr_free: bool) -> None:
    result.best_index = result.candidates.index(winner)
    result.iterations = winner.curve[-1]["iteration"] if winner.curve else 0
    result.best = dataclasses.asdict(dataclasses.replace(base, **winner.values))
    ref = buffer.reference()
    result.notes += diagnose(result, winner, ref.mean if ref is not None else None, base.iterations, lr_free)


class TuneInterrupted(Interrupted):
    """The search was stopped; `result` holds what it found so far."""

    def __init__(self, result: TuneResult, signum: int) -> None:
        super().__init__("interrupted while tuning", signum)
        self.result = result


@dataclass
class TuneRun:
    """`mctool distill --tune`: the search, and the distillation with its winner (unless --tune-only)."""

    tune: TuneResult
    distill: Any = None  # DistillResult


def run(preset: str | None, overrides: dict[str, Any], buffer: Path, out: Path, tcfg: TuneConfig,
        tune_out: Path | None = None, tune_only: bool = False, name: str | None = None, data_dir: Path | None = None,
        device: str = "auto", default_buffer: bool = False, reporter: Reporter = SILENT) -> TuneRun:
    """Tune on `buffer`, write the winner as a preset file, then distil with it into `out`."""
    from mctool import distill
    from mctool.core import distributed as dist
    from mctool.core.device import resolve_device
    from mctool.data.prepared import prepare_like

    begun = _now()  # the budget counts from here: opening the buffer and preparing the data are part of it
    if dist.world_size() > 1:
        raise UsageError("--tune runs in one process: start it without torchrun, then distil with --preset FILE "
                         "under torchrun")
    tcfg.validate()
    probe = distill.resolve_config(preset, overrides)
    if not buffer.exists():
        raise UsageError(distill.missing_buffer_hint(buffer, probe.dataset, default_buffer))
    with tempfile.TemporaryDirectory(prefix="mctool-tune-") as tmp:  # the candidates, until the final run ends
        with store.open_buffer(buffer) as buf:
            cfg = distill.resolve_config(preset, overrides, buf)
            distill.check_buffer_matches(cfg, buf)
            if cfg.method == "mct":
                buf.convex_experts()
            path = tune_out or default_preset_path(out, cfg.dataset or buf.data.name, cfg.ipc)
            check_preset_target(path, (buffer, out) + ((Path(preset),) if preset and Path(preset).exists() else ()))
            given = {k for k, v in overrides.items() if v is not None}
            if "lr_backoff" not in given:
                # lr_img is what the search chooses: its runs and the final run (the preset written) do not
                # cut it, so the final run may continue its winner (runner.continuation_problem).
                cfg = dataclasses.replace(cfg, lr_backoff=0.0)
            if preset is None:
                reporter.log(distill.buffer_note(buf, cfg, given))
            prepared = prepare_like(buf.data, data_dir, resolve_device(device), reporter)
            # The final run's protocol, as the preset written below will give it (for its predicted time).
            final = None if tune_only else dataclasses.replace(
                cfg, eval_share=cfg.eval_share if "eval_share" in given else (cfg.eval_share or DEFAULT_EVAL_SHARE))
            try:
                # --val-size, when given, holds out the same split for the search as for the final run.
                searched = dataclasses.replace(tcfg, seed=cfg.seed, val_size=tcfg.val_size or cfg.val_size)
                result, handoff = _tune(cfg, buf, prepared, searched, set(given), reporter, final, Path(tmp),
                                        begun)
            except TuneInterrupted as exc:
                if exc.result.best_index >= 0:
                    exc.result.preset = str(write_result_preset(exc.result, path))
                    raise Interrupted(f"interrupted while tuning; the best settings so far are in "
                                      f"{store.shown(path)} (use --preset {store.shown(path)})", exc.signum) from None
                raise Interrupted("interrupted while tuning, before any candidate was scored; nothing was written",
                                  exc.signum) from None
        result.preset = str(write_result_preset(result, path))
        reporter.log(f"tune: the winner is in {store.shown(path)}; `mctool distill --preset {store.shown(path)}` "
                     "uses it")
        if tune_only:
            return TuneRun(result)
        with store.open_buffer(buffer) as buf:
            after = distill.resolve_config(str(path), overrides, buf)  # what `distill --preset` resolves
        continuation = continuation_of(handoff, after, prepared.train_x.device, reporter,
                                       selection_every(after, prepared))
        drest = distill.run(str(path), overrides, buffer, out, name, False, data_dir, device, default_buffer,
                            reporter=reporter, prepared=prepared, continuation=continuation,
                            resume_hint=resume_command(path, buffer, out, name, data_dir))
    return TuneRun(result, drest)


def resume_command(preset: Path, buffer: Path, out: Path, name: str | None, data_dir: Path | None) -> str:
    """What resumes --tune's final run once interrupted (`--tune --resume` is refused): the written
    preset (the checkpoint holds the other settings)."""
    extra = (f" --name {name}" if name else "") + (f" --data-dir {store.shown(data_dir)}" if data_dir else "")
    return (f"continue it with `mctool distill --preset {store.shown(preset)} --buffer {store.shown(buffer)} "
            f"-o {store.shown(out)}{extra} --resume`")


def continuation_of(handoff: Handoff | None, final: DistillConfig, device: torch.device,
                    reporter: Reporter = SILENT, every: int | None = None) -> Any:
    """The final run's `runner.Continuation` of the search's winner, with the scores it may reuse
    (why not, said); None — the run starts over, as it is said — when the winner's run is not a
    prefix of it (runner.continuation_problem; `every`: the final run's spacing of evaluations,
    runner.selection_every; `run_prepared` checks the training images too)."""
    from mctool.distill.checkpoint import _load_state
    from mctool.distill.runner import Continuation

    if handoff is None:
        return None
    why = continuation_problem(handoff.config, final, handoff.what, every)
    if why is not None:
        reporter.log(f"tune: the final run starts over: {why}")
        return None
    state = _load_state(handoff.file, "tune", handoff.config)
    wanted = selection_protocol(final)
    scores: dict[int, dict[str, Any]] = {}
    if final.selecting and final.select_on == "validation":
        if (why := reuse_problem(handoff.ecfg, wanted, device)) is None:
            scores = {it: reused_score(ev, wanted, final.select_on) for it, ev in handoff.scores.items()}
        else:
            reporter.log(f"tune: the final run scores its images again, not reusing the search's scores: {why}")
    return Continuation(state=state, config=handoff.config, keep=handoff.keep, val_size=handoff.val_size,
                        scores=scores, what=handoff.what, by="the search")
