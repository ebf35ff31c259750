"""One SGD training loop over on-device tensors, shared by `experts` and `evaluate`."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mctool.data.augment import DSA
from mctool.core.errors import TrainingDiverged, UsageError


@dataclass(frozen=True)
class Schedule:
    """Plain SGD; with `decay_epoch`, lr × 0.1 and a fresh optimizer (momentum reset) after that epoch."""

    epochs: int
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 256
    decay_epoch: int | None = None

    def __post_init__(self) -> None:
        # torch.optim would refuse these too, but as an "internal error"; NaN fails every check.
        checks = [("--epochs", self.epochs >= 0, ">= 0"),
                  ("--lr", math.isfinite(self.lr) and self.lr > 0, "a finite number > 0"),
                  ("--momentum", 0 <= self.momentum < 1, "in [0, 1)"),
                  ("--weight-decay", math.isfinite(self.weight_decay) and self.weight_decay >= 0,
                   "a finite number >= 0"),
                  ("--batch-size", self.batch_size >= 1, ">= 1")]
        for option, ok, requirement in checks:
            if not ok:
                raise UsageError(f"{option} must be {requirement}, got {getattr(self, option[2:].replace('-', '_'))}")


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    """Fraction of `images` whose argmax logit equals the (hard) label."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, images.shape[0], batch_size):
        logits = model(images[start:start + batch_size])
        correct += int((logits.argmax(1) == labels[start:start + batch_size]).sum())
    model.train(was_training)
    return correct / max(1, images.shape[0])


def _optimizer(model: nn.Module, schedule: Schedule, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=schedule.momentum,
                           weight_decay=schedule.weight_decay)


def train(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    schedule: Schedule,
    augment: DSA | None,
    generator: torch.Generator,
    on_epoch: Callable[[int, float], None] | None = None,
    on_batch: Callable[[], None] | None = None,
) -> list[float]:
    """Train `model` in place; returns the mean training loss of each epoch.

    Batches are index gathers into the on-device `images` (hard int64 or soft float
    labels); the shuffle order and augmentation draws come from the CPU `generator`, so a
    seeded run draws the same batches and augmentations on any device, and repeats bit for
    bit on the same CPU model with the same number of threads (not on CUDA: see the README).
    `on_epoch(epoch, loss)` runs after every epoch (1-based), e.g. to take a snapshot;
    `on_batch()` after every step (for progress bars: it gets no values, so it forces no
    device sync).
    """
    model.train()
    lr = schedule.lr
    opt = _optimizer(model, schedule, lr)
    n = images.shape[0]
    losses: list[float] = []
    for epoch in range(1, schedule.epochs + 1):
        order = torch.randperm(n, generator=generator).to(images.device)
        total = torch.zeros((), device=images.device)
        for start in range(0, n, schedule.batch_size):
            idx = order[start:start + schedule.batch_size]
            x = images[idx]
            if augment is not None:
                x = augment(x, generator)
            loss = F.cross_entropy(model(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * idx.numel()
            if on_batch is not None:
                on_batch()
        mean_loss = float(total) / n  # one device sync per epoch, not per batch
        if not math.isfinite(mean_loss):
            raise TrainingDiverged(f"training loss became {mean_loss} in epoch {epoch} (lr {lr:g}); "
                                   "try a smaller --lr")
        losses.append(mean_loss)
        if schedule.decay_epoch is not None and epoch == schedule.decay_epoch:
            lr *= 0.1
            opt = _optimizer(model, schedule, lr)  # momentum reset, as the reference protocol does
        if on_epoch is not None:
            on_epoch(epoch, mean_loss)
    return losses
