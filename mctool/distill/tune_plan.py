"""`--tune`'s plan: which candidates and horizons fit the budget (successive halving in two
brackets, the winner alone after them), from the measured costs of an iteration and an evaluation."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

MIN_HORIZON = 4  # the first rung's horizon, at least (fewer when the full run is shorter)
TOP_FRACTION = 0.25  # the survivors should reach this share of the full run when the budget allows
LR_DECADES = (1.0, 0.1, 10.0, 0.01, 100.0)  # the base first: the probe is its first iterations
LR_DECADES_SMALL = (1.0, 0.1, 10.0)
NEIGHBOURS = ("max_start_epoch", "syn_steps", "expert_epochs", "lr_img")  # bracket 2's pairs, by priority


@dataclass(frozen=True)
class Plan:
    """What fits the budget: the brackets' candidates, their horizons, the winner's own."""

    lr_factors: tuple[float, ...]  # bracket 1 (the base's × 1 included)
    neighbours: tuple[str, ...]  # bracket 2: × ½ and × 2 of each (lr_img: × 0.3 and × 3)
    horizons: tuple[int, ...]  # the brackets' rungs: h, 2h, 4h, … (at most the full run)
    extension: tuple[int, ...]  # the winner's further horizons, alone
    estimate_s: float  # the plan's estimated seconds
    fits: bool  # False: even the smallest search is estimated over the budget
    dropped: tuple[str, ...] = ()
    reserve_s: float = 0.0  # kept out of the search for the final run (its predicted time after `top`)

    @property
    def top(self) -> int:
        """The last horizon the winner is scored at."""
        return (self.extension or self.horizons)[-1]


def _survivors(n: int, rung: int) -> int:
    """Candidates still running at rung `rung` (0 = all n): the better half each time."""
    return max(1, math.ceil(n / 2**rung))


def _bracket_cost(n: int, horizons: tuple[int, ...]) -> tuple[float, int]:
    """(iterations, evaluations) of one bracket of `n` candidates, each survivor continuing from
    the previous horizon."""
    iterations, evals, prev = 0.0, 0, 0
    for k, h in enumerate(horizons):
        s = _survivors(n, k)
        iterations, evals, prev = iterations + s * (h - prev), evals + s, h
    return iterations, evals


def _horizons(first: int, rungs: int, full: int) -> tuple[int, ...]:
    return tuple(sorted({min(first * 2**k, full) for k in range(rungs)}))


def _cost(n1: int, n2: int, horizons: tuple[int, ...], extension: tuple[int, ...], t_iteration: float,
          t_eval: float) -> float:
    it1, ev1 = _bracket_cost(n1, horizons)
    it2, ev2 = _bracket_cost(n2, horizons) if n2 > 1 else (0.0, 0)
    if n2 > 1:  # the first bracket's winner is in the second: its part is done
        it_w, ev_w = _bracket_cost(1, horizons)
        it2, ev2 = it2 - it_w, ev2 - ev_w
    it3 = (extension[-1] - horizons[-1]) if extension else 0
    return (it1 + it2 + it3) * t_iteration + (ev1 + ev2 + len(extension)) * t_eval


def plan_search(budget_s: float, t_iteration: float, t_eval: float, free: tuple[str, ...], full_iterations: int,
                first: int = 0, final_s: Callable[[int], float] | None = None) -> Plan:
    """The search to run in `budget_s` seconds, given the measured seconds per distillation
    iteration (at the base syn_steps) and per evaluation (network training and the validation
    pass, plus a run's start-up). With `final_s` (the final run's predicted seconds when it
    continues the winner from a given iteration), the search and that run fit together.

    Options, richest first: lr_img at five decades (three when the budget is short), then 4, 3,
    2, 1 or 0 pairs of neighbours. For each, the first horizon h is the largest that fits, for
    each number of doublings the winner then runs alone; the option's horizon is the smallest
    such plan reaching TOP_FRACTION of the full run (else the farthest). Chosen: the richest
    option reaching TOP_FRACTION of the full run; when none does, the richest reaching half the
    farthest horizon any option reaches; when nothing fits, the smallest search (the runtime
    guard then skips what does not fit)."""
    full = max(1, full_iterations)
    h_min = min(MIN_HORIZON, full)
    target = min(full, max(h_min, math.ceil(TOP_FRACTION * full)))
    lr_free = "lr_img" in free
    pairs = tuple(s for s in NEIGHBOURS if s in free)
    options: list[tuple[tuple[float, ...], tuple[str, ...]]] = []
    for lrf in ((LR_DECADES, LR_DECADES_SMALL) if lr_free else ((1.0,),)):
        for p in range(len(pairs), -1, -1):
            options.append((lrf, pairs[:p]))

    def build(lrf: tuple[float, ...], nb: tuple[str, ...], h: int, extra: int) -> Plan:
        n1, n2 = len(lrf), 1 + 2 * len(nb)
        rungs = math.ceil(math.log2(max(n1, n2, 2))) + 1
        horizons = _horizons(h, rungs, full)
        extension = tuple(x for x in (min(horizons[-1] * 2**j, full) for j in range(1, extra + 1))
                          if x > horizons[-1])
        extension = tuple(sorted(set(extension)))
        est = _cost(n1, n2, horizons, extension, t_iteration, t_eval)
        dropped = tuple(f"{s} × ½ and × 2" if s != "lr_img" else "lr_img × 0.3 and × 3" for s in pairs if s not in nb)
        if lr_free and lrf != LR_DECADES:
            dropped = ("lr_img × 0.01 and × 100",) + dropped
        reserve = final_s((extension or horizons)[-1]) if final_s is not None else 0.0
        return Plan(lrf, nb, horizons, extension, est, est + reserve <= budget_s, dropped, reserve)

    def fitted(lrf: tuple[float, ...], nb: tuple[str, ...], extra: int) -> Plan | None:
        """The plan with the largest first horizon that fits (None: not even h_min)."""
        if first:
            p = build(lrf, nb, first, extra)
            return p if p.fits else None
        if not build(lrf, nb, h_min, extra).fits:
            return None
        lo, hi = h_min, full
        while lo < hi:  # the cost grows with h
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if build(lrf, nb, mid, extra).fits else (lo, mid - 1)
        return build(lrf, nb, lo, extra)

    chosen: list[Plan] = []
    for lrf, nb in options:
        best: Plan | None = None
        for extra in range(0, 2 + math.ceil(math.log2(full))):
            p = fitted(lrf, nb, extra)
            if p is None:
                break
            if best is None or p.top > best.top:
                best = p
            if p.top >= target:
                break
        if best is not None:
            chosen.append(best)
    if not chosen:
        lrf, nb = options[-1]
        return build(lrf, nb, first or h_min, 0)
    for p in chosen:
        if p.top >= target:
            return p
    farthest = max(p.top for p in chosen)
    return next(p for p in chosen if 2 * p.top >= farthest)


def describe(plan: Plan) -> str:
    """The plan in words, for the log and the preset's header."""
    lrs = ", ".join(f"× {f:g}" for f in sorted(plan.lr_factors))
    text = f"lr_img {lrs}"
    if plan.neighbours:
        text += ", then " + ", ".join(plan.neighbours) + " around the best"
    text += f"; successive halving at iterations {', '.join(map(str, plan.horizons))}"
    if plan.extension:
        text += f", the winner alone to {', '.join(map(str, plan.extension))}"
    if plan.dropped:
        text += f" (dropped for the budget: {', '.join(plan.dropped)})"
    return text
