"""mctool.matching.secondorder: both implementations agree, and policy "auto" keeps the faster one."""

from __future__ import annotations

import pytest
import torch

import mctool.matching.secondorder as so_mod
from mctool.matching.fastgrad import plan_for
from mctool.models.functional import FlatNet
from mctool.models import ModelSpec, build_model
from mctool.matching.secondorder import TIE_MARGIN, SecondOrder, autograd_step, choices, forget_choices, run_step


def setup(norm: str = "instancenorm", batch: int = 5, seed: int = 0):
    spec = ModelSpec(depth=2, width=4, channels=3, num_classes=3, im_size=(8, 8), norm=norm)
    net = FlatNet(build_model(spec, seed=seed).double())
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.arange(batch) % 3
    w = net.flatten() + 0.1 * torch.randn(net.num_params, generator=gen, dtype=torch.float64)
    v = torch.randn(net.num_params, generator=gen, dtype=torch.float64)
    return net, w, v, x, y


@pytest.fixture(autouse=True)
def _fresh_choices():
    forget_choices()
    yield
    forget_choices()


def fake_clock(monkeypatch: pytest.MonkeyPatch, seconds: dict[str, float]) -> list[str]:
    """Make each measured step of implementation I take seconds[I]; returns the log of steps run."""
    log: list[str] = []
    real = so_mod.run_step

    def logged(impl, *args):
        log.append(impl)
        return real(impl, *args)

    monkeypatch.setattr(so_mod, "run_step", logged)
    monkeypatch.setattr(so_mod, "_timed", lambda fn, device: (lambda out: (seconds[log[-1]], out))(fn()))
    return log


@pytest.mark.parametrize("seconds,expected", [
    ({"fastgrad": 1.0, "autograd": 2.0}, "fastgrad"),
    ({"fastgrad": 2.0, "autograd": 1.0}, "autograd"),
    ({"fastgrad": 1.0, "autograd": 1.0 / (TIE_MARGIN * 0.99)}, "fastgrad"),  # within the margin
])
def test_auto_keeps_the_faster_and_caches_it(monkeypatch: pytest.MonkeyPatch, seconds, expected) -> None:
    net, w, v, x, y = setup()
    log = fake_clock(monkeypatch, seconds)
    so = SecondOrder(net, "auto")
    g, e, h = so(w, v, x, y, True, 5)
    assert sorted(set(log)) == ["autograd", "fastgrad"] and len(log) == 6
    assert so.used == {expected}
    (c,) = choices()
    assert c.impl == expected and c.reason == "measured" and set(c.seconds) == {"fastgrad", "autograd"}
    assert expected in c.describe() and "(5, 3, 8, 8)" in c.describe()
    ref = autograd_step(net, w, v, x, y, True, 5)
    for a, b in zip((g, e, h), ref):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-13)
    log.clear()
    SecondOrder(net, "auto")(w, v, x, y, True, 5)  # same shape, new call: no new measurement
    assert log == [expected]
    SecondOrder(net, "auto")(w, v, x[:4], y[:4], True, 5)  # a smaller batch in another size bucket
    assert len(log) == 7 and len(choices()) == 2
    SecondOrder(net, "auto")(w, v, x[:3], y[:3], True, 5)  # same bucket (3 and 4 -> 4): no new measurement
    assert len(log) == 8 and len(choices()) == 2
    SecondOrder(net, "auto")(w, v, x, y, False, 5)  # a different problem (no hvp): measured again
    assert len(log) == 14 and len(choices()) == 3


def test_autograd_out_of_memory_falls_back_to_fastgrad(monkeypatch: pytest.MonkeyPatch) -> None:
    net, w, v, x, y = setup()
    real = so_mod.run_step

    def oom_for_autograd(impl, *args):
        if impl == "autograd":
            raise torch.cuda.OutOfMemoryError("fake")
        return real(impl, *args)

    monkeypatch.setattr(so_mod, "run_step", oom_for_autograd)
    so = SecondOrder(net, "auto")
    g, _, _ = so(w, v, x, y, False, 5)
    assert so.used == {"fastgrad"} and choices()[0].reason == "autograd ran out of memory"
    assert torch.allclose(g, autograd_step(net, w, v, x, y, False, 5)[0], rtol=1e-10)


def test_fixed_policies_and_unsupported_networks(monkeypatch: pytest.MonkeyPatch) -> None:
    net, w, v, x, y = setup()
    log = fake_clock(monkeypatch, {"fastgrad": 1.0, "autograd": 1.0})
    for policy, impl in (("fastgrad", "fastgrad"), ("autograd", "autograd")):
        so = SecondOrder(net, policy)
        so(w, v, x, y, False, 5)
        assert so.used == {impl} and log[-1] == impl
    bn, w2, v2, x2, y2 = setup(norm="batchnorm")
    assert plan_for(bn) is None
    so = SecondOrder(bn, "auto")
    so(w2, v2, x2, y2, False, 5)
    assert so.used == {"autograd"} and choices() == []  # nothing to choose between
    with pytest.raises(ValueError, match="policy"):
        SecondOrder(net, "fast")


def test_run_step_implementations_agree_on_a_chunk() -> None:
    net, w, v, x, y = setup(batch=7)
    plan = plan_for(net)
    a = run_step("fastgrad", plan, net, w, v, x[:3], y[:3], True, 7)
    b = run_step("autograd", plan, net, w, v, x[:3], y[:3], True, 7)
    for p, q in zip(a, b):
        assert torch.allclose(p, q, rtol=1e-10, atol=1e-13)
