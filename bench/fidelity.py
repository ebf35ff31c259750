"""Accuracy benchmark on real Fashion-MNIST at ipc 1, 10 and 50 (issue 17), staged and resumable.

    python bench/fidelity.py --quick          # checks the benchmark itself: <= 20 min on an idle 2-core CPU
    python bench/fidelity.py                  # the default size: <= 2.5 h on an idle 2-core CPU
    python bench/fidelity.py --size gpu       # --width 128 --experts 100 --epochs 50, the paper's iterations

Pipeline (every step is one `python -m mctool ... --json --quiet` call, see bench/_stages.py):
experts -> convexify -> distill at ipc 1, 10, 50 -> evaluate each synthetic set and random real images
on the same protocol and seeds (5 fresh networks x 1000 epochs at the default size) -> ablation rows
at ipc 10 on the same experts (shorter distillations, >= 3 networks) -> one table, printed and
written as JSON. Products and a manifest live in --work; rerunning the same command reuses what is
finished, continues what was interrupted (Ctrl-C / SIGTERM stop the running mctool command cleanly)
and reruns what a changed setting affects. Run it with OMP_NUM_THREADS=1 on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _stages import (INTERRUPTED_EXIT, Lock, Pipeline, Runner, Stage, SubprocessRunner,  # noqa: E402
                     WorkBusy, loadavg, now, write_json)

REPO = Path(__file__).resolve().parent.parent
IPCS = (1, 10, 50)
SEED = "0"


@dataclass(frozen=True)
class Size:
    """How big each stage is; the named sizes are in SIZES."""

    name: str
    width: int
    experts: int
    epochs: int
    iterations: dict[int, int]  # per ipc
    eval_runs: int
    eval_epochs: int
    abl_iterations: int
    abl_eval_runs: int
    abl_eval_epochs: int
    abl_ipc: int = 10
    abl_eval_every: int = 100  # periodic evaluation of the best-on-validation row
    dataset: str = "fashion-mnist"
    preset: str | None = "fashion-mnist-ipc{ipc}"  # None: mctool's built-in defaults plus --ipc
    distill_args: tuple[str, ...] = ()  # extra distill options (after the preset)
    ablation: bool = True
    why: str = ""
    levers: tuple[str, ...] = ()  # lever rows (LEVERS), each at every lever_ipcs, beside the "mct" reference
    lever_ipcs: tuple[int, ...] = ()  # default: (abl_ipc,)
    lever_iterations: int = 0  # default: abl_iterations


SIZES: dict[str, Size] = {
    # Checks the benchmark itself, not the method: every stage and row runs, at toy scale
    # (58 min measured under load 5-12 with OMP_NUM_THREADS=1; ~12-15 min idle, bench/README.md).
    "quick": Size("quick", width=16, experts=2, epochs=4, iterations={1: 50, 10: 50, 50: 10},
                  eval_runs=2, eval_epochs=300, abl_iterations=20, abl_eval_runs=2, abl_eval_epochs=100,
                  abl_eval_every=10, why="checks the benchmark: <= 20 min on an idle 2-core CPU"),
    # The largest size whose main pipeline fits 2.5 h on an idle 2-core CPU (bench/README.md, "Sizes"):
    # experts ~30 min, distillation ~60 min (idle estimates 0.2 / 2 / 15 s per iteration at
    # ipc 1 / 10 / 50), evaluation 5 x 1000 epochs ~32 min; each ablation row <= 10 min of distillation.
    "default": Size("default", width=32, experts=8, epochs=12, iterations={1: 1000, 10: 800, 50: 120},
                    eval_runs=5, eval_epochs=1000, abl_iterations=250, abl_eval_runs=5, abl_eval_epochs=500,
                    abl_eval_every=50, why="largest main pipeline within 2.5 h on an idle 2-core CPU"),
    # The paper's scale: experts of width 128 x 50 epochs, 5000 iterations (Table A's MTT/MCT default).
    "gpu": Size("gpu", width=128, experts=100, epochs=50, iterations={1: 5000, 10: 5000, 50: 5000},
                eval_runs=5, eval_epochs=1000, abl_iterations=1000, abl_eval_runs=5, abl_eval_epochs=1000,
                abl_eval_every=100, why="the paper's scale; estimated 3-5 h on one H100-class GPU (not measured)"),
}

# Options of the newer features the rows use (in one place; a row whose option `mctool --help`
# does not list reports "not available in this mctool").
PENDING = {
    "step_units": ("--step-units", {"released": "released", "exact": "exact"}),  # distill: step units
    "select_on": ("--select-on", "validation"),  # distill: pick the best images on a validation split
    "evaluate_best": ("--images", "best"),  # evaluate: the best images rather than the final ones
}

# The ablation: the reference setting, and one row per (factor, value) that varies one factor.
# Rows with equal settings share their stages (e.g. "--grad constant" *is* the reference).
REFERENCE: dict[str, Any] = {"grad": "constant", "units": "released", "images": "final", "start": "continuous",
                             "interior": 2, "beta": "mct"}
ROWS: list[tuple[str, Any]] = [
    ("grad", "constant"), ("grad", "adjoint"),
    ("units", "released"), ("units", "exact"),
    ("images", "final"), ("images", "best"),
    ("start", "continuous"), ("start", "discrete"),
    ("interior", 0), ("interior", 1), ("interior", 2), ("interior", 3), ("interior", 8),
    ("beta", "mct"), ("beta", "uniform"), ("beta", "decreasing"), ("beta", "projected"),
]
# Lever rows (issue 22): `mctool distill` options past MCT, one row per (lever, ipc), evaluated on
# the ablation's protocol beside the reference "mct" (which also evaluates random real images),
# with wall seconds per iteration (accuracy per hour, not per iteration). Each entry:
# (title, options for a run of `iterations` iterations, options `mctool distill --help` must list).
# A new lever adds one entry here. A row whose options learn labels trains its evaluation networks on
# soft labels, so its random-real baseline is labelled by the buffer's first expert (like with like);
# its images are also scored with hard labels (`evaluate --labels hard`, stage `...-evaluate-hard`),
# against the "mct" row's random real (hard): the field reports hard- and soft-label results apart.
def _window(iterations: int) -> tuple[str, ...]:
    # DATM-style: start at epoch 0 with an upper end of 1 growing to --max-start-epoch over half the run.
    return ("--min-start-epoch", "0", "--start-upper-init", "1", "--start-upper-iterations",
            str(max(1, iterations // 2)))


def _ema(iterations: int) -> tuple[str, ...]:
    # The initial images keep weight decay^t: 1 - 5/t leaves them < 1 % at the end of the run.
    return ("--ema", f"{max(0.5, 1 - 5 / max(iterations, 1)):.4g}")


LEVERS: dict[str, tuple[str, Any, tuple[str, ...]]] = {
    "mct": ("MCT as published (reference)", lambda it: (), ()),
    "window": ("sampling window (DATM)", _window, ("--start-upper-init",)),
    "ema": ("EMA of the images", _ema, ("--ema",)),
    "batch-syn-100": ("--batch-syn 100", lambda it: ("--batch-syn", "100"), ()),
    "batch-syn-250": ("--batch-syn 250", lambda it: ("--batch-syn", "250"), ()),
    "window+ema": ("window + EMA", lambda it: (*_window(it), *_ema(it)), ("--start-upper-init", "--ema")),
    "labels": ("learned soft labels (DATM)", lambda it: ("--learn-labels",), ("--learn-labels",)),
    "all": ("window + EMA + learned soft labels", lambda it: (*_window(it), *_ema(it), "--learn-labels"),
            ("--start-upper-init", "--ema", "--learn-labels")),
}


def learns_labels(name: str) -> bool:
    """Whether a lever's distillation learns soft labels (its scores are soft-label scores)."""
    return "--learn-labels" in LEVERS[name][1](1)

FACTOR_TITLES = {"grad": "matching gradient (--grad)", "units": "step units (released code vs exact gradient)",
                 "images": "images kept (final vs best on validation)", "start": "start epochs",
                 "interior": "interior waypoints (--interior)", "beta": "β strategy (--beta)"}


@dataclass
class Plan:
    """The stages of one benchmark size plus what the summary needs to find their products."""

    size: Size
    stages: list[Stage] = field(default_factory=list)
    main: dict[int, tuple[str, str]] = field(default_factory=dict)  # ipc -> (distill, evaluate) stage
    rows: list[dict[str, Any]] = field(default_factory=list)  # ablation rows: factor, value, stages
    levers: list[dict[str, Any]] = field(default_factory=list)  # lever rows: lever, ipc, iterations, stages


def convex_args(interior: int, beta: str) -> tuple[str, ...]:
    """`mctool convexify` options for one convexified buffer."""
    return ("--interior", str(interior), "--beta", beta)


def setting_args(s: dict[str, Any], size: Size) -> tuple[list[str], list[str], list[str], list[str]]:
    """(distill args, distill requires, evaluate args, evaluate requires) of one ablation setting."""
    d: list[str] = ["--grad", s["grad"], "--discrete" if s["start"] == "discrete" else "--continuous",
                    "--interior", str(s["interior"])]
    d_req: list[str] = []
    e: list[str] = []
    e_req: list[str] = []
    if s["units"] != "released":  # released is mctool's default: the reference row needs no option
        opt, values = PENDING["step_units"]
        d += [opt, values[s["units"]]]
        d_req.append(opt)
    if s["images"] == "best":
        opt, value = PENDING["select_on"]
        d += ["--eval-every", str(size.abl_eval_every), opt, value]
        d_req += ["--eval-every", opt]
        eopt, evalue = PENDING["evaluate_best"]
        e += [eopt, evalue]
        e_req.append(eopt)
    return d, d_req, e, e_req


def slug(s: dict[str, Any]) -> str:
    """Short file/stage name of an ablation setting: 'ref' or the factors that differ from it."""
    diff = [f"{k}-{v}" for k, v in s.items() if v != REFERENCE[k]]
    return "-".join(diff) if diff else "ref"


def preset_args(size: Size, ipc: int) -> list[str]:
    """The preset (or the bare --ipc) a distillation at `ipc` starts from."""
    if size.preset:
        return ["--preset", size.preset.format(ipc=ipc)]
    return ["--ipc", str(ipc)]


def build_plan(size: Size) -> Plan:
    """Every stage of the benchmark at `size`, in the order they run."""
    plan = Plan(size)
    add = plan.stages.append
    add(Stage("experts", "experts", (size.dataset, "--n", str(size.experts), "--epochs", str(size.epochs),
                                     "--width", str(size.width), "--seed", SEED, "-o", "buffer.h5"), "buffer.h5"))
    convex: dict[tuple[int, str], str] = {}

    def convexified(interior: int, beta: str) -> str:
        """Stage name of the convexified buffer (interior, beta), added on first use."""
        if (interior, beta) not in convex:
            name = "convexify" if not convex else f"convexify-i{interior}-{beta}"
            add(Stage(name, "convexify", ("buffer.h5", "-o", f"convex-i{interior}-{beta}.h5",
                                          *convex_args(interior, beta)), f"convex-i{interior}-{beta}.h5",
                      deps=("experts",)))
            convex[(interior, beta)] = name
        return convex[(interior, beta)]

    main_convex = convexified(REFERENCE["interior"], REFERENCE["beta"])
    for ipc in IPCS:
        add(Stage(f"distill-ipc{ipc}", "distill",
                  (*preset_args(size, ipc), *size.distill_args, "--buffer", f"convex-i{REFERENCE['interior']}-mct.h5",
                   "-o", f"synset-ipc{ipc}.h5", "--name", f"ipc{ipc}", "--iterations", str(size.iterations[ipc]),
                   "--seed", SEED), f"synset-ipc{ipc}.h5", deps=(main_convex,), resume_flag="--resume"))
    for ipc in IPCS:
        add(Stage(f"evaluate-ipc{ipc}", "evaluate",
                  (f"synset-ipc{ipc}.h5", "--runs", str(size.eval_runs), "--epochs", str(size.eval_epochs),
                   "--baseline", "random", "--seed", SEED, "--no-save"), f"eval-ipc{ipc}.json",
                  deps=(f"distill-ipc{ipc}",), capture=True))
        plan.main[ipc] = (f"distill-ipc{ipc}", f"evaluate-ipc{ipc}")
    add_levers(plan, main_convex)
    if not size.ablation:
        return plan
    made: set[str] = set()
    for factor, value in ROWS:
        setting = dict(REFERENCE, **{factor: value})
        key = slug(setting)
        if setting["interior"] + 1 > size.epochs:  # I interior waypoints need K >= I + 1 epochs
            plan.rows.append({"factor": factor, "value": value, "key": key, "distill": None, "evaluate": None,
                              "reason": f"needs experts of >= {setting['interior'] + 1} epochs (K = {size.epochs})"})
            continue
        d_args, d_req, e_args, e_req = setting_args(setting, size)
        cstage = convexified(setting["interior"], setting["beta"])
        dname, ename = f"abl-distill-{key}", f"abl-evaluate-{key}"
        if key not in made:
            made.add(key)
            ipc = size.abl_ipc
            add(Stage(dname, "distill",
                      (*preset_args(size, ipc), *size.distill_args, *d_args, "--buffer",
                       f"convex-i{setting['interior']}-{setting['beta']}.h5", "-o", f"abl-{key}.h5", "--name", key,
                       "--iterations", str(size.abl_iterations), "--seed", SEED), f"abl-{key}.h5",
                      deps=(cstage,), requires=tuple(d_req), resume_flag="--resume"))
            # The reference also evaluates random real images on the ablation's protocol (same seeds).
            baseline = ("--baseline", "random") if key == "ref" else ()
            add(Stage(ename, "evaluate",
                      (f"abl-{key}.h5", *e_args, "--runs", str(size.abl_eval_runs), "--epochs",
                       str(size.abl_eval_epochs), *baseline, "--seed", SEED, "--no-save"), f"abl-{key}.json",
                      deps=(dname,), requires=tuple(e_req), capture=True))
        plan.rows.append({"factor": factor, "value": value, "key": key, "distill": dname, "evaluate": ename})
    return plan


def add_levers(plan: Plan, convex_stage: str) -> None:
    """The lever rows' stages: per ipc the reference (with random real) and each asked lever."""
    size = plan.size
    if not size.levers:
        return
    iterations = size.lever_iterations or size.abl_iterations
    for ipc in size.lever_ipcs or (size.abl_ipc,):
        for name in dict.fromkeys(("mct", *size.levers)):
            _, options, requires = LEVERS[name]
            key = f"lever-{name}-ipc{ipc}"
            plan.stages.append(Stage(f"{key}-distill", "distill",
                                     (*preset_args(size, ipc), *size.distill_args, *options(iterations), "--buffer",
                                      f"convex-i{REFERENCE['interior']}-mct.h5", "-o", f"{key}.h5", "--name", key,
                                      "--iterations", str(iterations), "--seed", SEED), f"{key}.h5",
                                     deps=(convex_stage,), requires=requires, resume_flag="--resume"))
            baseline: tuple[str, ...] = ("--baseline", "random") if name == "mct" else ()
            if learns_labels(name):  # random real labelled by the same expert, by the rule learned labels start from
                baseline = ("--baseline", "random", "--baseline-labels", "expert", "--buffer",
                            f"convex-i{REFERENCE['interior']}-mct.h5")
            plan.stages.append(Stage(f"{key}-evaluate", "evaluate",
                                     (f"{key}.h5", "--runs", str(size.abl_eval_runs), "--epochs",
                                      str(size.abl_eval_epochs), *baseline, "--seed", SEED, "--no-save"),
                                     f"{key}.json", deps=(f"{key}-distill",), capture=True,
                                     requires=("--baseline-labels",) if learns_labels(name) else ()))
            hard = None
            if learns_labels(name):  # the same images, hard labels: a stage of its own (the others' arguments kept)
                hard = f"{key}-evaluate-hard"
                plan.stages.append(Stage(hard, "evaluate",
                                         (f"{key}.h5", "--labels", "hard", "--runs", str(size.abl_eval_runs),
                                          "--epochs", str(size.abl_eval_epochs), "--seed", SEED, "--no-save"),
                                         f"{key}-hard.json", deps=(f"{key}-distill",), requires=("--labels",),
                                         capture=True))
            plan.levers.append({"lever": name, "ipc": ipc, "iterations": iterations, "distill": f"{key}-distill",
                                "evaluate": f"{key}-evaluate", "evaluate_hard": hard})


# ----------------------------------------------------------------------------------------------
# Summary: one table from the manifest and the products.


def _result(work: Path, product: str) -> dict[str, Any] | None:
    """A captured --json product (None when it is not there)."""
    p = work / product
    return json.loads(p.read_text()) if p.exists() else None


def _kind(ev: dict[str, Any] | None, kind: str) -> dict[str, Any] | None:
    """The ConvNet result of one kind ('synset' or 'random-real') in an `mctool evaluate --json` document."""
    for r in (ev or {}).get("results", []):
        if r.get("kind") == kind:
            return r
    return None


def _pct(r: dict[str, Any] | None) -> dict[str, Any] | None:
    """mean/std/accuracies in percent, rounded."""
    if r is None:
        return None
    return {"mean": round(100 * r["mean"], 2), "std": round(100 * r["std"], 2),
            "runs": len(r.get("accuracies", [])), "epochs": r.get("epochs"),
            "accuracies": [round(100 * a, 2) for a in r.get("accuracies", [])]}


def summarize(plan: Plan, pipeline: Pipeline, experts_info: dict[str, Any] | None) -> dict[str, Any]:
    """The benchmark's numbers: main table, ablation rows, experts, times, goals."""
    work, size, stages = pipeline.work, plan.size, pipeline.manifest.data["stages"]

    def status(name: str) -> str:
        e = stages.get(name, {})
        if pipeline.is_current(name):
            return "done"
        if e.get("status") in ("unavailable", "blocked") and e.get("reason"):
            return e["reason"]
        return "not yet run" if not e.get("attempts") else str(e.get("status"))

    main = []
    for ipc, (dname, ename) in plan.main.items():
        ev = _result(work, pipeline.by_name[ename].product) if pipeline.is_current(ename) else None
        syn, rnd = _pct(_kind(ev, "synset")), _pct(_kind(ev, "random-real"))
        dres = stages.get(dname, {}).get("result") or {}
        # Whatever else a newer `mctool evaluate --json` reports (e.g. gain, HLR) is kept as it is.
        more = {k: v for k, v in (ev or {}).items() if k not in ("file", "synset", "ipc", "lr", "results")}
        main.append({"ipc": ipc, "distilled": syn, "random_real": rnd,
                     "gain": round(syn["mean"] - rnd["mean"], 2) if syn and rnd else None,
                     "iterations": size.iterations[ipc], "learned_lr": dres.get("alpha"),
                     "status": status(ename), "evaluate_reports": more})
    ref_eval = _result(work, "abl-ref.json") if pipeline.is_current("abl-evaluate-ref") else None
    ref_random = _pct(_kind(ref_eval, "random-real"))
    ablation = []
    for row in plan.rows:
        current = row["evaluate"] is not None and pipeline.is_current(row["evaluate"])
        ev = _result(work, pipeline.by_name[row["evaluate"]].product) if current else None
        syn = _pct(_kind(ev, "synset"))
        ablation.append({"factor": row["factor"], "value": row["value"], "stage": row["key"], "result": syn,
                         "gain_over_random": round(syn["mean"] - ref_random["mean"], 2) if syn and ref_random else None,
                         "status": row.get("reason") or status(row["evaluate"])})
    levers = summarize_levers(plan, pipeline, status)
    times = {s.name: stages.get(s.name, {}).get("wall_s") for s in pipeline.stages}
    groups = {"experts": ["experts"], "convexify": [s.name for s in pipeline.stages if s.command == "convexify"]}
    for ipc in IPCS:
        groups[f"distill ipc {ipc}"] = [f"distill-ipc{ipc}"]
        groups[f"evaluate ipc {ipc}"] = [f"evaluate-ipc{ipc}"]
    groups["ablation"] = [s.name for s in pipeline.stages if s.name.startswith("abl-")]
    groups["levers"] = [s.name for s in pipeline.stages if s.name.startswith("lever-")]
    group_times = {g: round(sum(times[n] or 0.0 for n in ns), 1) for g, ns in groups.items()}
    return {"size": asdict(size), "main": main, "random_real_ablation_protocol": ref_random,
            "ablation": ablation, "levers": levers, "experts": experts_info, "seconds": group_times, "stage_seconds": times,
            "goals": goals(main, ablation)}


def summarize_levers(plan: Plan, pipeline: Pipeline, status: Any) -> list[dict[str, Any]]:
    """Each lever row, hard and soft labels apart: accuracy, the matching random real at its ipc and
    the gain over it, wall seconds per iteration (the distill stage's wall time over all sittings /
    its iterations: includes startup and data loading).

    A row that learns labels gives two: `soft` (its evaluation, against its own random real, labelled
    by the same expert) and `hard` (its `--labels hard` evaluation); every hard row is compared with
    the "mct" row's random real (hard labels, same protocol and seeds)."""
    stages = pipeline.manifest.data["stages"]

    def result(stage: str | None) -> dict[str, Any] | None:
        if stage is None or not pipeline.is_current(stage):
            return None
        return _result(pipeline.work, pipeline.by_name[stage].product)

    hard_random = {row["ipc"]: _kind(result(row["evaluate"]), "random-real") for row in plan.levers
                   if row["lever"] == "mct"}
    out = []
    for row in plan.levers:
        d = stages.get(row["distill"], {})
        wall = d.get("wall_s") if pipeline.is_current(row["distill"]) else None
        per = round(wall / row["iterations"], 2) if wall is not None and row["iterations"] else None
        soft = learns_labels(row["lever"])
        scored = [("soft" if soft else "hard", row["evaluate"])]
        if row.get("evaluate_hard"):
            scored.append(("hard", row["evaluate_hard"]))
        for labels, stage in scored:
            ev = result(stage)
            got = (_kind(ev, "synset") or {}).get("labels", "hard")  # what the networks really trained on
            wrong = ev is not None and got != labels  # e.g. an mctool that ignored --labels: not this row's score
            syn = None if wrong else _pct(_kind(ev, "synset"))
            base = _kind(ev, "random-real") if labels == "soft" else hard_random.get(row["ipc"])
            rnd = _pct(base)
            out.append({"lever": row["lever"], "ipc": row["ipc"], "labels": labels, "iterations": row["iterations"],
                        "result": syn, "random_real": rnd,
                        "random_real_labels": None if base is None else base.get("labels", "hard"),
                        "gain_over_random": round(syn["mean"] - rnd["mean"], 2) if syn and rnd else None,
                        "wall_s_per_iteration": per,
                        "status": f"trained on {got} labels, not {labels}" if wrong else status(stage)})
    return out


def goals(main: list[dict[str, Any]], ablation: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's goals, each 'met', 'not met' or 'not measured'."""
    out: dict[str, Any] = {}
    want = {1: 15.0, 10: 8.0, 50: 3.0}
    for m in main:
        g = m["gain"]
        out[f"gain ipc {m['ipc']} >= {want[m['ipc']]:g}"] = ("not measured" if g is None
                                                           else "met" if g >= want[m["ipc"]] else "not met")
    acc = {(a["factor"], a["value"]): a["result"]["mean"] if a["result"] else None for a in ablation}

    def at_least(a: tuple[str, Any], b: tuple[str, Any]) -> str:
        if acc.get(a) is None or acc.get(b) is None:
            return "not measured"
        return "met" if acc[a] >= acc[b] else "not met"

    if acc:
        out["interior 2 >= interior 0"] = at_least(("interior", 2), ("interior", 0))
        out["interior 2 >= interior 8"] = at_least(("interior", 2), ("interior", 8))
        out["beta mct >= uniform"] = at_least(("beta", "mct"), ("beta", "uniform"))
    return out


def _fmt(r: dict[str, Any] | None) -> str:
    return f"{r['mean']:.2f} ± {r['std']:.2f}" if r else "—"


def render(summary: dict[str, Any]) -> str:
    """The summary as Markdown tables (what bench/README.md records)."""
    size = summary["size"]
    lines = [f"{size['dataset']}, size '{size['name']}': experts ConvNet width {size['width']}, "
             f"{size['experts']} experts x {size['epochs']} epochs; evaluation {size['eval_runs']} networks x "
             f"{size['eval_epochs']} epochs (same seeds for distilled and random real), test accuracy %.", "",
             "| ipc | distilled | random real | gain | iterations | status |", "|---:|---:|---:|---:|---:|---|"]
    for m in summary["main"]:
        gain = f"{m['gain']:+.2f}" if m["gain"] is not None else "—"
        lines.append(f"| {m['ipc']} | {_fmt(m['distilled'])} | {_fmt(m['random_real'])} | {gain} | "
                     f"{m['iterations']} | {m['status']} |")
    ex = summary.get("experts")
    if ex:
        lines += ["", f"Experts on the whole training set: {ex['test_accuracy_last_mean']:.2f} % test accuracy after "
                  f"{ex['epochs']} epochs (mean of {ex['done']} experts; range {ex['test_accuracy_last_min']:.2f}–"
                  f"{ex['test_accuracy_last_max']:.2f})."]
    if summary["ablation"]:
        lines += ["", f"Ablation at ipc {size['abl_ipc']}: {size['abl_iterations']} iterations, evaluation "
                  f"{size['abl_eval_runs']} networks x {size['abl_eval_epochs']} epochs; random real on this protocol: "
                  f"{_fmt(summary['random_real_ablation_protocol'])}.", "",
                  "| factor | value | distilled | gain over random | status |", "|---|---|---:|---:|---|"]
        for a in summary["ablation"]:
            gain = f"{a['gain_over_random']:+.2f}" if a["gain_over_random"] is not None else "—"
            lines.append(f"| {FACTOR_TITLES[a['factor']]} | {a['value']} | {_fmt(a['result'])} | {gain} | {a['status']} |")
    if summary.get("levers"):
        lines += ["", f"Levers: {size['lever_iterations'] or size['abl_iterations']} iterations each, evaluation "
                  f"{size['abl_eval_runs']} networks x {size['abl_eval_epochs']} epochs; wall s/iteration includes "
                  "startup. Hard and soft labels apart: a soft row's random real is labelled by the same expert "
                  "(its own evaluation), a hard row's is MCT's (hard labels); a row that learns labels is also "
                  "scored with hard labels (`evaluate --labels hard`).", "",
                  "| lever | labels | ipc | distilled | random real | gain | wall s/iteration | status |",
                  "|---|---|---:|---:|---:|---:|---:|---|"]
        for row in summary["levers"]:
            gain = f"{row['gain_over_random']:+.2f}" if row["gain_over_random"] is not None else "—"
            per = f"{row['wall_s_per_iteration']:.2f}" if row["wall_s_per_iteration"] is not None else "—"
            lines.append(f"| {LEVERS[row['lever']][0]} | {row.get('labels', 'hard')} | {row['ipc']} | "
                         f"{_fmt(row['result'])} | {_fmt(row['random_real'])} | {gain} | {per} | {row['status']} |")
    lines += ["", "Time per stage (wall seconds, all sittings): "
              + ", ".join(f"{k} {v:.0f}" for k, v in summary["seconds"].items()) + "."]
    lines += ["", "Goals: " + "; ".join(f"{k}: {v}" for k, v in summary["goals"].items()) + "."]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Machine and code identity.


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; else platform's answer)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit(repo: Path) -> dict[str, Any]:
    """The commit of the mctool checkout beside this script, and whether it has local changes."""
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(dirty) if dirty is not None else None}


PROBE = ("import json, os, torch, mctool; print(json.dumps({'torch': torch.__version__, "
         "'torch_threads': torch.get_num_threads(), 'mctool': getattr(mctool, '__version__', None), "
         "'mctool_path': os.path.dirname(mctool.__file__), 'cuda': torch.cuda.is_available()}))")


def machine(python: str, env: dict[str, str]) -> dict[str, Any]:
    """What this sitting runs on: CPU, cores, torch threads of the children, load, versions, commit."""
    info: dict[str, Any] = {"date": now(), "host": platform.node(), "cpu_model": cpu_model(),
                            "cpu_count": os.cpu_count(), "omp_num_threads": env.get("OMP_NUM_THREADS"),
                            "loadavg": loadavg(), "python": platform.python_version(),
                            "platform": platform.platform(), **git_commit(REPO)}
    try:
        done = subprocess.run([python, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
        info.update(json.loads(done.stdout))
    except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError):
        info["probe_error"] = "could not import torch/mctool in a child process"
    return info


def experts_summary(runner: Runner, work: Path) -> dict[str, Any] | None:
    """Whole-dataset test accuracy of the experts, from `mctool inspect buffer.h5 --json`."""
    if not (work / "buffer.h5").exists():
        return None
    done = runner.run(["inspect", "buffer.h5", "--json", "--quiet"], work)
    if done.rc != 0:
        return None
    ex = json.loads(done.stdout).get("experts") or {}
    last = [100 * p["test_accuracy_last"] for p in ex.get("per_expert", []) if p.get("test_accuracy_last") is not None]
    if not last:
        return None
    return {"done": ex.get("done"), "epochs": ex.get("epochs"), "test_accuracy_last_mean": round(sum(last) / len(last), 2),
            "test_accuracy_last_min": round(min(last), 2), "test_accuracy_last_max": round(max(last), 2)}


# ----------------------------------------------------------------------------------------------
# Command line.


def parse_iterations(text: str) -> dict[int, int]:
    """'500' (every ipc) or '1=1000,10=600,50=150'."""
    if re.fullmatch(r"\d+", text):
        return {ipc: int(text) for ipc in IPCS}
    out = {}
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*=\s*(\d+)\s*", part)
        if not m or int(m.group(1)) not in IPCS:
            raise argparse.ArgumentTypeError(f"--iterations: expected N or 1=N,10=N,50=N, got {text!r}")
        out[int(m.group(1))] = int(m.group(2))
    return out


def parser() -> argparse.ArgumentParser:
    """The benchmark's options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="default", help="benchmark size (default: default)")
    p.add_argument("--quick", action="store_const", dest="size", const="quick", help="same as --size quick")
    p.add_argument("--work", type=Path, default=None,
                   help="work folder for products and manifest.json (default: bench/results/fidelity-SIZE/)")
    p.add_argument("--width", type=int, help="experts' ConvNet width (overrides the size)")
    p.add_argument("--experts", type=int, help="number of experts (overrides the size)")
    p.add_argument("--epochs", type=int, help="epochs per expert (overrides the size)")
    p.add_argument("--iterations", type=parse_iterations, help="distill iterations: N or 1=N,10=N,50=N")
    p.add_argument("--eval-runs", type=int, help="networks per evaluation (overrides the size)")
    p.add_argument("--eval-epochs", type=int, help="epochs per evaluation network (overrides the size)")
    p.add_argument("--abl-iterations", type=int, help="distill iterations of each ablation row")
    p.add_argument("--abl-eval-runs", type=int, help="networks per ablation evaluation (>= 3 for the table)")
    p.add_argument("--abl-eval-epochs", type=int, help="epochs per ablation evaluation network")
    p.add_argument("--no-ablation", dest="ablation", action="store_false", default=None, help="skip the ablation rows")
    p.add_argument("--dataset", help="dataset (default fashion-mnist; another needs --preset none)")
    p.add_argument("--preset", help="preset name template, e.g. fashion-mnist-ipc{ipc}, or 'none'")
    p.add_argument("--distill-args", help="extra `mctool distill` options for every distillation (quoted)")
    p.add_argument("--lever", action="append", choices=sorted(LEVERS), metavar="NAME",
                   help=f"add lever rows (beside the reference 'mct'): {', '.join(LEVERS)}; repeatable. A lever "
                        "that learns labels gives a soft-label row (random real labelled by the same expert) and a "
                        "hard-label row (evaluate --labels hard; random real: the mct row's)")
    p.add_argument("--lever-ipc", type=int, action="append", metavar="IPC",
                   help="ipc of the lever rows (default: the ablation's); repeatable")
    p.add_argument("--lever-iterations", type=int, help="distill iterations of each lever row (default: the ablation's)")
    p.add_argument("--only", nargs="+", metavar="STAGE", help="run only these stages (and what they need)")
    p.add_argument("--stop-after", metavar="STAGE", help="stop after this stage (e.g. experts)")
    p.add_argument("--list", action="store_true", help="show the stages, their state and commands; run nothing")
    p.add_argument("--summary", action="store_true",
                   help="write the summary tables from what the work folder holds; run no stage (a sitting "
                        "without --only runs every stage still to run)")
    p.add_argument("--adopt", type=Path, action="append", default=[], metavar="WORK",
                   help="first take the stages finished in WORK, a copy of this work folder a second sitting "
                        "ran (e.g. ablation rows on the other core); repeatable")
    p.add_argument("--device", default=None, help="mctool --device (default: mctool's auto)")
    p.add_argument("--data-dir", type=Path, default=None, help="mctool --data-dir")
    p.add_argument("--out", type=Path, default=None, help="summary JSON (default: bench/results/fidelity-SIZE.json)")
    return p


def resolve_size(args: argparse.Namespace, sizes: dict[str, Size]) -> Size:
    """The named size with the command line's overrides."""
    size = sizes[args.size]
    over: dict[str, Any] = {k: v for k, v in {
        "width": args.width, "experts": args.experts, "epochs": args.epochs, "eval_runs": args.eval_runs,
        "eval_epochs": args.eval_epochs, "abl_iterations": args.abl_iterations, "abl_eval_runs": args.abl_eval_runs,
        "abl_eval_epochs": args.abl_eval_epochs, "ablation": args.ablation, "dataset": args.dataset}.items()
        if v is not None}
    if args.iterations:
        over["iterations"] = {**size.iterations, **args.iterations}
    if args.preset is not None:
        over["preset"] = None if args.preset.lower() == "none" else args.preset
    if args.distill_args is not None:
        over["distill_args"] = tuple(shlex.split(args.distill_args))
    if args.lever:
        over["levers"] = tuple(dict.fromkeys(args.lever))
    if args.lever_ipc:
        over["lever_ipcs"] = tuple(dict.fromkeys(args.lever_ipc))
    if args.lever_iterations is not None:
        over["lever_iterations"] = args.lever_iterations
    return replace(size, **over)


def child_env(repo: Path) -> dict[str, str]:
    """Environment of the mctool children: the mctool checkout beside this script comes first."""
    env = dict(os.environ)
    if (repo / "mctool" / "__init__.py").exists():
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), env.get("PYTHONPATH")]))
    return env


def exec_args(args: argparse.Namespace) -> dict[str, list[str]]:
    """--device / --data-dir for the commands that take them (not part of any fingerprint)."""
    extra: list[str] = []
    if args.device:
        extra += ["--device", args.device]
    if args.data_dir:
        extra += ["--data-dir", str(args.data_dir.resolve())]
    data = ["--data-dir", str(args.data_dir.resolve())] if args.data_dir else []
    return {"experts": extra, "distill": extra, "evaluate": extra, "inspect": data}


def main(argv: list[str] | None = None, runner: Runner | None = None,
         sizes: dict[str, Size] | None = None) -> int:
    """Run (or continue) the benchmark; returns the exit code (0 done, 1 a stage failed, 130 interrupted)."""
    sizes = sizes or SIZES
    p = parser()
    args = p.parse_args(argv)
    if args.size not in sizes:
        p.error(f"unknown size {args.size}")
    size = resolve_size(args, sizes)
    work = (args.work or REPO / "bench" / "results" / f"fidelity-{size.name}").resolve()
    out = args.out or REPO / "bench" / "results" / f"fidelity-{size.name}.json"
    plan = build_plan(size)
    names = [s.name for s in plan.stages]
    for n in (args.only or []) + ([args.stop_after] if args.stop_after else []):
        if n not in names:
            p.error(f"unknown stage {n!r} (stages: {', '.join(names)})")
    for other in args.adopt:
        if not (other / "manifest.json").is_file() or other.resolve() == work:
            p.error(f"--adopt {other}: not another benchmark work folder (no manifest.json there)")
    env = child_env(REPO)
    runner = runner or SubprocessRunner(sys.executable, env)
    if args.list:  # read-only: works while another run holds the folder
        print_plan(Pipeline(work, plan.stages, runner, extra=exec_args(args)))
        return 0
    if args.summary and not (work / "manifest.json").is_file():
        p.error(f"--summary: {work} is not a benchmark work folder (no manifest.json there)")
    work.mkdir(parents=True, exist_ok=True)
    try:
        with Lock(work):
            pipeline = Pipeline(work, plan.stages, runner, extra=exec_args(args))
            m = pipeline.manifest.data
            if m.get("size_name", size.name) != size.name:
                p.error(f"{work} holds the '{m['size_name']}' benchmark; use --size {m['size_name']} or another --work")
            if args.summary:
                return write_summary(pipeline, plan, runner, out, [])
            return run(pipeline, plan, runner, args, size, env, out, argv)
    except WorkBusy as exc:
        print(f"fidelity: error: {exc}", file=sys.stderr)
        return 2


def print_plan(pipeline: Pipeline) -> None:
    """Each stage: its state (with today's settings), wall seconds so far and its command."""
    for s in pipeline.stages:
        e = pipeline.manifest.data["stages"].get(s.name, {})
        if pipeline.is_current(s.name):
            state = "done"
        elif e.get("fingerprint") not in (None, pipeline.fingerprint(s.name)):
            state = "changed"  # made with other settings: will rerun
        else:
            state = e.get("status", "to run")
        wall = f"{e['wall_s']:.0f} s" if e.get("wall_s") is not None else ""
        print(f"{s.name:32s} {state:12s} {wall:>8s}  mctool {' '.join(pipeline.argv(s))}")


def run(pipeline: Pipeline, plan: Plan, runner: Runner, args: argparse.Namespace, size: Size,
        env: dict[str, str], out: Path, argv: list[str] | None) -> int:
    """One sitting: record the machine, run the stages under signal forwarding, write the summary."""
    m = pipeline.manifest.data
    m["size_name"], m["size"] = size.name, asdict(size)
    sitting = {"started": now(), "argv": sys.argv if argv is None else ["bench/fidelity.py", *argv],
               "machine": machine(sys.executable, env) if isinstance(runner, SubprocessRunner)
               else {"date": now(), "runner": type(runner).__name__}}
    m.setdefault("sittings", []).append(sitting)
    pipeline.manifest.save()
    for other in args.adopt:
        sitting.setdefault("adopted", {})[str(other.resolve())] = pipeline.adopt(other.resolve())
    pipeline.manifest.save()
    print(f"fidelity: size '{size.name}', work {pipeline.work}, mctool commit "
          f"{sitting['machine'].get('commit')}, {sitting['machine'].get('cpu_count', '?')} CPUs, "
          f"OMP_NUM_THREADS={env.get('OMP_NUM_THREADS')}", file=sys.stderr, flush=True)

    def stop(signum: int, frame: Any) -> None:
        pipeline.stop_requested = True
        runner.interrupt()

    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        outcomes = pipeline.run(only=args.only, stop_after=args.stop_after)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    sitting["ended"] = now()
    sitting["outcomes"] = {o.name: o.status for o in outcomes}
    pipeline.manifest.save()
    if pipeline.stop_requested or any(o.status == "interrupted" for o in outcomes):
        print("fidelity: interrupted; run the same command again to continue", file=sys.stderr)
        return INTERRUPTED_EXIT
    return write_summary(pipeline, plan, runner, out, outcomes)


def write_summary(pipeline: Pipeline, plan: Plan, runner: Runner, out: Path, outcomes: list[Any]) -> int:
    """The tables of what the work folder holds, to `out` and the folder's summary.json, and printed;
    1 when one of this sitting's `outcomes` failed."""
    summary = summarize(plan, pipeline, experts_summary(runner, pipeline.work))
    summary.update({"work": str(pipeline.work), "sittings": pipeline.manifest.data.get("sittings", []),
                    "written": now()})
    write_json(pipeline.work / "summary.json", summary)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, summary)
    print(render(summary))
    print(f"\nsummary: {out} (and {pipeline.work / 'summary.json'})", file=sys.stderr)
    failed = [o for o in outcomes if o.status == "failed"]
    for o in failed:
        print(f"fidelity: stage {o.name} failed: {o.reason}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
