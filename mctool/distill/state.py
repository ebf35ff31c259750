"""The state of a distillation: what a checkpoint holds, and how a run starts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mctool import store
from mctool.distill.config import DistillConfig
from mctool.distill.draws import Choose
from mctool.distill.learnables import Value, averaged, learned_in, zero_like
from mctool.training.labels import Predict, expert_logits, replace_misclassified
from mctool.data.prepared import Prepared, sample_per_class


@dataclass
class State:
    """Everything a checkpoint holds: resuming from it continues the run bit for bit on CPU.

    The learned quantities are `values` and their momentum `velocities`, keyed by learnable
    name (mctool.distill.learnables); `images` and `alpha` are views of two of them. With learned
    labels, `labels` is softmax of the learned logits `values["labels"]` (`sync_labels`)."""

    values: dict[str, Value]  # learnable name -> current value
    velocities: dict[str, Value]  # learnable name -> its momentum
    labels: torch.Tensor
    iteration: int
    generators: list[torch.Tensor]  # one CPU generator state per rank
    queues: list[list[int]]  # per rank: experts left in the current shuffled pass
    losses: list[float] = field(default_factory=list)
    skipped: int = 0
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    best: store.BestImages | None = None
    run: dict[str, Any] = field(default_factory=dict)  # choices a resume repeats (micro-batch)
    averages: dict[str, Value] = field(default_factory=dict)  # learnable name -> its `--ema` average
    # Whether the stored run had finished (not saved: the synset's `complete`); a resume of one stopped
    # while scoring its last images (at its last iteration, not complete) only scores and saves them.
    complete: bool = False

    @property
    def backoffs(self) -> int:
        """How often `--lr-backoff` has cut the image learning rate (each cut is listed in `run`)."""
        return len(self.run.get("backoffs", []))

    def shown(self, name: str) -> Value:
        """What the run yields of learnable `name`: its `--ema` average when it has one, else its
        value (what the synset stores, periodic evaluations score and the best images keep)."""
        return self.averages.get(name, self.values[name])

    @property
    def images(self) -> torch.Tensor:
        """The synthetic images."""
        value = self.values["images"]
        assert isinstance(value, torch.Tensor)
        return value

    @property
    def alpha(self) -> float:
        """The learnable step size α."""
        return float(self.values["alpha"])

    def sync_labels(self) -> None:
        """`labels` = softmax(learned label logits), when the labels are learned (what the synset
        stores, evaluations train on and the best images keep; the same softmax as mctool.matching.loss).
        Under `--ema` the logits' average gives them, as the images' average gives the images."""
        if "labels" not in self.values:
            return
        logits = self.shown("labels")
        if isinstance(logits, torch.Tensor):
            self.labels = torch.softmax(logits, dim=1)

    def to(self, device: torch.device) -> "State":
        """The same state with its tensors on `device` (generator states stay on the CPU)."""
        def moved(d: dict[str, Value]) -> dict[str, Value]:
            return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in d.items()}

        best = self.best
        if best is not None:
            best = dataclasses.replace(best, images=best.images.to(device), labels=best.labels.to(device))
        return dataclasses.replace(self, values=moved(self.values), velocities=moved(self.velocities),
                                   averages=moved(self.averages), labels=self.labels.to(device), best=best)


def _rank_seed(seed: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, 0x5EED, rank]).generate_state(1, np.uint32)[0])


def initial_state(cfg: DistillConfig, prepared: Prepared, generator: torch.Generator,
                  pool: torch.Tensor | None = None, expert: Predict | None = None,
                  choose: Choose | None = None, chosen: int | None = None) -> State:
    """Images from random real images of each class drawn from the training indices `pool`
    (default: all) or noise, hard class-major labels, α = lr_init. With `expert` (learned labels,
    `--init correct`: mctool.training.labels), DATM's rule: drawn images the expert misclassifies are
    replaced by ones of the same class it gets right; learned label logits start as its logits.
    With --init-draws N > 1, N such draws are made one after another from `generator` and
    `choose` (mctool.distill.draws) picks the start — or `chosen`, the draw a run already chose
    (a resume draws its start again): the state's `run["init_draws"]` records the choice."""
    m = prepared.meta
    n = cfg.ipc * m.num_classes
    labels = store.class_major_labels(m.num_classes, cfg.ipc)
    device = prepared.train_x.device
    record: dict[str, Any] = {}
    if cfg.pix_init == "noise":
        images = torch.randn(n, m.channels, m.height, m.width, generator=generator)
    else:
        y = prepared.train_y if pool is None else prepared.train_y[pool.to(device)]

        def draw() -> torch.Tensor:
            picks = sample_per_class(y, m.num_classes, cfg.ipc, generator)
            if pool is not None:
                picks = pool.cpu()[picks]
            if expert is not None:
                picks, _ = replace_misclassified(expert, prepared.train_x, prepared.train_y, picks, generator, pool)
            return picks

        draws = [draw() for _ in range(cfg.init_draws)]  # one draw (the default) consumes what it always did
        picks = draws[0]
        if len(draws) > 1:
            if chosen is None:
                if choose is None:
                    raise ValueError("--init-draws > 1 scores its draws: pass `choose` (mctool.distill.draws)")
                choice = choose(draws)
                chosen, record = choice.chosen, {"init_draws": choice.to_dict()}
            else:
                record = {"init_draws": {"chosen": chosen}}
            picks = draws[chosen]
        images = prepared.train_x[picks.to(device)]
    # Every learnable's initial value (mctool.distill.learnables): drawn here, or its own rule;
    # momentum starts at zero.
    drawn: dict[str, Value] = {"images": images.to(device)}
    if cfg.learn_labels:
        if expert is None:
            raise ValueError("learned labels start from an expert's logits: pass `expert`")
        drawn["labels"] = expert_logits(expert, drawn["images"]).float()
    values = {e.name: drawn[e.name] if e.initial is None else e.initial(cfg) for e in learned_in(cfg)}
    # `--ema`: each average starts at the initial value (no bias correction needed: learnables.ema_update).
    averages = {e.name: _clone(values[e.name]) for e in learned_in(cfg) if averaged(e, cfg)}
    state = State(values=values, velocities={k: zero_like(v) for k, v in values.items()}, labels=labels.to(device),
                  iteration=0, generators=[], queues=[], averages=averages, run=record)
    state.sync_labels()
    return state


def _clone(value: Value) -> Value:
    return value.clone() if isinstance(value, torch.Tensor) else value
