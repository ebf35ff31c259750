"""Tests of mctool.matching.loss: the trajectory-matching loss and its three gradient modes.

Everything runs in float64 on tiny ConvNets so that the exact modes can be compared to
1e-6 and against central finite differences.
"""

from __future__ import annotations

import time
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from mctool.models.functional import FlatNet
from mctool.matching.loss import MODES, MatchResult, match
from mctool.models import ModelSpec, build_model

NUM_CLASSES = 3


def make_problem(
    n: int = 8,
    channels: int = 1,
    steps: int = 3,
    batch: int = 4,
    soft: bool = False,
    seed: int = 0,
    target_scale: float = 0.05,
    norm: str = "instancenorm",
) -> dict:
    """A tiny float64 matching problem: net, X, Y, θ_s, θ_T and N batches."""
    spec = ModelSpec(depth=1, width=4, channels=channels, num_classes=NUM_CLASSES, im_size=(8, 8), norm=norm)
    net = FlatNet(build_model(spec, seed=seed).double())
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n, channels, 8, 8, generator=gen, dtype=torch.float64)
    if soft:
        labels = torch.softmax(torch.randn(n, NUM_CLASSES, generator=gen, dtype=torch.float64), dim=1)
    else:
        labels = torch.arange(n) % NUM_CLASSES
    theta_start = net.flatten()
    theta_target = theta_start + target_scale * torch.randn(net.num_params, generator=gen, dtype=torch.float64)
    batches = [torch.randperm(n, generator=gen)[:batch] for _ in range(steps)]
    return dict(
        net=net, images=images, labels=labels, theta_start=theta_start,
        theta_target=theta_target, batches=batches,
    )


def affine_augment(x: torch.Tensor, k: int) -> torch.Tensor:
    """A fixed, per-step, differentiable transform (stands in for pre-sampled DSA params)."""
    return x * (1.0 + 0.1 * k) + 0.01 * k


def roll_augment(x: torch.Tensor, k: int) -> torch.Tensor:
    """A per-step spatial shift plus flip on odd steps: differentiable, non-elementwise."""
    x = torch.roll(x, shifts=(k, 2 * k), dims=(2, 3))
    return x.flip(3) if k % 2 else x


def run(p: dict, alpha: float, mode: str, augment: Callable | None = None) -> MatchResult:
    return match(
        p["net"], p["images"], p["labels"], p["theta_start"], p["theta_target"],
        alpha, p["batches"], augment, mode=mode,
    )


def plain_loss(p: dict, alpha: float, images: torch.Tensor | None = None, augment: Callable | None = None) -> float:
    """L computed independently: a plain SGD loop with detached gradients."""
    x = p["images"] if images is None else images
    w = p["theta_start"].clone()
    for k, idx in enumerate(p["batches"]):
        w = w.detach().requires_grad_(True)
        xb = x[idx] if augment is None else augment(x[idx], k)
        loss = F.cross_entropy(p["net"](w, xb), p["labels"][idx])
        (g,) = torch.autograd.grad(loss, w)
        w = w.detach() - alpha * g
    d = (p["theta_start"] - p["theta_target"]).pow(2).sum()
    return float((w - p["theta_target"]).pow(2).sum() / d)


def assert_rel_close(a: torch.Tensor | float, b: torch.Tensor | float, rtol: float) -> None:
    """‖a − b‖ ≤ rtol · ‖b‖ (a norm-wise relative comparison, robust to tiny entries)."""
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    err = float((a - b).norm())
    ref = float(b.norm())
    assert err <= rtol * max(ref, 1e-300), f"relative error {err / max(ref, 1e-300):.3e} > {rtol}"


# (a) unrolled against central finite differences -------------------------------------------


@pytest.mark.parametrize("soft,augment", [(False, None), (True, affine_augment), (False, roll_augment)])
def test_unrolled_matches_finite_differences(soft: bool, augment: Callable | None) -> None:
    p = make_problem(steps=3, soft=soft, seed=1)
    alpha = 0.3
    res = run(p, alpha, "unrolled", augment)
    gen = torch.Generator().manual_seed(123)
    eps = 1e-5
    for _ in range(3):
        d = torch.randn(p["images"].shape, generator=gen, dtype=torch.float64)
        fd = (plain_loss(p, alpha, p["images"] + eps * d, augment)
              - plain_loss(p, alpha, p["images"] - eps * d, augment)) / (2 * eps)
        an = float((res.grad_images * d).sum())
        assert abs(an - fd) <= 1e-5 * abs(fd), (an, fd)
    eps_a = 1e-6
    fd_a = (plain_loss(p, alpha + eps_a, augment=augment) - plain_loss(p, alpha - eps_a, augment=augment)) / (2 * eps_a)
    assert abs(res.grad_alpha - fd_a) <= 1e-5 * abs(fd_a), (res.grad_alpha, fd_a)


# (b) adjoint == unrolled ---------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 3, 5])
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("augment", [None, affine_augment, roll_augment], ids=["noaug", "affine", "roll"])
def test_adjoint_equals_unrolled(steps: int, soft: bool, augment: Callable | None) -> None:
    p = make_problem(steps=steps, soft=soft, channels=3, seed=2)
    alpha = 0.5
    ref = run(p, alpha, "unrolled", augment)
    adj = run(p, alpha, "adjoint", augment)
    assert_rel_close(adj.grad_images, ref.grad_images, 1e-6)
    assert_rel_close(adj.grad_alpha, ref.grad_alpha, 1e-6)
    assert adj.loss == pytest.approx(ref.loss, rel=1e-12)
    assert adj.start_distance == pytest.approx(ref.start_distance, rel=1e-14)


# (c) constant == unrolled at N = 1 -----------------------------------------------------------


@pytest.mark.parametrize("soft,augment", [(False, None), (True, affine_augment), (False, roll_augment)])
def test_constant_exact_for_one_step(soft: bool, augment: Callable | None) -> None:
    p = make_problem(steps=1, soft=soft, seed=3)
    ref = run(p, 0.7, "unrolled", augment)
    con = run(p, 0.7, "constant", augment)
    assert_rel_close(con.grad_images, ref.grad_images, 1e-10)
    assert con.grad_alpha == pytest.approx(ref.grad_alpha, rel=1e-10)
    assert con.loss == pytest.approx(ref.loss, rel=1e-12)


# (d) constant: same loss for any N, really an approximation of the gradient for N > 1 -------


def test_constant_same_loss_but_truncated_gradient() -> None:
    p = make_problem(steps=5, batch=8, seed=4)
    alpha = 5.0  # a large step makes the dropped terms through w_k large
    ref = run(p, alpha, "unrolled", affine_augment)
    con = run(p, alpha, "constant", affine_augment)
    assert con.loss == pytest.approx(ref.loss, rel=1e-10)
    assert not torch.allclose(con.grad_images, ref.grad_images, rtol=1e-3, atol=1e-8)
    assert con.grad_alpha != pytest.approx(ref.grad_alpha, rel=1e-3)


@pytest.mark.parametrize("steps", [2, 4])
def test_constant_matches_its_formula(steps: int) -> None:
    """constant's grads equal autograd on the truncated objective with every w_k frozen."""
    p = make_problem(steps=steps, seed=5)
    alpha = 0.4
    con = run(p, alpha, "constant", roll_augment)
    # Frozen path: w_k from the plain loop; G(X) = Σ g_k(w_k, X) differentiable in X only.
    x = p["images"].clone().requires_grad_(True)
    a = torch.tensor(alpha, dtype=torch.float64, requires_grad=True)
    w = p["theta_start"].clone()
    grad_sum = torch.zeros_like(w)
    for k, idx in enumerate(p["batches"]):
        w_leaf = w.detach().requires_grad_(True)
        loss_k = F.cross_entropy(p["net"](w_leaf, roll_augment(x[idx], k)), p["labels"][idx])
        (g,) = torch.autograd.grad(loss_k, w_leaf, create_graph=True)
        grad_sum = grad_sum + g
        w = w.detach() - alpha * g.detach()
    d = (p["theta_start"] - p["theta_target"]).pow(2).sum()
    loss = (p["theta_start"] - a * grad_sum - p["theta_target"]).pow(2).sum() / d
    gx, ga = torch.autograd.grad(loss, [x, a])
    assert_rel_close(con.grad_images, gx, 1e-10)
    assert con.grad_alpha == pytest.approx(float(ga), rel=1e-10)


# (e) the loss value against an independent loop --------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("soft", [False, True])
def test_loss_equals_plain_loop(mode: str, soft: bool) -> None:
    p = make_problem(steps=4, soft=soft, seed=6)
    res = run(p, 0.2, mode, affine_augment)
    assert res.loss == pytest.approx(plain_loss(p, 0.2, augment=affine_augment), rel=1e-10)
    d = float((p["theta_start"] - p["theta_target"]).pow(2).sum())
    assert res.start_distance == pytest.approx(d, rel=1e-14)


# (f) rows outside every batch get zero gradient ---------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_unused_rows_have_zero_gradient(mode: str) -> None:
    p = make_problem(n=10, steps=3, seed=7)
    p["batches"] = [torch.tensor([0, 2, 4]), torch.tensor([2, 5]), torch.tensor([0, 4, 5, 7])]
    res = run(p, 0.3, mode, roll_augment)
    unused = [1, 3, 6, 8, 9]
    used = [0, 2, 4, 5, 7]
    assert res.grad_images.shape == p["images"].shape
    assert torch.all(res.grad_images[unused] == 0)
    assert torch.all(res.grad_images[used].flatten(1).norm(dim=1) > 0)


# (g) errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_zero_start_distance_raises(mode: str) -> None:
    p = make_problem(steps=1)
    p["theta_target"] = p["theta_start"].clone()
    with pytest.raises(ValueError, match="identical"):
        run(p, 0.1, mode)


def test_unknown_mode_and_empty_batches_raise() -> None:
    p = make_problem(steps=1)
    with pytest.raises(ValueError, match="unknown matching mode"):
        run(p, 0.1, "exact")
    p["batches"] = []
    with pytest.raises(ValueError, match="at least one"):
        run(p, 0.1, "adjoint")


# Side effects ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_no_side_effects(mode: str) -> None:
    """No gradient leaks into the module or the caller's tensors, and no_grad callers work."""
    p = make_problem(steps=2, seed=8)
    p["images"].requires_grad_(True)
    before = p["images"].detach().clone()
    with torch.no_grad():
        res = run(p, 0.3, mode, affine_augment)
    assert p["images"].grad is None
    assert torch.equal(p["images"].detach(), before)
    assert all(q.grad is None for q in p["net"].module.parameters())
    assert not res.grad_images.requires_grad
    assert isinstance(res.loss, float) and isinstance(res.grad_alpha, float)


def test_batchnorm_net_adjoint_equals_unrolled() -> None:
    """BatchNorm in train mode (buffers updated by the extra forwards) does not change results."""
    p = make_problem(steps=3, seed=9, norm="batchnorm")
    ref = run(p, 0.5, "unrolled")
    adj = run(p, 0.5, "adjoint")
    assert_rel_close(adj.grad_images, ref.grad_images, 1e-6)
    assert_rel_close(adj.grad_alpha, ref.grad_alpha, 1e-6)


# Not a test: a manual measuring helper (no timing asserts) ---------------------------------


def measure_modes(
    steps: int = 20, n: int = 10, channels: int = 3, width: int = 32, depth: int = 3,
    size: int = 32, device: str = "cpu", repeats: int = 3,
) -> dict[str, dict[str, float]]:
    """Wall time (s, best of `repeats`) and, on CUDA, peak memory (MiB) of each mode.

    Run by hand: ``python tests/test_matching.py``. Not collected by pytest.
    """
    spec = ModelSpec(depth=depth, width=width, channels=channels, num_classes=10, im_size=(size, size))
    net = FlatNet(build_model(spec, seed=0).to(device))
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(n, channels, size, size, generator=gen).to(device)
    labels = (torch.arange(n) % 10).to(device)
    theta_start = net.flatten()
    theta_target = theta_start + 0.01 * torch.randn(net.num_params, generator=gen).to(device)
    batches = [torch.randperm(n, generator=gen).to(device) for _ in range(steps)]
    out: dict[str, dict[str, float]] = {}
    for mode in MODES:
        best = float("inf")
        peak = 0.0
        for _ in range(repeats):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            match(net, images, labels, theta_start, theta_target, 0.01, batches, affine_augment, mode=mode)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() / 2**20
            best = min(best, time.perf_counter() - t0)
        out[mode] = {"seconds": best, "peak_mib": peak}
    return out


if __name__ == "__main__":
    for m, r in measure_modes().items():
        print(f"{m:9s} {r['seconds']:.3f}s  peak {r['peak_mib']:.1f} MiB")
