"""The cross-architecture models: build on every data shape, give logits, train, init repeatably."""

from __future__ import annotations

import pytest
import torch

from mctool.models import zoo as archs
import mctool.models as nets
from mctool.core.errors import UsageError

SHAPES = [(1, 28, 10), (3, 32, 10), (3, 64, 7)]  # channels, pixels, classes


def _base(channels: int, px: int, classes: int) -> nets.ModelSpec:
    return nets.ModelSpec(channels=channels, num_classes=classes, im_size=(px, px))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", list(archs.ARCHS))
def test_builds_forward_backward(name: str, shape: tuple[int, int, int]) -> None:
    channels, px, classes = shape
    model = nets.build_model(nets.spec_for(name, _base(channels, px, classes)), seed=0)
    x = torch.randn(2, channels, px, px)
    logits = model(x)
    assert logits.shape == (2, classes)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1])).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", list(archs.ARCHS))
def test_seeded_init_is_repeatable(name: str) -> None:
    spec = nets.spec_for(name, _base(3, 32, 10))
    a, b = nets.build_model(spec, seed=0), nets.build_model(spec, seed=0)
    c = nets.build_model(spec, seed=1)
    pa, pb, pc = (torch.cat([p.detach().flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb)
    assert not torch.equal(pa, pc)


def test_names_listed_and_unknown_rejected() -> None:
    assert set(archs.ARCHS) <= set(nets.model_names())
    with pytest.raises(UsageError):
        nets.spec_for("Nope", nets.ModelSpec())
