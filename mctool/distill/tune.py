"""`mctool distill --tune`: a short, budgeted search over the settings that matter most.

Stages, each around the best so far (method: coordinate search on a coarse log grid):
  1. lr_img × 0.1 and × 10, then one decade further while the best is at an end (at most two
     more), then × 0.3 and × 3 around the best — the setting results depend on most, and the
     one whose right value varies over decades with the image size;
  2. max_start_epoch × ½, 1, 2 (below K);
  3. syn_steps × ½, 1, 2.
Every candidate is a short distillation from the same seed (same images at the start, same
experts, starts and augmentations) scored by training `eval_runs` fresh networks on its images
and measuring them on a validation split held out of the training set, class by class; the
distillation never sees those images, and nothing here reads the test split. Same seeds for
every candidate make the comparison paired: the differences are less noisy than the scores.

The budget is honest: a probe (three distillation iterations and six evaluation epochs,
timed after the first of each) measures this machine first; the iterations per candidate are fitted so the planned
candidates fit the budget (between MIN_ITERATIONS and MAX_ITERATIONS), and whole stages are
dropped — and reported — when even that does not fit. A candidate whose estimated time would
overrun the budget is skipped and reported. The search is cheap enough not to be resumable
(20 minutes by default): interrupted, it writes the best settings found so far.

Short runs favour settings that move fast (a larger lr_img): the winner is the best of a short
horizon, which the notes say.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mctool import store
from mctool.distill import DistillConfig, check_buffer_matches, run_prepared
from mctool.core.errors import Interrupted, TrainingDiverged, UsageError
from mctool.evaluate.evaluation import EvaluateConfig, evaluate_set
from mctool.data.prepared import Prepared, split_validation
from mctool.core.progress import SILENT, Reporter
from mctool.core.settings import above, at_least, first_problem, setting

MIN_ITERATIONS = 20
MAX_ITERATIONS = 200
LR_FACTORS = (0.1, 0.3, 1.0, 3.0, 10.0)
LR_FACTORS_SMALL = (0.1, 1.0, 10.0)
EXTRA_DECADES = 2  # how far the lr stage may walk beyond ×0.1 … ×10 when the best is at an end
TUNED = ("lr_img", "max_start_epoch", "syn_steps")


@dataclass(frozen=True)
class TuneConfig:
    """How long and how carefully to search."""

    minutes: float = setting(20.0, "The whole search's budget in minutes, probe and reference included.",
                             flags=("--tune-minutes",), check=above(0))
    iterations: int = setting(0, "Distillation iterations per candidate (0 = fitted to the budget).",
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


@dataclass
class Candidate:
    """One scored setting."""

    stage: str
    values: dict[str, Any]  # the tuned settings
    mean: float | None = None  # validation accuracy over eval_runs networks
    std: float | None = None
    runs: int = 0
    alpha: float | None = None  # the learned step size at the end of the short run
    seconds: float = 0.0
    note: str = ""


@dataclass
class TuneResult:
    """What the search did and found."""

    buffer: str
    dataset: str
    ipc: int
    base: dict[str, Any]  # the settings searched around
    best: dict[str, Any]  # the winner: every setting of the winning DistillConfig
    best_index: int
    candidates: list[Candidate]
    random_real: dict[str, Any] | None  # validation accuracy of the candidates' starting real images
    iterations: int  # per candidate
    val_images: int
    budget_s: float
    seconds: float
    probe: dict[str, float]
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    preset: str | None = None  # the preset file written


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


class _Clock(_NoLogs):
    """Also notes when each step of each task ended, to time steady-state steps (the first step
    of a task pays for warm-up)."""

    def __init__(self, inner: Reporter) -> None:
        super().__init__(inner)
        self.times: dict[str, list[float]] = {}

    def task(self, key: str, description: str, total: int | None) -> None:
        self.times[key] = [time.perf_counter()]
        super().task(key, description, total)

    def update(self, key: str, advance: int = 0, **fields: Any) -> None:
        if advance > 0 and key in self.times:
            self.times[key].append(time.perf_counter())
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


class _Search:
    """The candidates' runs against one buffer, scored on one validation split."""

    def __init__(self, base: DistillConfig, buffer: store.Buffer, data: Prepared,
                 val: tuple[torch.Tensor, torch.Tensor], tcfg: TuneConfig, workdir: Path, reporter: Reporter) -> None:
        self.base, self.buffer, self.data, self.val, self.tcfg = base, buffer, data, val, tcfg
        self.workdir, self.reporter, self.inner = workdir, reporter, _NoLogs(reporter)
        self.ecfg = EvaluateConfig(runs=tcfg.eval_runs, epochs=tcfg.eval_epochs, seed=tcfg.seed, augment=base.augment)
        self.runs = 0

    def config(self, values: dict[str, Any], iterations: int) -> DistillConfig:
        """The base settings with `values`, for a short run without checkpoints or evaluations."""
        return dataclasses.replace(self.base, **values, iterations=iterations, eval_every=0,
                                   checkpoint_every=iterations + 1, checkpoint_minutes=0.0)

    def distil(self, cfg: DistillConfig) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        """(images, labels, learned step size, seconds) of a short run."""
        self.runs += 1
        out = self.workdir / f"candidate-{self.runs}.h5"
        try:
            result = run_prepared(cfg, self.buffer, out, self.data, name="tune", reporter=self.inner)
            with store.open_synsets(out) as sf:
                syn = sf.read("tune")
        finally:
            out.unlink(missing_ok=True)
        return syn.images, syn.labels, float(result.alpha), result.seconds

    def score(self, images: torch.Tensor, labels: torch.Tensor, lr: float, kind: str = "synset",
              ecfg: EvaluateConfig | None = None) -> tuple[float, float, int, float]:
        """(mean, std, runs, seconds) of networks trained on the images, measured on the validation split."""
        started = time.perf_counter()
        ev = evaluate_set(images, labels, lr, self.data, self.buffer.spec, ecfg or self.ecfg, kind, self.inner,
                          score_on=self.val, split="validation",
                          stop_hint="tuning stopped; the best settings so far are kept")[0]
        return ev.mean, ev.std, ev.runs, time.perf_counter() - started

    def run(self, stage: str, values: dict[str, Any], iterations: int) -> Candidate:
        """Distil and score one candidate."""
        cand = Candidate(stage=stage, values=dict(values))
        started = time.perf_counter()
        cfg = self.config(values, iterations)
        problem = cfg.problem()
        if problem is None and cfg.max_start_epoch >= _K(self.buffer, cfg):
            problem = ("max_start_epoch", "must be below K")
        if problem is not None:
            cand.note = f"not run: {problem[0]} {problem[1]}"
            return cand
        try:
            images, labels, alpha, _ = self.distil(cfg)
        except TrainingDiverged:
            cand.note = "diverged"  # a too-large lr_img: a result of the search, not a failure of it
            cand.seconds = time.perf_counter() - started
            return cand
        cand.alpha = alpha
        if not all(math.isfinite(v) for v in (alpha, float(images.abs().max()))):
            cand.note = "diverged"
        else:
            cand.mean, cand.std, cand.runs, _ = self.score(images, labels, alpha)
        cand.seconds = time.perf_counter() - started
        return cand


def _K(buffer: store.Buffer, cfg: DistillConfig) -> int:
    return int(buffer.convex.meta.epochs) if cfg.method == "mct" else int(buffer.require_experts().epochs)


def _lr(v: float) -> float:
    return float(f"{v:.2g}")


def _grid(stage: str, best: dict[str, Any], K: int, lr_factors: tuple[float, ...]) -> list[dict[str, Any]]:
    """The candidates of one stage around the best values so far."""
    out: list[dict[str, Any]] = []
    if stage == "lr_img":
        for f in lr_factors:
            out.append({**best, "lr_img": float(f"{best['lr_img'] * f:.2g}")})
    elif stage == "max_start_epoch":
        s = best["max_start_epoch"]
        for v in (s / 2, s, min(2 * s if s > 0 else 1.0, K - 1.0)):
            if 0 <= v < K:
                out.append({**best, "max_start_epoch": round(float(v), 2)})
    elif stage == "syn_steps":
        n = best["syn_steps"]
        for v in (max(1, n // 2), n, 2 * n):
            out.append({**best, "syn_steps": int(v)})
    unique: list[dict[str, Any]] = []
    for v in out:
        if v not in unique:
            unique.append(v)
    return unique


@dataclass(frozen=True)
class Plan:
    """What fits the budget: stages, lr factors, iterations per candidate."""

    stages: tuple[str, ...]
    lr_factors: tuple[float, ...]
    iterations: int
    estimate_s: float  # the plan's estimated time
    dropped: tuple[str, ...] = ()


def plan_search(budget_s: float, t_iteration: float, t_eval: float, free: tuple[str, ...],
                iterations: int = 0) -> Plan:
    """The largest search that fits `budget_s` seconds, given the probe's seconds per
    distillation iteration (at the base syn_steps) and per candidate's evaluation.

    Iterations per candidate are fitted first (MAX_ITERATIONS down to MIN_ITERATIONS), then
    stages are dropped from the end (syn_steps, then max_start_epoch), then the lr grid shrinks
    to three values; what cannot fit even then runs at MIN_ITERATIONS and overruns."""
    options: list[tuple[tuple[str, ...], tuple[float, ...]]] = []
    stages = tuple(s for s in TUNED if s in free)
    for cut in range(len(stages), 0, -1):
        options.append((stages[:cut], LR_FACTORS))
    if "lr_img" in stages:
        options.append((("lr_img",), LR_FACTORS_SMALL))
    if not options:
        options.append(((), LR_FACTORS))

    def cost(st: tuple[str, ...], lrf: tuple[float, ...]) -> tuple[float, int]:
        """(iteration units at the base syn_steps, evaluations) of a plan (new candidates only)."""
        units, evals = 1.0, 1  # the base candidate (or the lr stage's ×1), and the random-real reference
        for s in st:
            if s == "lr_img":
                units, evals = units + len(lrf) - 1, evals + len(lrf) - 1
            elif s == "max_start_epoch":
                units, evals = units + 2, evals + 2
            elif s == "syn_steps":
                units, evals = units + 2.5, evals + 2  # ½ N and 2 N
        return units, evals + 1

    for st, lrf in options:
        units, evals = cost(st, lrf)
        if iterations:
            it = iterations
        else:
            it = int((budget_s - evals * t_eval) / max(units * t_iteration, 1e-9))
            it = min(MAX_ITERATIONS, it)
        if it >= MIN_ITERATIONS or iterations:
            dropped = tuple(s for s in stages if s not in st)
            if lrf != LR_FACTORS and "lr_img" in st:
                dropped += ("lr_img × 0.3 and × 3",)
            return Plan(st, lrf, it, units * it * t_iteration + evals * t_eval, dropped)
    st, lrf = options[-1]
    units, evals = cost(st, lrf)
    dropped = tuple(s for s in stages if s not in st)
    if lrf != LR_FACTORS and "lr_img" in st:
        dropped += ("lr_img × 0.3 and × 3",)
    return Plan(st, lrf, MIN_ITERATIONS, units * MIN_ITERATIONS * t_iteration + evals * t_eval, dropped)


def tune_prepared(base: DistillConfig, buffer: store.Buffer, prepared: Prepared, tcfg: TuneConfig,
                  fixed: set[str] | frozenset[str] = frozenset(), reporter: Reporter = SILENT) -> TuneResult:
    """Search the settings not in `fixed` around `base` on `buffer`, within the budget.

    Never reads `prepared`'s test split: candidates distil from the training split minus a
    held-out validation split and are scored there."""
    tcfg.validate()
    base.validate()
    check_buffer_matches(base, buffer)
    started = time.perf_counter()
    budget = 60.0 * tcfg.minutes
    size = tuning_val_size(prepared.train_y.numel(), prepared.meta.num_classes, tcfg.val_size)
    data, val = split_for_tuning(prepared, size, tcfg.seed)
    K = _K(buffer, base)
    free = tuple(s for s in TUNED if s not in fixed)
    best_values = {k: getattr(base, k) for k in TUNED}
    result = TuneResult(buffer=store.shown(buffer.path), dataset=base.dataset or buffer.data.name, ipc=base.ipc,
                        base=dict(best_values), best=dataclasses.asdict(base), best_index=-1, candidates=[],
                        random_real=None, iterations=0, val_images=int(val[1].numel()), budget_s=budget,
                        seconds=0.0, probe={})
    with tempfile.TemporaryDirectory(prefix="mctool-tune-") as tmp:
        search = _Search(base, buffer, data, val, tcfg, Path(tmp), reporter)
        # The probe: three iterations and six evaluation epochs at the base settings, timed after
        # the first of each (which pays for warm-up).
        reporter.log(f"tune: measuring this machine (3 distillation iterations, 6 evaluation epochs); budget "
                     f"{tcfg.minutes:g} min, validation split of {result.val_images} training images")
        clock = _Clock(reporter)
        search.inner = clock
        images, labels, alpha, t_distil = search.distil(search.config(best_values, 3))
        probe_epochs = min(6, tcfg.eval_epochs)
        _, _, _, t_probe_eval = search.score(images, labels, alpha, ecfg=dataclasses.replace(
            search.ecfg, runs=1, epochs=probe_epochs))
        search.inner = _NoLogs(reporter)
        per_iteration, _ = clock.steady("distill")
        per_epoch, epochs_total = clock.steady("eval-")
        t_iteration = per_iteration if per_iteration is not None else t_distil / 3
        t_test = max(0.0, t_probe_eval - epochs_total)  # building the network and the validation pass
        epoch = per_epoch if per_epoch is not None else t_probe_eval / probe_epochs
        t_eval = tcfg.eval_runs * (tcfg.eval_epochs * epoch + t_test)
        result.probe = {"seconds_per_iteration": t_iteration, "seconds_per_evaluation": t_eval,
                        "syn_steps": float(base.syn_steps)}
        left = budget - (time.perf_counter() - started)
        plan = plan_search(left, t_iteration, t_eval, free, tcfg.iterations)
        result.iterations = plan.iterations
        result.skipped += [f"stage {s} (budget)" for s in plan.dropped]
        if plan.estimate_s > left * 1.05:
            result.notes.append(f"the budget is too small even for {plan.iterations} iterations per candidate: "
                                f"estimated {plan.estimate_s / 60:.1f} min")
        reporter.log(f"tune: {t_iteration:.2f} s per iteration, {t_eval:.0f} s per evaluation "
                     f"({tcfg.eval_runs} × {tcfg.eval_epochs} epochs) → {plan.iterations} iterations per candidate, "
                     f"stages {', '.join(plan.stages) or 'none'}"
                     + (f" (dropped: {', '.join(plan.dropped)})" if plan.dropped else "")
                     + f", about {plan.estimate_s / 60:.1f} min")
        done: dict[tuple[Any, ...], Candidate] = {}
        t_unit = t_iteration / max(1, base.syn_steps)  # seconds per iteration per inner step
        correction = [1.0]

        def visit(stage: str, values: dict[str, Any]) -> None:
            key = tuple(values[k] for k in TUNED)
            if key in done:
                return
            # The probe's estimate, corrected by how the last candidate's estimate turned out
            # (the machine's load changes).
            est = (plan.iterations * t_unit * values["syn_steps"] + t_eval) * correction[0]
            spent = time.perf_counter() - started
            if done and spent + est > budget:
                result.skipped.append(f"{stage} candidate {_show(values)} (budget: {spent / 60:.1f} of "
                                      f"{tcfg.minutes:g} min spent, ~{est / 60:.1f} min needed)")
                done[key] = Candidate(stage=stage, values=dict(values), note="skipped (budget)")
                return
            cand = search.run(stage, values, plan.iterations)
            if cand.seconds > 0:
                correction[0] = cand.seconds / (est / correction[0])
            done[key] = cand
            result.candidates.append(cand)
            shown = score_text(cand.mean, cand.std, cand.runs) + " %" if cand.mean is not None else cand.note
            reporter.log(f"tune {len(result.candidates)}: {stage}: {_show(values)} → validation {shown} "
                         f"[{cand.seconds:.0f} s]")

        def best_so_far() -> dict[str, Any]:
            scored = [c for c in result.candidates if c.mean is not None]
            if not scored:
                return best_values
            win = max(scored, key=lambda c: c.mean)  # max keeps the first of equals: the earlier candidate
            result.best_index = result.candidates.index(win)
            return dict(win.values)

        def lr_stage() -> None:
            # Decades first (×0.1, ×10); while the best lies at an end of what was tried, one more
            # decade that way (at most EXTRA_DECADES, budget allowing); then ×0.3 and ×3 around
            # the best when the plan has room for them.
            start = best_so_far()
            for f in (0.1, 10.0):
                visit("lr_img", {**start, "lr_img": _lr(start["lr_img"] * f)})
            for _ in range(EXTRA_DECADES):
                best = best_so_far()
                tried = [c.values["lr_img"] for c in result.candidates if c.mean is not None
                         and all(c.values[k] == best[k] for k in TUNED if k != "lr_img")]
                if best["lr_img"] == min(tried):
                    visit("lr_img", {**best, "lr_img": _lr(best["lr_img"] * 0.1)})
                elif best["lr_img"] == max(tried):
                    visit("lr_img", {**best, "lr_img": _lr(best["lr_img"] * 10.0)})
                else:
                    break
                if best_so_far() == best:
                    break
            if len(plan.lr_factors) > 3:
                best = best_so_far()
                for f in (0.3, 3.0):
                    visit("lr_img", {**best, "lr_img": _lr(best["lr_img"] * f)})

        try:
            visit("base", best_values)
            for stage in plan.stages:
                if stage == "lr_img":
                    lr_stage()
                else:
                    for values in _grid(stage, best_so_far(), K, plan.lr_factors):
                        visit(stage, values)
                best_values = best_so_far()
            best_values = best_so_far()
            win = result.candidates[result.best_index] if result.best_index >= 0 else None
            if win is not None and win.alpha is not None:
                # The reference: the real images every candidate started from (iteration 0),
                # trained with the winner's step size — what distilling them gained.
                rx, ry, _, _ = search.distil(search.config(best_values, 0))
                mean, std, runs, _ = search.score(rx, ry, win.alpha, kind="random-real")
                result.random_real = {"mean": mean, "std": std, "runs": runs, "lr": win.alpha}
                ref = buffer.reference()
                if ref is not None and ref.mean <= mean + 0.02:
                    result.notes.append(
                        f"the experts reach {100 * ref.mean:.1f} % (test, whole training set) — no better than the "
                        f"{base.ipc} real images per class the candidates start from ({100 * mean:.1f} % on "
                        "validation): distillation reproduces what the experts learned, so it cannot beat random "
                        "real images here; train the experts longer or with a larger --lr first")
                if win.mean is not None and win.mean <= mean:
                    result.notes.append(
                        "no candidate beat the real images it started from: distilling from these experts "
                        "gains nothing at this horizon — check the experts (a whole-data accuracy well above "
                        "what random real images reach: more epochs, a larger --lr) or keep random real images")
                reporter.log(f"tune: the starting real images (ipc {base.ipc}) → validation "
                             f"{score_text(mean, std, runs)} %")
        except Interrupted as exc:
            best_values = best_so_far()
            result.notes.append("interrupted: the best settings found so far")
            result.best = _full_run(base, best_values, plan.iterations, fixed, result.notes)
            result.seconds = time.perf_counter() - started
            raise TuneInterrupted(result, exc.signum) from None
    if result.best_index < 0:
        raise UsageError("--tune: no candidate could be scored (every run diverged or was invalid); try "
                         "--lr-img smaller than " + f"{base.lr_img:g}")
    result.best = _full_run(base, best_values, plan.iterations, fixed, result.notes)
    result.seconds = time.perf_counter() - started
    return result


def horizon_scale(candidate_iterations: int, iterations: int) -> float:
    """The factor from a candidate's lr_img (and lr_lr) to the full run's: candidate iterations /
    full iterations, at most 1.

    In the gradient-flow view an image's path depends on lr × iterations (its "time"), so short
    candidates favour large steps: the winner is the best point at time lr_c × N_c. The full run
    covers that same time in more, smaller steps — reaching the point that was validated, with
    the stochastic matching averaged over more experts and starts, instead of running N / N_c
    times further along the path than anything scored (on Fashion-MNIST, bench/README.md, the
    unscaled winner of a 20-iteration search is 10× the preset's lr_img)."""
    if candidate_iterations <= 0 or iterations <= candidate_iterations:
        return 1.0
    return candidate_iterations / iterations


def _full_run(base: DistillConfig, values: dict[str, Any], candidate_iterations: int, fixed: set[str] | frozenset[str],
              notes: list[str]) -> dict[str, Any]:
    """The winner as settings of the full run: `horizon_scale` applied to the step sizes the
    search chose (not to ones an option fixed), said in a note."""
    out = dict(values)
    f = horizon_scale(candidate_iterations, base.iterations)
    if f < 1.0 and "lr_img" not in fixed:
        out["lr_img"] = _lr(values["lr_img"] * f)
        lr_lr = base.lr_lr if "lr_lr" in fixed else _lr(base.lr_lr * f)
        out["lr_lr"] = lr_lr
        notes.append(f"scored after {candidate_iterations} iterations per candidate; for the full run's "
                     f"{base.iterations} iterations lr_img {values['lr_img']:g} → {out['lr_img']:g} and lr_lr "
                     f"{base.lr_lr:g} → {lr_lr:g} (× {candidate_iterations}/{base.iterations}: the same lr × "
                     "iterations, so the full run reaches the point that was scored instead of overshooting it)")
    return dataclasses.asdict(dataclasses.replace(base, **out))


class TuneInterrupted(Interrupted):
    """The search was stopped; `result` holds what it found so far."""

    def __init__(self, result: TuneResult, signum: int) -> None:
        super().__init__("interrupted while tuning", signum)
        self.result = result


def score_text(mean: float, std: float | None, runs: int) -> str:
    """'74.10 ± 0.52' in percent; one run has no spread: '74.10 (n = 1)'."""
    if runs <= 1 or std is None:
        return f"{100 * mean:.2f} (n = {runs})"
    return f"{100 * mean:.2f} ± {100 * std:.2f} (n = {runs})"


def _show(values: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())


def preset_values(result: TuneResult) -> dict[str, Any]:
    """The winner as preset keys (the settings a preset may hold)."""
    from mctool.distill import preset_schema

    keys = preset_schema().all_keys()
    return {k: v for k, v in result.best.items() if k in keys and v is not None}


def preset_comment(result: TuneResult) -> str:
    """The header of the written preset: how it was found, on what, with which scores."""
    lines = [f"Found by `mctool distill --tune` on {result.buffer} ({result.dataset}, ipc {result.ipc}), "
             f"{store.now_iso()}.",
             f"Search: lr_img, then max_start_epoch, then syn_steps around the buffer's settings; "
             f"{result.iterations} distillation iterations per candidate, each scored by {_runs(result)} networks "
             f"on {result.val_images} validation images held out of the training split (never the test split).",
             f"Budget {result.budget_s / 60:g} min, used {result.seconds / 60:.1f} min.",
             "", "validation accuracy (%) per candidate:"]
    for i, c in enumerate(result.candidates):
        score = score_text(c.mean, c.std, c.runs) if c.mean is not None else c.note
        mark = "  <- chosen" if i == result.best_index else ""
        lines.append(f"  {c.stage:16s} {_show(c.values):60s} {score}{mark}")
    if result.random_real is not None:
        rr = result.random_real
        lines.append(f"  {'random real':16s} {'(the starting images, same protocol)':60s} "
                     f"{score_text(rr['mean'], rr['std'], rr['runs'])}")
    for s in result.skipped:
        lines.append(f"skipped: {s}")
    for n in result.notes:
        lines.append(f"note: {n}")
    return "\n".join(lines)


def _runs(result: TuneResult) -> int:
    return max((c.runs for c in result.candidates), default=0)


def write_result_preset(result: TuneResult, path: Path) -> Path:
    """Write the winner as a preset file `--preset PATH` reads back; a folder: dataset inside
    the preset's folder is written relative to it (the two can move together)."""
    from mctool.distill import preset_schema
    from mctool.presets import write_preset

    values = preset_values(result)
    values["source"] = "tuned"
    values["description"] = f"mctool distill --tune on {result.buffer}"
    ds = values.get("dataset", "")
    if isinstance(ds, str) and ds.lower().startswith("folder:"):
        target = Path(ds[len("folder:"):])
        here = path.expanduser().resolve().parent
        try:
            rel = target.relative_to(here)
            values["dataset"] = f"folder:{rel.as_posix() or '.'}"
        except ValueError:
            values["dataset"] = f"folder:{target}"
    order = ["source", "description", "dataset", "ipc"]
    ordered = {k: values[k] for k in order if k in values}
    ordered.update({k: v for k, v in values.items() if k not in ordered})
    return write_preset(path, ordered, preset_comment(result), preset_schema())


@dataclass
class TuneRun:
    """`mctool distill --tune`: the search, and the distillation with its winner (unless --tune-only)."""

    tune: TuneResult
    distill: Any = None  # DistillResult


def default_preset_path(out: Path, dataset: str, ipc: int) -> Path:
    """tuned-DATASET-ipcN.toml beside the synset file (a folder dataset: its folder's name)."""
    name = Path(dataset[len("folder:"):]).name if dataset.lower().startswith("folder:") else dataset
    slug = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in name) or "dataset"
    return out.parent / f"tuned-{slug}-ipc{ipc}.toml"


def run(preset: str | None, overrides: dict[str, Any], buffer: Path, out: Path, tcfg: TuneConfig,
        tune_out: Path | None = None, tune_only: bool = False, name: str | None = None, data_dir: Path | None = None,
        device: str = "auto", default_buffer: bool = False, reporter: Reporter = SILENT) -> TuneRun:
    """Tune on `buffer`, write the winner as a preset file, then distil with it into `out`."""
    from mctool import distill
    from mctool.core import distributed as dist
    from mctool.core.device import resolve_device
    from mctool.data.prepared import prepare_like

    if dist.world_size() > 1:
        raise UsageError("--tune runs in one process: start it without torchrun, then distil with --preset FILE "
                         "under torchrun")
    tcfg.validate()
    probe = distill.resolve_config(preset, overrides)
    if not buffer.exists():
        raise UsageError(distill.missing_buffer_hint(buffer, probe.dataset, default_buffer))
    with store.open_buffer(buffer) as buf:
        cfg = distill.resolve_config(preset, overrides, buf)
        distill.check_buffer_matches(cfg, buf)
        if cfg.method == "mct":
            buf.convex_experts()
        path = tune_out or default_preset_path(out, cfg.dataset or buf.data.name, cfg.ipc)
        if path.exists() and path.is_dir():
            raise UsageError(f"--tune-out {path}: is a folder; name a .toml file")
        given = {k for k, v in overrides.items() if v is not None}
        if preset is None:
            reporter.log(distill.buffer_note(buf, cfg, given))
        prepared = prepare_like(buf.data, data_dir, resolve_device(device), reporter)
        try:
            result = tune_prepared(cfg, buf, prepared, dataclasses.replace(tcfg, seed=cfg.seed), set(given), reporter)
        except TuneInterrupted as exc:
            if exc.result.best_index >= 0:
                exc.result.preset = str(write_result_preset(exc.result, path))
                raise Interrupted(f"interrupted while tuning; the best settings so far are in {store.shown(path)} "
                                  f"(use --preset {store.shown(path)})", exc.signum) from None
            raise Interrupted("interrupted while tuning, before any candidate was scored; nothing was written",
                              exc.signum) from None
    result.preset = str(write_result_preset(result, path))
    reporter.log(f"tune: the winner is in {store.shown(path)}; `mctool distill --preset {store.shown(path)}` uses it")
    if tune_only:
        return TuneRun(result)
    drest = distill.run(str(path), overrides, buffer, out, name, False, data_dir, device, default_buffer,
                        reporter=reporter)
    return TuneRun(result, drest)
