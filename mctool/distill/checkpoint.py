"""A run's state <-> the stored synset and its checkpoint (what a resume reads back)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from mctool import store
from mctool.distill.config import MAX_BACKOFFS, DistillConfig
from mctool.distill.learnables import Value, averaged, learned_in, magnitude
from mctool.distill.state import State
from mctool.core.errors import ArtifactError, UsageError


def _synset(name: str, cfg: DistillConfig, state: State, final: bool, source: dict[str, Any],
            reference: dict[str, Any] | None) -> store.Synset:
    """The synset (with its checkpoint) `state` is stored as: each learnable's value in its synset
    field and/or checkpoint entry, its momentum in its checkpoint entry. Under `--ema` the average
    takes the value's place there and the raw value goes to the learnable's `ema_raw` entry."""
    entries = learned_in(cfg)
    learned: dict[str, Value] = {e.velocity: state.velocities[e.name] for e in entries}
    learned.update({e.saved: state.shown(e.name) for e in entries if e.saved is not None})
    learned.update({str(e.ema_raw): state.values[e.name] for e in entries if averaged(e, cfg)})
    checkpoint = store.Checkpoint(learned=learned, generators=state.generators, queues=state.queues, run=state.run)
    stored = {"labels": state.labels, **{e.stored: state.shown(e.name) for e in entries if e.stored is not None}}
    return store.Synset(name=name, **stored, ipc=cfg.ipc,
                        method=cfg.method, grad=cfg.grad, preset=cfg.preset, iterations=state.iteration,
                        complete=final, skipped=state.skipped, config=dataclasses.asdict(cfg),
                        evaluations=state.evaluations, experts_reference=reference, loss=state.losses,
                        source=source, checkpoint=checkpoint, best=state.best)


def _state_from(syn: store.Synset, cfg: DistillConfig, where: Path) -> State:
    """The state a resume continues from (the inverse of `_synset`)."""
    assert syn.checkpoint is not None
    c = syn.checkpoint
    values: dict[str, Value] = {}
    velocities: dict[str, Value] = {}
    averages: dict[str, Value] = {}
    for e in learned_in(cfg):
        for key in (e.velocity, e.saved, e.ema_raw if averaged(e, cfg) else None):
            if key is not None and key not in c.learned:
                raise ArtifactError(f"{store.shown(where)}: /synsets/{store.clean_text(syn.name)}/checkpoint lacks "
                                    f"'{key}', which this run's settings learn")
        shown = c.learned[e.saved] if e.saved is not None else getattr(syn, str(e.stored))
        if averaged(e, cfg):
            values[e.name], averages[e.name] = c.learned[str(e.ema_raw)], shown
        else:
            values[e.name] = shown
        # No update goes beyond the bound (learnables.step), nor does an average of values within it: a
        # value beyond is damage, not a state to resume (every update from it would be refused).
        kept = {str(e.saved or e.stored): shown, **({str(e.ema_raw): values[e.name]} if averaged(e, cfg) else {})}
        for key, value in kept.items():
            if not e.scalar and not magnitude(value) <= e.bound(cfg):
                where_in = "checkpoint/" if key in c.learned else ""
                raise ArtifactError(f"{store.shown(where)}: /synsets/{store.clean_text(syn.name)}/{where_in}{key}: "
                                    f"holds values beyond ±{e.bound(cfg):g}, which no update of this run makes")
        velocities[e.name] = c.learned[e.velocity]
    expected = {key for e in learned_in(cfg) for key in (e.velocity, e.saved, e.ema_raw if averaged(e, cfg) else None)}
    stray = sorted(set(c.learned) - expected)
    if stray:  # the stored settings and the checkpoint disagree: resuming would run another run
        raise ArtifactError(f"{store.shown(where)}: /synsets/{store.clean_text(syn.name)}/checkpoint holds "
                            f"'{stray[0]}', which the synset's stored settings do not learn")
    if cfg.learn_labels and (syn.labels.dim() != 2 or (syn.best is not None and syn.best.labels.dim() != 2)):
        raise ArtifactError(f"{store.shown(where)}: /synsets/{store.clean_text(syn.name)}/labels: hard labels, but "
                            "its run learns them (--learn-labels keeps soft labels)")
    problem = run_problem(c.run, syn.iterations, cfg.init_draws)
    if problem is not None:
        raise ArtifactError(f"{store.shown(where)}: /synsets/{store.clean_text(syn.name)}/checkpoint.run {problem}")
    return State(values=values, velocities=velocities, labels=syn.labels, iteration=syn.iterations,
                 generators=c.generators, queues=c.queues, losses=list(syn.loss), skipped=syn.skipped,
                 evaluations=list(syn.evaluations), best=syn.best, run=dict(c.run), averages=averages,
                 complete=syn.complete)


def run_problem(run: dict[str, Any], iterations: int | None = None, draws: int | None = None) -> str | None:
    """What is wrong with a checkpoint's `run` record (docs/format.md), or None: a resume repeats
    these choices, so a damaged one must not pass silently (a long cut list would zero lr_img).
    `iterations`: the synset's, which no cut may lie beyond (each cut goes back to images before it);
    `draws`: the run's --init-draws, which the chosen draw must be one of."""
    def whole(v: Any, low: int, high: float = math.inf) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high

    for key, low in (("micro_batch", 0), ("eval_every", 0), ("continued_from", 0)):
        # A continued run went on from an iteration it has reached.
        high = iterations if key == "continued_from" and iterations is not None else math.inf
        if key in run and not whole(run[key], low, high):
            most = "" if high == math.inf else f" and at most the synset's iterations ({high})"
            return f"'{key}' must be a whole number >= {low}{most}, got {store.clean_text(repr(run[key]))[:40]}"
    if "init_draws" in run:
        record = run["init_draws"]
        chosen = record.get("chosen") if isinstance(record, dict) else None
        if not whole(chosen, 0, math.inf if draws is None else draws - 1):
            among = "" if draws is None else f" below the run's --init-draws ({draws})"
            return f"'init_draws' must record the chosen draw, a whole number >= 0{among}"
        scores = record.get("scores", [])
        if not (isinstance(scores, list) and len(scores) in (0, draws or len(scores))
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1 for v in scores)
                and whole(record.get("scored_on", 0), 0)):
            return "'init_draws' must record each draw's score (accuracies) and how many images scored them"
    cuts = run.get("backoffs", [])
    if not isinstance(cuts, list) or len(cuts) > MAX_BACKOFFS:
        return f"'backoffs' must be a list of at most {MAX_BACKOFFS} cuts"
    after = 0  # cuts are made at increasing iterations, up to the synset's
    for cut in cuts:
        at = cut.get("iteration") if isinstance(cut, dict) else None
        if not (isinstance(cut, dict) and whole(at, after + 1, math.inf if iterations is None else iterations)
                and whole(cut.get("from_iteration"), 0, at)
                and all(isinstance(cut.get(k), (int, float)) and not isinstance(cut[k], bool)
                        and math.isfinite(cut[k]) and cut[k] >= 0
                        for k in ("lr_img_was", "lr_img"))):  # >= 0: a tiny factor may underflow
            return "'backoffs' holds a cut that is not {iteration, from_iteration, lr_img_was, lr_img}"
        after = at
    return None


def _load_state(out: Path, name: str, cfg: DistillConfig) -> State:
    with store.open_synsets(out) as sf:
        return _state_from(sf.read(sf.pick(name), checkpoint=True), cfg, out)


def resume_name(out: Path, name: str | None, derived: str) -> str:
    """The synset `--resume` continues: `name` (--name), else the one these settings would name
    (`derived`), else the file's only synset (started with other options: its stored settings
    are the run's). Anything else is left to stored_config, whose message lists the names."""
    if name is not None or not out.exists():
        return name or derived
    with store.open_synsets(out) as sf:
        names = sf.names
    return names[0] if derived not in names and len(names) == 1 else derived


def stored_config(out: Path, name: str) -> dict[str, Any]:
    """The settings synset `name` of `out` was started with (for --resume)."""
    if not out.exists():
        raise UsageError(f"--resume: {store.shown(out)} does not exist (drop --resume to start a new run)")
    with store.open_synsets(out) as sf:
        config = sf.read(sf.pick(name), values=False).config
    # The switches must be JSON booleans: the text "false" is true to Python and would resume another run.
    for f in dataclasses.fields(DistillConfig):
        if isinstance(f.default, bool) and f.name in config and not isinstance(config[f.name], bool):
            raise ArtifactError(f"{store.shown(out)}: /synsets/{store.clean_text(name)} attribute 'config': "
                                f"'{f.name}' must be true or false, got {store.clean_text(repr(config[f.name]))[:40]}")
    return config
