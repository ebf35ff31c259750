"""The learnables of a distillation as data: what is learned, how it is updated, bounded and stored.

Each `Learnable` names one learned quantity: its key in `State.values`/`State.velocities` and in
`MatchResult.grads` (mctool.matching.loss computes the gradient), the settings that hold its learning
rate and momentum, the bound beyond which an update is refused (divergence, docs/method.md), and
where the synset and its checkpoint store it (docs/format.md). The update (`Distiller.apply_update`),
the checkpoint and resume (mctool.distill.checkpoint) and the best images iterate over
`learned_in(cfg)`, so adding one is one entry here (with its initial value, unless it is drawn
from the data like the images: mctool.distill.state) and its gradient in each `--grad` mode
(mctool.matching.loss); new checkpoint state also declares its entry in store.CHECKPOINT_LEARNED.
A learnable opts in to `--ema` by naming its `ema_raw` checkpoint entry: the run then keeps an
exponential moving average of it, which takes the value's place in the synset (`averaged`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Union

import torch

from mctool.distill.config import DistillConfig

# A learnable's value or momentum: a tensor, or a Python float for a scalar (α, updated in double).
Value = Union[torch.Tensor, float]

IMAGE_BOUND = 1e3  # |pixel| in the whitened/normalised space; real images stay within ~±10
ALPHA_BOUND = 1e3  # α may grow to this multiple of lr_init
LABEL_BOUND = 1e4  # |label logit|: an expert's logits are O(10); softmax saturates long before


def _one(cfg: DistillConfig) -> float:
    return 1.0


def _always(cfg: DistillConfig) -> bool:
    return True


@dataclass(frozen=True)
class Learnable:
    """One learned quantity (see the module docstring)."""

    name: str  # key of State.values / State.velocities / MatchResult.grads
    lr: str  # the DistillConfig setting holding its learning rate
    momentum: str  # the DistillConfig setting holding its momentum
    bound: Callable[[DistillConfig], float]  # an update taking any |value| beyond this is refused
    stored: str | None  # the store.Synset (and store.BestImages) field holding its value; None: not in the synset
    velocity: str  # the checkpoint entry (store.CHECKPOINT_LEARNED) holding its momentum
    saved: str | None = None  # a checkpoint entry holding the value itself, when the synset stores another form
    scalar: bool = False  # a Python float (updated in double precision), not a tensor
    grad_scale: Callable[[DistillConfig], float] = _one  # factor from MatchResult's gradient to the step's
    floor: float | None = None  # a step to or below floor × value is damped to that, and its momentum reset
    active: Callable[[DistillConfig], bool] = _always  # learned in this run (off: absent from state and files)
    initial: Callable[[DistillConfig], Value] | None = None  # its value at the start (None: drawn by initial_state)
    # Opts in to `--ema`: the checkpoint entry (store.CHECKPOINT_LEARNED) holding the raw value while the
    # synset field `stored` and the entry `saved` hold the average (see `averaged`); None: never averaged.
    ema_raw: str | None = None
    backs_off: bool = False  # its learning rate is the one `--lr-backoff` cuts (mctool.distill.runner)
    # Its value in the best images (store.BestImages), which a `--lr-backoff` cut goes back to
    # (None: the `stored` field as it is).
    from_best: Callable[[Any], Value] | None = None


LEARNABLES: tuple[Learnable, ...] = (
    Learnable("images", lr="lr_img", momentum="momentum_img", bound=lambda cfg: IMAGE_BOUND, stored="images",
              velocity="images_velocity", grad_scale=lambda cfg: cfg.image_grad_scale, ema_raw="images_raw",
              backs_off=True),
    # α is kept positive: a step that would halve it or flip its sign overshoots (damped, momentum reset).
    Learnable("alpha", lr="lr_lr", momentum="momentum_lr", bound=lambda cfg: ALPHA_BOUND * cfg.lr_init,
              stored="lr", velocity="alpha_velocity", scalar=True, floor=0.5, initial=lambda cfg: cfg.lr_init),
    # Learned soft labels (DATM, --learn-labels): the logits Z [n, classes]; the synset stores softmax(Z)
    # as its labels (State.labels), the checkpoint Z itself. Their step is the gradient as it is: the
    # released MCT code has no label gradient, so --step-units has nothing to halve here.
    Learnable("labels", lr="lr_label", momentum="momentum_label", bound=lambda cfg: LABEL_BOUND, stored=None,
              velocity="label_logits_velocity", saved="label_logits", active=lambda cfg: cfg.learn_labels,
              ema_raw="label_logits_raw", from_best=lambda best: logits_of(best.labels)),
)


def logits_of(probabilities: torch.Tensor) -> torch.Tensor:
    """Logits whose softmax gives `probabilities` back (up to rounding; zeros become ≈ e^-87)."""
    return torch.log(probabilities.clamp_min(torch.finfo(probabilities.dtype).tiny))


def best_value(entry: Learnable, best: Any) -> Value:
    """`entry`'s value in the best images `best` (a store.BestImages): a copy, as a new value."""
    value = entry.from_best(best) if entry.from_best is not None else getattr(best, str(entry.stored))
    return value.clone() if isinstance(value, torch.Tensor) else float(value)


def learned_in(cfg: DistillConfig) -> list[Learnable]:
    """The learnables this run learns, in update order."""
    return [entry for entry in LEARNABLES if entry.active(cfg)]


def averaged(entry: Learnable, cfg: DistillConfig) -> bool:
    """Whether this run keeps an exponential moving average of `entry` (`--ema`): then the average
    is what the synset stores, periodic evaluations score and the best images keep; the raw value
    (what the matching and the update use) lives in the checkpoint only."""
    return cfg.ema > 0 and entry.ema_raw is not None


def ema_update(average: Value, value: Value, decay: float) -> Value:
    """One step of the moving average after an applied update: decay · average + (1 − decay) · value.

    No bias correction: the average starts at the initial value, not at zero, so its weights
    (decay^t on the initial value, (1 − decay)·decay^(t−i) on the value after update i) already
    sum to 1 (docs/method.md, "EMA")."""
    if isinstance(average, torch.Tensor):
        return torch.lerp(average, value, 1.0 - decay)  # type: ignore[arg-type]
    return average + (1.0 - decay) * (float(value) - average)


def zero_like(value: Value) -> Value:
    """A momentum of zero for `value`."""
    return torch.zeros_like(value) if isinstance(value, torch.Tensor) else 0.0


def magnitude(value: Value) -> float:
    """max |value| (NaN if any entry is NaN; 0 for an empty tensor)."""
    if isinstance(value, torch.Tensor):
        return float(value.abs().max()) if value.numel() else 0.0
    return abs(float(value))


def learning_rate(entry: Learnable, cfg: DistillConfig, backoffs: int = 0) -> float:
    """`entry`'s learning rate after `backoffs` cuts by `--lr-backoff` (only a learnable that
    `backs_off` is cut)."""
    lr = float(getattr(cfg, entry.lr))
    return lr * cfg.lr_backoff ** backoffs if entry.backs_off and backoffs else lr


def step(entry: Learnable, cfg: DistillConfig, value: Value, velocity: Value,
         grad: Value, backoffs: int = 0) -> tuple[Value, Value] | None:
    """SGD with momentum for one learnable: (value, velocity) after the step, or None when the
    step leaves its bounds (non-finite or beyond `entry.bound`). `backoffs`: how often the run
    has cut the learning rate (`learning_rate`)."""
    if entry.scalar:
        grad = float(grad)  # MatchResult gives a 0-dim tensor
    velocity = velocity * getattr(cfg, entry.momentum) + grad * entry.grad_scale(cfg)
    new = value - learning_rate(entry, cfg, backoffs) * velocity
    if entry.floor is not None:
        assert entry.scalar, "a floor applies to scalar learnables"
        floor = entry.floor * value
        if not new > floor:  # also catches NaN
            new, velocity = floor, zero_like(velocity)
    size = magnitude(new)
    if not (math.isfinite(size) and size <= entry.bound(cfg)):
        return None
    return new, velocity
