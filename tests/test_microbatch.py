"""Micro-batched matching (mctool.matching.loss's micro_batch, mctool.matching.microbatch, StepAugment).

Chunked inner steps must give the unchunked numbers in every mode, with and without DSA,
hard and soft labels, chunk sizes that do not divide the batch and duplicate indices within
a batch, through both second-order implementations. Float64, tiny ConvNets.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mctool.data.augment import DSA, AugParams, StepAugment
from mctool.matching.fastgrad import plan_for, second_order
from mctool.models.functional import FlatNet
from mctool.matching.loss import MODES, match
from mctool.matching.microbatch import accepts_rows, chunked_forward, chunks, couples_samples, sample_coupling
from mctool.models import ModelSpec, build_model, model_names, spec_for

CLASSES = 3


def problem(n: int = 9, batch: int = 7, steps: int = 3, soft: bool = False, norm: str = "instancenorm",
            seed: int = 0, depth: int = 2) -> dict:
    """θ_s, θ_T, X, Y and batches with repeated indices (duplicates inside one batch)."""
    spec = ModelSpec(depth=depth, width=4, channels=3, num_classes=CLASSES, im_size=(8, 8), norm=norm)
    net = FlatNet(build_model(spec, seed=seed).double())
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 8, 8, generator=gen, dtype=torch.float64)
    if soft:  # rows summing to 1.3: the loss's Σy factor matters
        labels = 1.3 * torch.softmax(torch.randn(n, CLASSES, generator=gen, dtype=torch.float64), dim=1)
    else:
        labels = torch.arange(n) % CLASSES
    theta_s = net.flatten() + 0.1 * torch.randn(net.num_params, generator=gen, dtype=torch.float64)
    theta_t = theta_s + 0.05 * torch.randn(net.num_params, generator=gen, dtype=torch.float64)
    batches = [torch.randint(0, n, (batch,), generator=gen) for _ in range(steps)]
    batches[0][:3] = torch.tensor([1, 4, 1])  # a duplicate within a batch, across chunks of 2
    dsa = DSA()
    draws = [dsa.sample(batch, 8, 8, gen) for _ in batches]
    return dict(net=net, images=images, labels=labels, theta_s=theta_s, theta_t=theta_t, batches=batches,
                augment=StepAugment(dsa, draws), ops=[d.op for d in draws], gen=gen)


def run(p: dict, mode: str, micro: int | None, augment: bool, fast: bool | str, alpha: float = 0.3):
    return match(p["net"], p["images"], p["labels"], p["theta_s"], p["theta_t"], alpha, p["batches"],
                 p["augment"] if augment else None, mode, fast_path=fast, micro_batch=micro)


def rel_err(a: torch.Tensor | float, b: torch.Tensor | float) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm())


# unrolled has no second-order step, so no implementation to choose.
MODE_IMPLS = [(m, f) for m in MODES for f in (True, False) if m != "unrolled" or f]


@pytest.mark.parametrize("mode,fast", MODE_IMPLS, ids=[f"{m}-{'fastgrad' if f else 'autograd'}" for m, f in MODE_IMPLS])
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("augment", [False, True], ids=["noaug", "dsa"])
def test_chunked_equals_unchunked(mode: str, fast: bool, soft: bool, augment: bool) -> None:
    p = problem(soft=soft, seed=1 + soft)
    ref = run(p, mode, None, augment, fast)
    assert ref.second_order == ([] if mode == "unrolled" else ["fastgrad" if fast else "autograd"])
    for micro in (1, 2, 3, 5):  # 7 = 3+3+1 = 5+2: sizes that do not divide the batch
        got = run(p, mode, micro, augment, fast)
        assert got.loss == pytest.approx(ref.loss, rel=1e-12)
        assert got.grad_alpha == pytest.approx(ref.grad_alpha, rel=1e-10)
        assert rel_err(got.grad_images, ref.grad_images) < 1e-10, micro
    assert torch.all(ref.grad_images[1].abs().sum() > 0)


def test_augmentation_draws_differ_between_steps() -> None:
    """The DSA cases above really exercise several ops (else the row slicing would go untested)."""
    p = problem(steps=3, seed=1)
    q = problem(steps=3, seed=2)
    assert len(set(p["ops"]) | set(q["ops"])) > 2


def test_micro_batch_at_least_the_batch_changes_nothing() -> None:
    p = problem(seed=3)
    ref = run(p, "adjoint", None, True, True)
    for micro in (7, 100, 0):
        got = run(p, "adjoint", micro, True, True)
        assert torch.equal(got.grad_images, ref.grad_images) and got.grad_alpha == ref.grad_alpha


def test_chunking_is_not_a_plain_mean_per_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Guard: averaging each chunk by its own size (the easy mistake) is caught by the comparison."""
    import mctool.matching.loss

    p = problem(seed=4)
    ref = run(p, "constant", None, False, False)
    monkeypatch.setattr(mctool.matching.loss, "ce_loss", lambda logits, y, total: F.cross_entropy(logits, y))
    wrong = run(p, "constant", 3, False, False)
    assert rel_err(wrong.grad_images, ref.grad_images) > 1e-3


@pytest.mark.parametrize("op_index", range(6))
def test_step_augment_rows_equal_slices_of_the_whole(op_index: int) -> None:
    dsa = DSA()
    gen = torch.Generator().manual_seed(5)
    params: AugParams | None = None
    while params is None or params.op != dsa.ops[op_index]:
        params = dsa.sample(7, 8, 8, gen)
    aug = StepAugment(dsa, [params])
    x = torch.randn(7, 3, 8, 8, generator=gen, dtype=torch.float64)
    whole = aug(x, 0)
    for rows in chunks(7, 3):
        assert torch.allclose(aug(x[rows], 0, rows), whole[rows], rtol=0, atol=1e-14)
    assert accepts_rows(aug) and not accepts_rows(lambda x, k: x)


@pytest.mark.parametrize("want_hvp", [False, True])
@pytest.mark.parametrize("soft", [False, True])
def test_second_order_chunks_sum_to_the_batch(want_hvp: bool, soft: bool) -> None:
    p = problem(soft=soft, seed=6)
    net, x, y = p["net"], p["images"][:7], p["labels"][:7]
    v = torch.randn(net.num_params, generator=p["gen"], dtype=torch.float64)
    plan = plan_for(net)
    g, e, h = second_order(plan, net, p["theta_s"], v, x, y, want_hvp)
    parts = [second_order(plan, net, p["theta_s"], v, x[r], y[r], want_hvp, batch_size=7) for r in chunks(7, 3)]
    assert rel_err(sum(q[0] for q in parts), g) < 1e-12
    assert rel_err(torch.cat([q[1] for q in parts]), e) < 1e-12
    if want_hvp:
        assert rel_err(sum(q[2] for q in parts), h) < 1e-12


def test_batchnorm_network_refused_only_when_a_batch_is_split() -> None:
    p = problem(norm="batchnorm", seed=7)
    with pytest.raises(ValueError, match="BatchNorm2d .* statistics of the whole batch"):
        run(p, "constant", 3, False, False)
    ref = run(p, "constant", None, False, False)
    assert run(p, "constant", 7, False, False).loss == pytest.approx(ref.loss, rel=1e-12)


def test_bad_micro_batch_and_rowless_augment_raise() -> None:
    p = problem(seed=8)
    with pytest.raises(ValueError, match="positive"):
        run(p, "constant", -1, False, True)
    p["augment"] = lambda x, k: x * (1 + 0.1 * k)
    with pytest.raises(ValueError, match="augment\\(x, k, rows\\)"):
        run(p, "constant", 3, True, True)
    assert run(p, "constant", 7, True, True).loss > 0  # no split: the two-argument form is enough


def test_couples_samples_by_layer_type() -> None:
    bn = nn.BatchNorm2d(4)
    assert couples_samples(bn)
    assert not couples_samples(bn.eval())  # running statistics: per-sample
    assert couples_samples(nn.BatchNorm2d(4, track_running_stats=False).eval())  # batch stats even in eval
    assert couples_samples(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)))
    assert not couples_samples(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)).eval())
    assert not couples_samples(nn.Dropout(0.0))
    for per_sample in (nn.GroupNorm(2, 4), nn.LayerNorm([4, 8, 8]), nn.InstanceNorm2d(4, track_running_stats=True),
                       nn.Conv2d(3, 4, 3), nn.AvgPool2d(2), nn.MaxPool2d(2)):
        assert not couples_samples(per_sample), per_sample
    assert "'features.1'" in (sample_coupling(build_model(ModelSpec(norm="batchnorm"))) or "")


def test_couples_samples_of_the_model_zoo() -> None:
    base = ModelSpec(width=8, channels=3, num_classes=3, im_size=(32, 32))
    for name in model_names():
        coupled = couples_samples(build_model(spec_for(name, base)))
        assert coupled == name.endswith("BN"), name


def test_chunks() -> None:
    assert chunks(7, 3) == [slice(0, 3), slice(3, 6), slice(6, 7)]
    assert chunks(7, None) == chunks(7, 0) == chunks(7, 7) == chunks(7, 9) == [slice(0, 7)]
    assert chunks(4, 1) == [slice(i, i + 1) for i in range(4)]


def test_chunked_forward_equals_one_forward() -> None:
    p = problem(seed=9)
    with torch.no_grad():
        whole = p["net"](p["theta_s"], p["images"])
        for micro in (None, 2, 4, 9, 20):
            got = chunked_forward(p["net"], p["theta_s"], p["images"], micro)
            assert torch.allclose(got, whole, rtol=0, atol=1e-12)
