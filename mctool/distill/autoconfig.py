"""Distillation settings for a buffer no preset was made for, read off Table A by rule.

`mctool distill` without `--preset` takes these from the buffer (its dataset's image size,
classes and training-set size, the experts' K, learning rate and batch size) and says which
it chose; `mctool distill --tune` searches around them (mctool/distill/tune.py). The rules, each
fitted to Table A of the MCT supplement (K = 50 experts; our Fashion-MNIST presets, tuned on
K = 6 experts, as a fourth image size):

* expert_epochs M = K/3 rounded, between 1 and 5. Table A uses 5 (4 for Tiny ImageNet) of
  K = 50; our K = 6 presets use 2. A target never lies beyond a third of the trajectory.
* syn_steps N = 10 · round(0.8 · M), at least 10, and at most the experts' SGD steps in M
  epochs (synthetic steps stand in for real ones; more of them than the real steps they
  replace only costs time). Table A: 40 at M = 5 (30–50), 30 at M = 4; ours 20 at M = 2.
* max_start_epoch = f(n) · K, where n = ipc × classes is the number of synthetic images and
  f interpolates Table A's max_ep / K in log10 n: 0.08 at n = 10 (CIFAR-10 ipc 1), 0.2 at
  n = 100 (CIFAR-10 ipc 10 and CIFAR-100 ipc 1 alike), 0.6 at n = 500, 0.8 from n = 1000 on
  (Tiny ImageNet ipc 1, 0.1 at n = 200, is the one point off the curve). Few images can only
  match the early, fast part of training (MTT's finding); at most K − M, so a target stays
  on the trajectory.
* lr_img = 1e3 · (D / 3072)^1.66, D = channels × height × width: through Table A's 1e3 at
  3×32×32 and 1e4 at 3×64×64 and our 1e2 at 1×28×28 (three points on one power law, in the
  released code's step units). Below D = 784 the law is extrapolated: measured at ipc 1 on
  Fashion-MNIST shrunk to 1×14×14 (the rule's 10 within a point of the best decade, 100) and
  to 1×8×8 with the default depth-2 ConvNet (the rule's 1.6 +27 over random real, 16 +28,
  0.016 +9; bench/README.md, "The lr_img size rule below 28×28" — a depth-3 net, whose last
  block sees 2×2 maps there, needed 100× less); above D = 12288 it is clamped to 1e4, with
  nothing measured beyond. Either way the note says the value is a guess — use `--tune`.
* lr_lr = 1e-5 · lr_img / 1e3: Table A's 1e-5 at lr_img 1e3 and 1e-4 at 1e4, ours 1e-6 at 1e2.
* lr_init = the experts' learning rate (Table A's 1e-2 is the MTT buffers' 0.01): the
  learned step size starts where the experts' steps were.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # only for annotations: `--list-presets` reads RULED without importing h5py and torch
    from mctool import store

# Table A's max_ep / K against log10(ipc × classes): (log10 n, fraction of K).
_START_FRACTION = ((1.0, 0.08), (2.0, 0.2), (math.log10(500), 0.6), (3.0, 0.8))
# lr_img power law through (D, lr_img): (3072, 1e3) and (12288, 1e4); (784, 1e2) lies on it.
_LR_D0, _LR_0, _LR_EXP = 3072, 1e3, math.log(10) / math.log(4)
_LR_D_RANGE = (784, 12288)

# The settings the rules choose (the rest keep the built-in defaults or the buffer's values).
RULED = ("syn_steps", "expert_epochs", "max_start_epoch", "lr_img", "lr_lr", "lr_init")
# The ruled settings a rule computes from another (which it takes from the rules, not from an option).
_RULE_INPUT = {"syn_steps": "expert_epochs", "max_start_epoch": "expert_epochs", "lr_lr": "lr_img"}


@dataclass(frozen=True)
class BufferFacts:
    """What the rules read from a buffer."""

    dataset: str
    classes: int
    channels: int
    height: int
    width: int
    K: int  # the experts' epochs (the last waypoint of a convexified buffer)
    train_images: int | None = None  # None: unknown (a folder that is not there any more)
    expert_lr: float | None = None
    expert_batch: int | None = None

    @property
    def pixels(self) -> int:
        """D = channels × height × width."""
        return self.channels * self.height * self.width

    @property
    def steps_per_epoch(self) -> int | None:
        """The experts' SGD steps per epoch, when the training-set size and batch are known."""
        if not self.train_images or not self.expert_batch:
            return None
        return -(-self.train_images // self.expert_batch)


@dataclass(frozen=True)
class Choice:
    """Chosen values with one short reason each."""

    values: dict[str, Any]
    reasons: dict[str, str] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()


def train_images(dataset: str) -> int | None:
    """The training-set size of a dataset, without decoding it (a folder: its files counted)."""
    if dataset.lower().startswith("folder:"):
        from mctool.data.datasets import count_folder_images

        return count_folder_images(dataset[len("folder:"):], "train")
    from mctool.data.datasets import SPLIT_SIZES

    split = SPLIT_SIZES.get(dataset)
    return None if split is None else split[0]


def facts(buffer: store.Buffer) -> BufferFacts:
    """The buffer's facts (K from /convex when complete, else /experts)."""
    d = buffer.data
    info = buffer.experts
    if buffer.convex_state == "complete":
        K = int(buffer.convex.meta.epochs)
    elif info is not None:
        K = int(info.epochs)
    else:
        K = 1
    lr = info.lr if info is not None and math.isfinite(info.lr) else None
    batch = info.batch_size if info is not None and info.batch_size > 0 else None
    return BufferFacts(dataset=d.name, classes=d.num_classes, channels=d.channels, height=d.height, width=d.width,
                       K=K, train_images=train_images(d.name), expert_lr=lr, expert_batch=batch)


def start_fraction(n: int) -> float:
    """Table A's max_ep / K for n synthetic images (piecewise linear in log10 n, flat outside)."""
    x = math.log10(max(1, n))
    pts = _START_FRACTION
    if x <= pts[0][0]:
        return pts[0][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[-1][1]


def image_lr(pixels: int) -> tuple[float, bool]:
    """(lr_img for images of `pixels` values, whether D lies inside the fitted range)."""
    lo, hi = _LR_D_RANGE
    d = min(pixels, hi)  # extrapolated below the fitted sizes, clamped above (module docstring)
    lr = _LR_0 * (d / _LR_D0) ** _LR_EXP
    return float(f"{lr:.2g}"), lo <= pixels <= hi


def suggest(f: BufferFacts, ipc: int) -> Choice:
    """The rules of the module docstring applied to `f` at `ipc` images per class."""
    reasons: dict[str, str] = {}
    warnings: list[str] = []
    M = min(5, max(1, round(f.K / 3)))
    reasons["expert_epochs"] = f"K/3 = {f.K}/3, between 1 and 5"
    N = max(10, 10 * round(0.8 * M))
    reasons["syn_steps"] = "10·round(0.8·M), Table A"
    spe = f.steps_per_epoch
    if spe is not None and M * spe < N:
        N = max(1, M * spe)
        reasons["syn_steps"] = f"the experts' {spe} step(s)/epoch × M"
    n = ipc * f.classes
    frac = start_fraction(n)
    start = round(min(frac * f.K, max(0.0, f.K - M)), 1)
    if start >= f.K:  # Distiller needs start < K
        start = max(0.0, f.K - 1.0)
    reasons["max_start_epoch"] = f"{frac:.2f}·K for {n} synthetic images (Table A), at most K − M"
    lr, fitted = image_lr(f.pixels)
    shape = f"{f.channels}×{f.height}×{f.width}"
    if fitted:
        reasons["lr_img"] = f"{shape} images, Table A's size rule"
    else:
        how = "extrapolated" if f.pixels < _LR_D_RANGE[0] else "clamped"
        reasons["lr_img"] = f"{shape} images lie outside Table A's sizes: the size rule {how}"
        warnings.append(f"lr_img for {shape} images is a guess (no preset or Table A entry has that size): "
                        "`mctool distill --tune` finds a better one")
    lr_lr = float(f"{1e-5 * lr / 1e3:.2g}")
    reasons["lr_lr"] = "1e-5 · lr_img / 1e3, Table A"
    lr_init = f.expert_lr if f.expert_lr is not None else 1e-2
    reasons["lr_init"] = "the experts' lr" if f.expert_lr is not None else "Table A (the experts' lr is not stored)"
    values = {"syn_steps": int(N), "expert_epochs": float(M), "max_start_epoch": float(start), "lr_img": lr,
              "lr_lr": lr_lr, "lr_init": float(lr_init)}
    return Choice(values=values, reasons=reasons, warnings=tuple(warnings))


def describe(choice: Choice, cfg_values: dict[str, Any], given: set[str]) -> str:
    """One note: the values the rules chose (or that an option replaced) and why."""
    parts = []
    for key in RULED:
        if key in given:
            parts.append(f"{key} {_num(cfg_values[key])} (your option)")
        else:
            reason = choice.reasons.get(key, "rule")
            source = _RULE_INPUT.get(key)
            if source in given:  # the rule read its own value of the option's setting, not the option
                reason += f"; with the rules' {source} {_num(choice.values[source])}, not your option's"
            parts.append(f"{key} {_num(choice.values[key])} ({reason})")
    text = ("note: no --preset, so settings suit the buffer (rules from Table A, mctool/distill/autoconfig.py; "
            "`mctool distill --tune` searches around them): " + "; ".join(parts))
    if choice.warnings:
        text += ". " + " ".join(choice.warnings)
    return text


def _num(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)
