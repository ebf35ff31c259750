"""Networks trained together (mctool.training.ensemble) equal the same networks trained one after another."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from mctool.store import DatasetMeta
from mctool.data.augment import DSA, OPS, AugParams
from mctool.data.datasets import Dataset, Preprocessing
from mctool.training.ensemble import (
    StackedNet,
    _augment,
    group_sizes,
    plan_groups,
    stackable,
    train_many,
    train_stacked,
    training_bytes,
)
from mctool.core.errors import TrainingDiverged
from mctool.evaluate.evaluation import EvaluateConfig, evaluate_set
from mctool.models import ModelSpec, build_model, spec_for
from mctool.data.prepared import Prepared
from mctool.core.progress import Reporter
from mctool.training.train import Schedule, accuracy, train
from tests.devices import rtol

F64 = torch.float64
SEEDS = [11, 12, 13]
# Momentum, weight decay, a midpoint decay with momentum reset and a short last batch (20 = 8+8+4).
SCHEDULE = Schedule(epochs=4, lr=0.02, momentum=0.9, weight_decay=5e-4, batch_size=8, decay_epoch=2)

# name -> (architecture, data shape (channels, size))
ARCHS = {
    "ConvNet": ("ConvNet", (3, 16)),
    "ConvNetBN": ("ConvNetBN", (3, 16)),
    "ConvNetLN": ("ConvNetLN", (3, 16)),
    "ConvNetGN": ("ConvNetGN", (3, 16)),
    "ConvNetMP-28px": ("ConvNetMP", (1, 28)),
    "ConvNetNN-sigmoid": ("ConvNetNN", (3, 16)),
    "MLP": ("MLP", (1, 28)),
    "LeNet": ("LeNet", (1, 28)),
}


def spec_of(key: str) -> ModelSpec:
    arch, (channels, size) = ARCHS[key]
    base = ModelSpec(width=8, channels=channels, im_size=(size, size), num_classes=4)
    if key.endswith("sigmoid"):
        base = dataclasses.replace(base, act="sigmoid")
    return spec_for(arch, base)


def data(spec: ModelSpec, device: torch.device, dtype: torch.dtype = F64, n: int = 20,
         soft: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, spec.channels, *spec.im_size, generator=g, dtype=dtype)
    y = torch.arange(n) % spec.num_classes
    if soft:
        y = torch.softmax(torch.randn(n, spec.num_classes, generator=g, dtype=dtype) * 2, 1)
    return x.to(device), y.to(device)


def fresh(spec: ModelSpec, device: torch.device, dtype: torch.dtype = F64) -> list[nn.Module]:
    return [build_model(spec, seed=s).to(device, dtype) for s in SEEDS]


def gens() -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in SEEDS]


def max_rel_diff(a: list[nn.Module], b: list[nn.Module]) -> float:
    """Largest relative difference over every parameter and floating buffer (BatchNorm stats)."""
    worst = 0.0
    for ma, mb in zip(a, b):
        sa, sb = ma.state_dict(), mb.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            if sa[k].is_floating_point():
                scale = float(sa[k].abs().max()) or 1.0
                worst = max(worst, float((sa[k] - sb[k]).abs().max()) / scale)
    return worst


def same_counters(a: list[nn.Module], b: list[nn.Module]) -> bool:
    """BatchNorm step counters (the integer buffers) equal."""
    return all(torch.equal(v, mb.state_dict()[k]) for ma, mb in zip(a, b)
               for k, v in ma.state_dict().items() if not v.is_floating_point())


def sequential(models: list[nn.Module], x: torch.Tensor, y: torch.Tensor, schedule: Schedule = SCHEDULE,
               augment: DSA | None = None) -> list[list[float]]:
    return [train(m, x, y, schedule, augment, g) for m, g in zip(models, gens())]


@pytest.mark.parametrize("key", list(ARCHS))
def test_stacked_equals_sequential_float64(key: str, device: torch.device) -> None:
    spec = spec_of(key)
    assert stackable(build_model(spec, seed=0))
    x, y = data(spec, device)
    seq, tog = fresh(spec, device), fresh(spec, device)
    losses_seq = sequential(seq, x, y, augment=DSA(flip=spec.channels == 3))
    losses_tog = train_stacked(tog, x, y, SCHEDULE, DSA(flip=spec.channels == 3), gens())
    # Grouped kernels add in another order: float64 rounding only, after 12 steps.
    assert max_rel_diff(seq, tog) < 1e3 * rtol(device, F64) and same_counters(seq, tog)
    # Epoch losses are accumulated in float32 by both loops (as train() does).
    torch.testing.assert_close(torch.tensor(losses_tog), torch.tensor(losses_seq), rtol=1e-6, atol=0)
    # Not a vacuous comparison: the networks moved and differ from each other.
    assert max_rel_diff(seq, fresh(spec, device)) > 1e-3
    assert max_rel_diff(seq[:1], seq[1:2]) > 1e-2
    xt, yt = data(spec, device, n=40)
    assert [accuracy(m, xt, yt) for m in seq] == [accuracy(m, xt, yt) for m in tog]


def test_generators_end_where_sequential_leaves_them(device: torch.device) -> None:
    spec = spec_of("ConvNet")
    x, y = data(spec, device)
    g_seq, g_tog = gens(), gens()
    for m, g in zip(fresh(spec, device), g_seq):
        train(m, x, y, SCHEDULE, DSA(), g)
    train_stacked(fresh(spec, device), x, y, SCHEDULE, DSA(), g_tog)
    for a, b in zip(g_seq, g_tog):  # exactly the same number and kind of draws
        assert torch.equal(a.get_state(), b.get_state())


def test_soft_labels_and_no_augmentation(device: torch.device) -> None:
    spec = spec_of("ConvNet")
    x, y = data(spec, device, soft=True)
    seq, tog = fresh(spec, device), fresh(spec, device)
    sequential(seq, x, y)
    train_stacked(tog, x, y, SCHEDULE, None, gens())
    assert max_rel_diff(seq, tog) < 1e3 * rtol(device, F64)


def test_float32_differs_by_rounding_only(device: torch.device) -> None:
    # In float32 the sums in another order round differently, and training amplifies any
    # rounding (measured: 1-ulp-apart initial weights drift ~4e-3 apart in 10 steps). So the
    # bound is what one rounding of the initial weights grows to in the same training: float32's
    # unit roundoff on the CPU, TF32's (10 mantissa bits, CUDA convolutions) on a GPU.
    eps = 2.0 ** -23 if device.type == "cpu" else 2.0 ** -10
    spec = spec_of("ConvNet")
    x, y = data(spec, device, torch.float32)
    seq, tog, nudged = (fresh(spec, device, torch.float32) for _ in range(3))
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for m in nudged:
            for p in m.parameters():
                p.mul_(1 + eps * torch.randn(p.shape, generator=g).sign().to(device))
    for models in (seq, nudged):
        sequential(models, x, y, augment=DSA())
    train_stacked(tog, x, y, SCHEDULE, DSA(), gens())
    rounding = max_rel_diff(seq, nudged)
    assert max_rel_diff(seq, tog) <= 10 * rounding + rtol(device, torch.float32)
    print(f"float32 on {device}: together vs sequential {max_rel_diff(seq, tog):.1e}, "
          f"1-rounding-apart starts {rounding:.1e}")


def test_augment_grouped_by_op_equals_one_call_per_network(device: torch.device) -> None:
    dsa = DSA()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 7, 3, 12, 12, generator=g, dtype=F64).to(device)  # B×R×C×H×W
    draws = [dsa.sample(5, 12, 12, g) for _ in range(7)]  # 7 draws of 6 ops: some networks share one
    draws[1] = AugParams("none")
    out = _augment(dsa, x, draws)
    for r, p in enumerate(draws):
        torch.testing.assert_close(out[:, r], dsa.apply(x[:, r], p), rtol=0, atol=1e-12)
    assert {d.op for d in draws} - {"none"} <= set(OPS)


def test_divergence_raises_like_train(device: torch.device) -> None:
    spec = spec_of("ConvNet")
    x, y = data(spec, device)
    huge = dataclasses.replace(SCHEDULE, lr=1e12, momentum=0.0)
    with pytest.raises(TrainingDiverged) as seq_err:
        train(fresh(spec, device)[0], x, y, huge, None, gens()[0])
    with pytest.raises(TrainingDiverged) as tog_err:
        train_stacked(fresh(spec, device), x, y, huge, None, gens())
    assert str(tog_err.value) == str(seq_err.value)


def test_modules_are_views_of_the_stack(device: torch.device) -> None:
    spec = spec_of("ConvNetBN")
    models = fresh(spec, device)
    before = [m.features[0].weight.detach().clone() for m in models]
    net = StackedNet(models)
    for m, b in zip(models, before):  # building keeps every network's values
        assert torch.equal(m.features[0].weight, b)
    with torch.no_grad():
        net.params[0].add_(1.0)  # the first conv's stacked weight
    for m, b in zip(models, before):
        assert torch.equal(m.features[0].weight, b + 1.0)
    x = torch.randn(6, 3, spec.channels, *spec.im_size, dtype=F64, device=device)
    logits = net(x)
    assert logits.shape == (3, 6, spec.num_classes)
    for r, m in enumerate(models):  # train-mode forward of each module on its own images
        expect = m.train()(x[:, r])
        torch.testing.assert_close(logits[r], expect, rtol=1e-10, atol=1e-12)


class Odd(nn.Module):
    """A network the stacker does not know (its forward is not a plain chain)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3 * 16 * 16, 4)
        self.b = nn.Linear(3 * 16 * 16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x.flatten(1)) * torch.sigmoid(self.b(x.flatten(1)))


def test_unstackable_networks_train_one_after_another(device: torch.device) -> None:
    assert not stackable(Odd())
    assert not stackable(build_model(spec_for("ResNet18", ModelSpec(channels=1, im_size=(8, 8))), seed=0))
    spec = spec_of("ConvNet")
    x, y = data(spec, device)

    def odd() -> list[nn.Module]:
        out = []
        for s in SEEDS:
            torch.manual_seed(s)
            out.append(Odd().to(device, F64))
        return out

    seq, many = odd(), odd()
    sequential(seq, x, y, augment=DSA())
    train_many(many, x, y, SCHEDULE, DSA(), gens(), together=True)
    assert max_rel_diff(seq, many) == 0.0  # the very same loop
    with pytest.raises(ValueError):
        StackedNet(odd())


@pytest.mark.parametrize("limit", [None, 2, 1])
def test_train_many_in_groups_equals_sequential(limit: int | None, device: torch.device) -> None:
    spec = spec_of("ConvNet")
    x, y = data(spec, device)
    seq, many = fresh(spec, device), fresh(spec, device)
    losses_seq = sequential(seq, x, y, augment=DSA())
    seen: list[tuple[int, int]] = []
    losses = train_many(many, x, y, SCHEDULE, DSA(), gens(), together=True, max_together=limit,
                        on_epoch=lambda r, e, loss: seen.append((r, e)))
    assert max_rel_diff(seq, many) < 1e3 * rtol(device, F64)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(losses_seq), rtol=1e-6, atol=0)
    assert sorted(seen) == [(r, e) for r in range(3) for e in range(1, 5)]


def test_group_sizes_and_memory_estimate() -> None:
    assert group_sizes(5, 100, None) == [5]
    assert group_sizes(5, 100, 10_000) == [5]
    assert group_sizes(5, 100, 250) == [2, 2, 1]
    assert group_sizes(5, 100, 50) == [1] * 5  # one network always runs, even if it does not fit
    assert group_sizes(5, 100, None, limit=3) == [3, 2]
    assert group_sizes(1, 100, 50) == [1]
    model = build_model(ModelSpec(width=16), seed=0)
    one, two = training_bytes(model, (3, 32, 32), 10), training_bytes(model, (3, 32, 32), 20)
    weights = 4 * sum(p.numel() for p in model.parameters()) * 4
    # Linear in the batch: activations (first conv alone: 16×32×32 per image) plus a fixed part.
    assert two - one == one - weights > 2 * 10 * 16 * 32 * 32 * 4


def test_plan_groups() -> None:
    conv = [build_model(ModelSpec(width=4, channels=1, im_size=(8, 8)), seed=s) for s in range(5)]
    x = torch.zeros(20, 1, 8, 8)
    assert plan_groups(conv, x, SCHEDULE) == [1] * 5  # CPU default: one after another
    assert plan_groups(conv, x, SCHEDULE, together=True) == [5]
    assert plan_groups(conv, x, SCHEDULE, together=True, max_together=4) == [3, 2]
    assert plan_groups([Odd() for _ in range(3)], torch.zeros(20, 3, 16, 16), SCHEDULE, together=True) == [1] * 3


# --------------------------------------------------------------------------- evaluate_set


def prepared_like(spec: ModelSpec, device: torch.device, flip: bool = True) -> Prepared:
    g = torch.Generator().manual_seed(5)
    c, (h, w), k = spec.channels, spec.im_size, spec.num_classes
    ds = Dataset(name="random", train_images=torch.randint(0, 256, (20, c, h, w), generator=g, dtype=torch.uint8),
                 train_labels=torch.arange(20) % k,
                 test_images=torch.randint(0, 256, (60, c, h, w), generator=g, dtype=torch.uint8),
                 test_labels=torch.arange(60) % k, class_names=[str(i) for i in range(k)],
                 mean=(0.5,) * c, std=(0.25,) * c, flip=flip)
    prep = Preprocessing(kind="normalize", mean=torch.full((c,), 0.5), std=torch.full((c,), 0.25))
    meta = DatasetMeta(name=ds.name, num_classes=k, channels=c, height=h, width=w, zca=False, zca_eps=0.0,
                       mean=ds.mean, std=ds.std, class_names=tuple(ds.class_names),
                       train_fingerprint=ds.fingerprint(), flip=flip)
    return Prepared(dataset=ds, prep=prep, meta=meta,
                    train_x=prep.apply(ds.train_images, device=device).to(torch.get_default_dtype()),
                    train_y=ds.train_labels.to(device),
                    test_x=prep.apply(ds.test_images, device=device).to(torch.get_default_dtype()),
                    test_y=ds.test_labels.to(device))


class Recorder(Reporter):
    """Counts the progress events per task."""

    def __init__(self) -> None:
        self.updates: dict[str, int] = {}
        self.done_keys: list[str] = []
        self.logs: list[str] = []

    def task(self, key: str, description: str, total: int | None) -> None:
        self.updates[key] = 0

    def update(self, key: str, advance: int = 0, **fields: object) -> None:
        self.updates[key] += advance

    def done(self, key: str) -> None:
        self.done_keys.append(key)

    def log(self, message: str) -> None:
        self.logs.append(message)


@pytest.fixture
def float64_default() -> "object":
    """Networks built by evaluate_set in float64, so together and sequential agree to ~1e-14."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    yield
    torch.set_default_dtype(old)


@pytest.mark.usefixtures("float64_default")
def test_evaluate_set_together_equals_one_after_another(device: torch.device) -> None:
    spec = ModelSpec(width=8, channels=3, im_size=(16, 16), num_classes=4)
    prepared = prepared_like(spec, device)
    images = prepared.train_x[:12]
    labels = prepared.train_y[:12]
    cfg = EvaluateConfig(models=("ConvNet", "ConvNetBN", "MLP"), runs=3, epochs=4, batch_size=8)
    rep_seq, rep_tog = Recorder(), Recorder()
    seq = evaluate_set(images, labels, 0.05, prepared, spec, dataclasses.replace(cfg, together=False), reporter=rep_seq)
    tog = evaluate_set(images, labels, 0.05, prepared, spec, dataclasses.replace(cfg, together=True), reporter=rep_tog)
    for a, b in zip(seq, tog):
        da, db = a.to_dict(), b.to_dict()
        for key in ("date", "seconds_per_run", "config"):
            da.pop(key), db.pop(key)
        assert da == db  # accuracies, seeds: the same results
    assert len({tuple(r.accuracies) for r in seq}) == 3  # three models, three outcomes
    assert rep_seq.updates == rep_tog.updates == {f"eval-{m}-{r}": 4 for m in cfg.models for r in range(3)}
    assert rep_seq.logs == rep_tog.logs and len(rep_tog.logs) == 9


def test_evaluate_set_default_is_sequential_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    # On the CPU R grouped kernels are slower than R plain ones (bench/README.md), so the
    # default keeps one network after another there.
    import mctool.training.ensemble as ensemble

    calls: list[int] = []

    def spy(models: list[nn.Module], *args: object, **kwargs: object) -> list[list[float]]:
        calls.append(len(models))
        return [[0.0] for _ in models]

    monkeypatch.setattr(ensemble, "train_stacked", spy)
    spec = ModelSpec(width=4, channels=1, im_size=(8, 8), num_classes=2)
    prepared = prepared_like(spec, torch.device("cpu"), flip=False)
    cfg = EvaluateConfig(runs=2, epochs=1)
    evaluate_set(prepared.train_x[:4], prepared.train_y[:4], 0.01, prepared, spec, cfg)
    assert calls == []
    evaluate_set(prepared.train_x[:4], prepared.train_y[:4], 0.01, prepared, spec, dataclasses.replace(cfg, together=True))
    assert calls == [2]


def test_stacking_keeps_every_network_on_its_own_device_and_dtype(device: torch.device) -> None:
    spec = spec_of("ConvNet")
    models: list[nn.Module] = fresh(spec, device, torch.float32)
    StackedNet(models)
    for m in models:
        for p in m.parameters():
            assert p.device.type == device.type and p.dtype == torch.float32 and p.requires_grad
