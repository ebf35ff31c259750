"""mctool.training.train: the one SGD loop, against a hand-written reference in float64."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mctool.data.augment import DSA
from mctool.core.errors import TrainingDiverged, UsageError
from mctool.training.train import Schedule, accuracy, train

N, D, C = 10, 5, 3  # examples, features, classes: batches of 4 leave a last batch of 2


def data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, D, generator=g, dtype=torch.float64), torch.randint(0, C, (N,), generator=g)


def linear(seed: int = 1) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(D, C).double()


def reference(model: nn.Linear, x: torch.Tensor, y: torch.Tensor, s: Schedule, seed: int,
              noise: float = 0.0, reset: bool = True) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """SGD written out: softmax cross-entropy gradients by hand, g = ∇ + wd·θ, v = μ·v + g (v = g
    at the first step), θ -= lr·v; after `decay_epoch`, lr × 0.1 and v forgotten. With `noise`,
    each batch gets N(0, noise²) added, drawn from the generator after the shuffle (as an
    augmentation would)."""
    w, b = model.weight.detach().clone(), model.bias.detach().clone()
    vw = vb = None
    lr = s.lr
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for epoch in range(1, s.epochs + 1):
        order = torch.randperm(N, generator=gen)
        total = 0.0
        for start in range(0, N, s.batch_size):
            idx = order[start:start + s.batch_size]
            xb, yb = x[idx], y[idx]
            if noise:
                xb = xb + noise * torch.randn(xb.shape, generator=gen, dtype=xb.dtype)
            logits = xb @ w.T + b
            p = torch.exp(logits - logits.max(1, keepdim=True).values)
            p = p / p.sum(1, keepdim=True)
            total += float(-torch.log(p[torch.arange(len(idx)), yb]).sum())
            dlogits = (p - torch.eye(C, dtype=torch.float64)[yb]) / len(idx)
            gw, gb = dlogits.T @ xb + s.weight_decay * w, dlogits.sum(0) + s.weight_decay * b
            vw = gw if vw is None else s.momentum * vw + gw
            vb = gb if vb is None else s.momentum * vb + gb
            w, b = w - lr * vw, b - lr * vb
        losses.append(total / N)
        if s.decay_epoch is not None and epoch == s.decay_epoch:
            lr *= 0.1
            if reset:
                vw = vb = None
    return w, b, losses


@pytest.mark.parametrize("schedule", [
    Schedule(epochs=3, lr=0.3, batch_size=4),
    Schedule(epochs=4, lr=0.2, momentum=0.9, weight_decay=0.05, batch_size=4, decay_epoch=2),
    Schedule(epochs=3, lr=0.1, momentum=0.5, batch_size=N, decay_epoch=1),
], ids=["plain", "momentum-wd-decay", "full-batch-decay-first"])
def test_train_matches_hand_written_sgd(schedule: Schedule) -> None:
    x, y = data()
    model = linear()
    w, b, losses = reference(model, x, y, schedule, seed=5)
    got = train(model, x, y, schedule, None, torch.Generator().manual_seed(5))
    torch.testing.assert_close(model.weight.detach(), w, rtol=0, atol=1e-12)
    torch.testing.assert_close(model.bias.detach(), b, rtol=0, atol=1e-12)
    # The epoch's loss is summed in a float32 accumulator (the default dtype), whatever the model's.
    assert got == pytest.approx(losses, rel=1e-6)


def test_momentum_reset_at_the_decay_matters() -> None:
    """Keeping the momentum across the decay gives other weights: the test above tells them apart."""
    x, y = data()
    s = Schedule(epochs=4, lr=0.2, momentum=0.9, batch_size=4, decay_epoch=2)
    model = linear()
    kept, _, _ = reference(model, x, y, s, seed=5, reset=False)
    train(model, x, y, s, None, torch.Generator().manual_seed(5))
    assert (model.weight.detach() - kept).abs().max() > 1e-3


def test_shuffles_and_augmentation_come_from_the_generator() -> None:
    x, y = data()
    s = Schedule(epochs=2, lr=0.1, momentum=0.9, batch_size=4)
    seen = []

    def augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        seen.append(generator)
        return batch + 0.1 * torch.randn(batch.shape, generator=generator, dtype=batch.dtype)

    model = linear()
    w, b, _ = reference(model, x, y, s, seed=9, noise=0.1)
    gen = torch.Generator().manual_seed(9)
    global_state = torch.get_rng_state()
    train(model, x, y, s, augment, gen)  # type: ignore[arg-type]
    assert all(g is gen for g in seen) and len(seen) == 2 * math.ceil(N / 4)
    assert torch.equal(torch.get_rng_state(), global_state)  # the global RNG is never drawn from
    torch.testing.assert_close(model.weight.detach(), w, rtol=0, atol=1e-12)
    torch.testing.assert_close(model.bias.detach(), b, rtol=0, atol=1e-12)


def test_same_generator_seed_same_network_with_real_dsa() -> None:
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(12, 1, 8, 8, generator=g), torch.randint(0, C, (12,), generator=g)
    s = Schedule(epochs=2, lr=0.05, momentum=0.9, batch_size=5)

    def run(seed: int) -> torch.Tensor:
        torch.manual_seed(3)
        net = nn.Sequential(nn.Flatten(), nn.Linear(64, C))
        train(net, images, labels, s, DSA("color_crop_cutout_flip_scale_rotate"), torch.Generator().manual_seed(seed))
        return torch.cat([p.detach().flatten() for p in net.parameters()])

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_callbacks_and_soft_labels() -> None:
    x, _ = data()
    soft = torch.softmax(torch.randn(N, C, generator=torch.Generator().manual_seed(2), dtype=torch.float64), 1)
    epochs, batches = [], []
    losses = train(linear(), x, soft, Schedule(epochs=3, lr=0.1, batch_size=4), None, torch.Generator().manual_seed(0),
                   on_epoch=lambda e, loss: epochs.append((e, loss)), on_batch=lambda: batches.append(1))
    assert [e for e, _ in epochs] == [1, 2, 3] and [loss for _, loss in epochs] == losses
    assert len(batches) == 3 * math.ceil(N / 4)
    assert all(math.isfinite(v) and v > 0 for v in losses)


def test_a_non_finite_loss_raises_training_diverged() -> None:
    x, y = data()
    x[3, 0] = float("nan")
    with pytest.raises(TrainingDiverged, match=r"training loss became nan in epoch 1 \(lr 0.1\); try a smaller --lr"):
        train(linear(), x, y, Schedule(epochs=2, lr=0.1, batch_size=4), None, torch.Generator().manual_seed(0))
    model = linear()

    def poison(epoch: int, loss: float) -> None:  # weights gone bad after a good first epoch
        with torch.no_grad():
            model.weight[0, 0] = float("inf")

    with pytest.raises(TrainingDiverged, match=r"became nan in epoch 2 \(lr 0.01\)"):
        train(model, data()[0], y, Schedule(epochs=3, lr=0.1, batch_size=4, decay_epoch=1), None,
              torch.Generator().manual_seed(0), on_epoch=poison)


class _Fixed(nn.Module):
    """Logits = the first C features of the input (so the argmax is chosen by the test)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :C]


def test_accuracy_counts_argmax_hits_in_batches_and_restores_the_mode() -> None:
    logits = torch.eye(C).repeat(4, 1)  # 12 rows, argmax cycles 0, 1, 2
    labels = torch.tensor([0, 1, 2] * 3 + [1, 1, 1])  # 9 hits + one hit (row 10: argmax 1)
    model = _Fixed().train()
    assert accuracy(model, logits, labels, batch_size=5) == pytest.approx(10 / 12)
    assert model.training
    model.eval()
    assert accuracy(model, logits, labels) == pytest.approx(10 / 12) and not model.training
    assert accuracy(model, logits[:0], labels[:0]) == 0.0


@pytest.mark.parametrize("field, value, message", [
    ("epochs", -1, "--epochs must be >= 0"), ("lr", 0.0, "--lr must be a finite number > 0"),
    ("lr", float("nan"), "--lr must be a finite number > 0"), ("momentum", 1.0, "--momentum must be in [0, 1)"),
    ("weight_decay", -1e-4, "--weight-decay must be a finite number >= 0"), ("batch_size", 0, "--batch-size must be >= 1"),
])
def test_schedule_refuses_values_that_cannot_train(field: str, value: float, message: str) -> None:
    kwargs = {"epochs": 1, "lr": 0.1, field: value}
    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        Schedule(**kwargs)  # type: ignore[arg-type]
