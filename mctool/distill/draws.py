"""Choosing the starting draw (`distill --init-draws N`).

At ipc 10 on a small dataset the random real images a run starts from decide most of its result
(bench/README.md, "Choosing the starting draw"), and the validation split cannot see a bad draw:
a few hundred images score a draw to within a few points. The training images outside every
draw (and outside the validation split) are held out for networks trained on a draw — none of
them is in it — and there are many more of them, so each of N draws is scored there, by the
selection's protocol (--eval-runs networks × --eval-epochs at lr_init, the same network seeds
for every draw: the comparison is paired), and the run starts from the best."""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from mctool.core.errors import UsageError
from mctool.core.progress import Reporter
from mctool.data.prepared import Prepared
from mctool.models.spec import ModelSpec

# Scoring more images than this sharpens a draw's score little (at 5,000 images the sampling error
# of an accuracy is below 0.7 points) and costs inference time on large datasets.
MAX_SCORING_IMAGES = 5000


@dataclass
class DrawChoice:
    """Which of a run's starting draws it started from, and why (stored in the checkpoint's `run`
    record as `init_draws`, reported by `--json`)."""

    chosen: int  # 0-based index of the draw the run starts from
    scores: list[float]  # each draw's mean accuracy on the scoring images
    scored_on: int  # how many training images scored them
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"chosen": self.chosen, "scores": self.scores, "scored_on": self.scored_on,
                "seconds": round(self.seconds, 3)}


Choose = Callable[[list[torch.Tensor]], DrawChoice]


def scoring_indices(num_train: int, draws: list[torch.Tensor], pool: torch.Tensor | None) -> torch.Tensor:
    """The training indices that score the draws: those of `pool` (the run's training images,
    default all; the validation split is not in it) in none of `draws`, at most
    MAX_SCORING_IMAGES of them evenly spaced (deterministic: the run's generator is not touched)."""
    allowed = torch.zeros(num_train, dtype=torch.bool)
    allowed[pool.cpu() if pool is not None else slice(None)] = True
    for picks in draws:
        allowed[picks.cpu()] = False
    rest = torch.nonzero(allowed).flatten()
    if rest.numel() > MAX_SCORING_IMAGES:
        rest = rest[torch.linspace(0, rest.numel() - 1, MAX_SCORING_IMAGES).round().long()]
    return rest


def draw_chooser(prepared: Prepared, spec: ModelSpec, protocol: Any, lr: float, labels: torch.Tensor,
                 pool: torch.Tensor | None, reporter: Reporter) -> Choose:
    """A `Choose` for `initial_state`: trains `protocol`'s networks (an EvaluateConfig) at `lr` on
    each draw's images with `labels` (hard, class-major) and returns the best draw's index (the
    first among equal scores)."""
    from mctool.evaluate.evaluation import evaluate_set

    def choose(draws: list[torch.Tensor]) -> DrawChoice:
        started = time.perf_counter()
        rest = scoring_indices(int(prepared.train_y.numel()), draws, pool).to(prepared.train_x.device)
        if rest.numel() == 0:
            raise UsageError(f"--init-draws {len(draws)}: no training image is left outside the draws to score "
                             "them on; give fewer draws or a smaller --ipc")
        key = _key(prepared, spec, protocol, lr, labels, draws, rest)
        if key in _CHOICES:  # the same draws scored the same way (a --tune search's candidates): no work
            return dataclasses.replace(_CHOICES[key], seconds=0.0)
        held = (prepared.train_x[rest], prepared.train_y[rest])
        scores = []
        for i, picks in enumerate(draws):
            images = prepared.train_x[picks.to(prepared.train_x.device)]
            scored = evaluate_set(images, labels, lr, prepared, spec, protocol, f"starting draw {i + 1}/{len(draws)}",
                                  reporter, score_on=held, split="training images outside the draws")[0]
            scores.append(float(scored.mean))
        chosen = max(range(len(scores)), key=lambda i: (scores[i], -i))
        choice = DrawChoice(chosen=chosen, scores=scores, scored_on=int(rest.numel()),
                            seconds=time.perf_counter() - started)
        if len(_CHOICES) >= _KEEP_CHOICES:
            _CHOICES.pop(next(iter(_CHOICES)))
        _CHOICES[key] = choice
        return choice

    return choose


# This process's choices by what they depend on: `--tune`'s candidates share the seed, so they draw
# and score the same sets (deterministic on the CPU), and scoring them once per candidate would
# spend the search's budget on the same answer.
_CHOICES: dict[str, DrawChoice] = {}
_KEEP_CHOICES = 16


def _key(prepared: Prepared, spec: ModelSpec, protocol: Any, lr: float, labels: torch.Tensor,
         draws: list[torch.Tensor], rest: torch.Tensor) -> str:
    """A digest of everything a choice depends on: the data, the networks and how they train, the
    draws and the images that score them."""
    digest = hashlib.sha256(repr((prepared.meta, str(prepared.train_x.device), spec, protocol, float(lr))).encode())
    for t in (labels, rest, *draws):
        digest.update(t.detach().cpu().numpy().tobytes())
        digest.update(b"|")
    return digest.hexdigest()
