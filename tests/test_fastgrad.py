"""Tests of mctool.matching.fastgrad (the hand-written second-order ConvNet sweep) and mctool.core.allocator.

The sweep must give autograd's numbers: g = ∇_w ℓ, e = ∂/∂X [vᵀ∇_w ℓ] and h = ∇²_w ℓ · v,
compared in float64 to 1e-10 on small ConvNets of depth 1–4 (1 or 3 channels, the 28 px
first-layer padding, odd sizes, soft labels).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from mctool.data.augment import DSA
from mctool.matching.fastgrad import _unpool_masked, plan_for, second_order
from mctool.models.functional import FlatNet
from mctool.matching.loss import match
from mctool.models import ModelSpec, build_model, spec_for


def autograd_reference(net: FlatNet, w: torch.Tensor, v: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
    """(g, e, h) by autograd: backward with create_graph, then the double backward of vᵀg."""
    w_leaf = w.clone().requires_grad_(True)
    x_leaf = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(net(w_leaf, x_leaf), y), w_leaf, create_graph=True)
    h, e = torch.autograd.grad(torch.dot(g, v), [w_leaf, x_leaf])
    return g.detach(), e, h


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def small_problem(depth: int, channels: int, size: int, soft: bool, dtype=torch.float64, width: int = 4,
                  batch: int = 5, seed: int = 0):
    spec = ModelSpec(depth=depth, width=width, channels=channels, num_classes=3, im_size=(size, size))
    net = FlatNet(build_model(spec, seed=seed).to(dtype))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=gen, dtype=dtype)
    if soft:  # probabilities scaled to sum to 1.7: the loss's Σy factor matters
        y = 1.7 * torch.softmax(torch.randn(batch, 3, generator=gen, dtype=dtype), dim=1)
    else:
        y = torch.arange(batch) % 3
    # Move away from the initialisation so that γ, β and the biases are not at their defaults.
    w = net.flatten() + 0.1 * torch.randn(net.num_params, generator=gen, dtype=dtype)
    v = torch.randn(net.num_params, generator=gen, dtype=dtype)
    return net, w, v, x, y


@pytest.mark.parametrize(
    "depth,channels,size,soft",
    [
        (1, 1, 8, False),
        (2, 3, 8, True),  # soft labels
        (3, 1, 28, False),  # MNIST-like: the first conv pads by 3
        (2, 3, 7, False),  # odd sizes: pooling drops a row and a column
        (4, 3, 16, True),  # Tiny-ImageNet depth
    ],
)
def test_second_order_equals_autograd_float64(depth: int, channels: int, size: int, soft: bool) -> None:
    net, w, v, x, y = small_problem(depth, channels, size, soft)
    plan = plan_for(net)
    assert plan is not None and len(plan.blocks) == depth
    g_ref, e_ref, h_ref = autograd_reference(net, w, v, x, y)
    g, e, h = second_order(plan, net, w, v, x, y, want_hvp=True)
    assert e.shape == x.shape
    assert rel_err(g, g_ref) < 1e-10
    assert rel_err(e, e_ref) < 1e-10
    assert rel_err(h, h_ref) < 1e-10
    g2, e2, none = second_order(plan, net, w, v, x, y)  # without the Hessian-vector product
    assert none is None
    assert torch.equal(g2, g) and torch.equal(e2, e)


def test_second_order_float32_close_to_autograd() -> None:
    net, w, v, x, y = small_problem(3, 3, 32, False, dtype=torch.float32, width=16, batch=8, seed=3)
    g_ref, e_ref, h_ref = autograd_reference(net, w, v, x, y)
    g, e, h = second_order(plan_for(net), net, w, v, x, y, want_hvp=True)
    assert rel_err(g, g_ref) < 1e-4
    assert rel_err(e, e_ref) < 1e-4
    assert rel_err(h, h_ref) < 1e-4


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_second_order_does_not_change_its_inputs(layout: torch.memory_format) -> None:
    """Also with a channels-last batch, which the CPU path uses as it is (no private copy)."""
    net, w, v, x, y = small_problem(2, 3, 8, False)
    x = x.contiguous(memory_format=layout)
    copies = [t.clone() for t in (w, v, x, y)]
    template = net.flatten()
    g_ref, e_ref, _ = autograd_reference(net, w, v, x, y)
    g, e, _ = second_order(plan_for(net), net, w, v, x, y, want_hvp=True)
    assert rel_err(g, g_ref) < 1e-10 and rel_err(e, e_ref) < 1e-10
    for before, after in zip(copies, (w, v, x, y)):
        assert torch.equal(before, after)
    assert torch.equal(template, net.flatten())


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("size", [8, 7])
def test_unpool_masked_is_the_adjoint_of_pooling(layout: torch.memory_format, size: int) -> None:
    gen = torch.Generator().manual_seed(0)
    mask = (torch.randn(2, 3, size, size, generator=gen, dtype=torch.float64) > 0).double()
    mask = mask.contiguous(memory_format=layout)
    d = torch.randn(2, 3, size // 2, size // 2, generator=gen, dtype=torch.float64)
    x = torch.zeros(2, 3, size, size, dtype=torch.float64, requires_grad=True)
    (expected,) = torch.autograd.grad(F.avg_pool2d(x, 2), x, d)  # the pooling's own adjoint
    assert torch.allclose(_unpool_masked(d, mask), expected * mask, rtol=0, atol=1e-15)


def test_plan_only_for_the_instance_norm_convnet() -> None:
    base = ModelSpec(width=8, channels=3, num_classes=3, im_size=(32, 32))  # GN: 4 groups of 2
    for name in ("ConvNet", "ConvNetD1", "ConvNetD4"):
        assert plan_for(FlatNet(build_model(spec_for(name, base)))) is not None, name
    assert plan_for(FlatNet(build_model(ModelSpec(width=4, channels=1, im_size=(28, 28))))) is not None
    for name in ("ConvNetBN", "ConvNetLN", "ConvNetGN", "ConvNetNN", "ConvNetMP", "MLP", "LeNet", "ResNet18"):
        assert plan_for(FlatNet(build_model(spec_for(name, base)))) is None, name


@pytest.mark.parametrize("mode", ["constant", "adjoint"])
def test_match_same_with_and_without_fast_path(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whole matching iterations, with real DSA draws (some give channels-last batches)."""
    import mctool.matching.secondorder

    calls: list[int] = []

    def counting(*args, **kwargs):
        calls.append(1)
        return second_order(*args, **kwargs)

    monkeypatch.setattr(mctool.matching.secondorder, "second_order", counting)
    net, _, _, x, _ = small_problem(2, 3, 8, False, batch=6)
    labels = torch.arange(6) % 3
    gen = torch.Generator().manual_seed(1)
    theta_s = net.flatten()
    theta_t = theta_s + 0.05 * torch.randn(net.num_params, generator=gen, dtype=torch.float64)
    batches = [torch.randperm(6, generator=gen)[:4] for _ in range(6)]
    dsa = DSA()
    draws = [dsa.sample(4, 8, 8, gen) for _ in batches]
    assert len({p.op for p in draws}) > 1

    def augment(xb: torch.Tensor, k: int) -> torch.Tensor:
        return dsa.apply(xb, draws[k])

    fast = match(net, x, labels, theta_s, theta_t, 0.02, batches, augment, mode, fast_path=True)
    assert len(calls) == len(batches)  # the sweep did every second-order step
    slow = match(net, x, labels, theta_s, theta_t, 0.02, batches, augment, mode, fast_path=False)
    assert len(calls) == len(batches)  # and none of these
    assert fast.loss == pytest.approx(slow.loss, rel=1e-12)
    assert fast.grad_alpha == pytest.approx(slow.grad_alpha, rel=1e-9)
    assert rel_err(fast.grad_images, slow.grad_images) < 1e-9


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
@pytest.mark.parametrize("env,expected", [({}, "True"), ({"MCTOOL_SYSTEM_MALLOC": "1"}, "False"),
                                          ({"MALLOC_ARENA_MAX": "2"}, "False")])
def test_tune_malloc_applies_unless_the_user_opts_out(env: dict[str, str], expected: str) -> None:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "MCTOOL_SYSTEM_MALLOC", "LD_PRELOAD"))}
    code = ("from mctool.core.allocator import tune_malloc, malloc_tuned, release_free_memory; "
            "from mctool.store import versions; a = tune_malloc(); "
            "assert tune_malloc() == a == malloc_tuned(); release_free_memory(); "
            "assert versions()['malloc'] == ('tuned' if a else 'default'); print(a)")
    out = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                         check=True)
    if platform.libc_ver()[0] != "glibc" and expected == "True":
        pytest.skip("not glibc")
    assert out.stdout.strip() == expected
