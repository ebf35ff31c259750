"""A run's state <-> the stored synset and its checkpoint (what a resume reads back)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from mctool import store
from mctool.distill.config import DistillConfig
from mctool.distill.state import State
from mctool.errors import UsageError

def _synset(name: str, cfg: DistillConfig, state: State, final: bool, source: dict[str, Any],
            reference: dict[str, Any] | None) -> store.Synset:
    checkpoint = store.Checkpoint(images_velocity=state.images_velocity, alpha_velocity=state.alpha_velocity,
                                  generators=state.generators, queues=state.queues, run=state.run)
    return store.Synset(name=name, images=state.images, labels=state.labels, lr=state.alpha, ipc=cfg.ipc,
                        method=cfg.method, grad=cfg.grad, preset=cfg.preset, iterations=state.iteration,
                        complete=final, skipped=state.skipped, config=dataclasses.asdict(cfg),
                        evaluations=state.evaluations, experts_reference=reference, loss=state.losses,
                        source=source, checkpoint=checkpoint, best=state.best)


def _state_from(syn: store.Synset) -> State:
    assert syn.checkpoint is not None
    c = syn.checkpoint
    return State(images=syn.images, labels=syn.labels, alpha=syn.lr, images_velocity=c.images_velocity,
                 alpha_velocity=c.alpha_velocity, iteration=syn.iterations, generators=c.generators, queues=c.queues,
                 losses=list(syn.loss), skipped=syn.skipped, evaluations=list(syn.evaluations), best=syn.best,
                 run=dict(c.run))



def _load_state(out: Path, name: str) -> State:
    with store.open_synsets(out) as sf:
        return _state_from(sf.read(sf.pick(name), checkpoint=True))


def stored_config(out: Path, name: str) -> dict[str, Any]:
    """The settings synset `name` of `out` was started with (for --resume)."""
    if not out.exists():
        raise UsageError(f"--resume: {store.shown(out)} does not exist (drop --resume to start a new run)")
    with store.open_synsets(out) as sf:
        return sf.read(sf.pick(name), values=False).config


