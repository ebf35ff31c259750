"""Step units: with `--method mct` every `--grad` mode takes image steps in the released code's
units (method.md §6.6: its pass 2 applies half the two-pass formula's gradient).

The reference here is written from the released code's description, independently of
mctool.matching.loss: pass 1 runs the inner SGD steps to get G = Σ g_k; pass 2 recomputes each g_k
with a graph and adds ∂/∂X [vᵀ g_k / D] — without the factor 2 of the formula, because the
released code multiplies the gradient *tuple* by 2 (which repeats it) instead of the tensor.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from mctool.distill import DistillConfig, Distiller, State
from mctool.models.functional import FlatNet
from mctool.matching.loss import match
from mctool.models import ModelSpec, build_model



def _problem(seed: int = 0):
    spec = ModelSpec(depth=1, width=3, channels=1, num_classes=3, im_size=(6, 6))
    net = FlatNet(build_model(spec, seed=seed).double())
    g = torch.Generator().manual_seed(seed)
    n = 6
    images = torch.randn(n, 1, 6, 6, generator=g, dtype=torch.float64)
    labels = torch.arange(3).repeat_interleave(2)
    theta_s = net.flatten().double()
    theta_t = theta_s + 0.05 * torch.randn(theta_s.shape, generator=g, dtype=torch.float64)
    batches = [torch.randperm(n, generator=g)[:4] for _ in range(3)]
    return net, images, labels, theta_s, theta_t, batches


def released_image_gradient(net: FlatNet, images: torch.Tensor, labels: torch.Tensor, theta_s: torch.Tensor,
                            theta_t: torch.Tensor, alpha: float, batches: list[torch.Tensor]) -> torch.Tensor:
    """The image gradient the released MCT code hands to its optimizer (method.md §6.6)."""
    # Pass 1: the inner steps with plain gradients, summed.
    w = theta_s.clone()
    grad_sum = torch.zeros_like(w)
    for idx in batches:
        w_leaf = w.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(net(w_leaf, images[idx]), labels[idx]), w_leaf)
        grad_sum += g
        w = w - alpha * g
    D = (theta_s - theta_t).pow(2).sum()
    v = alpha * (theta_t - theta_s) + alpha**2 * grad_sum
    # Pass 2: per step, ∂/∂X [vᵀ g_k / D] — once: `2 * grads` repeats the tuple, its first element is unscaled.
    x = images.clone().requires_grad_(True)
    out = torch.zeros_like(images)
    w = theta_s.clone()
    for idx in batches:
        w_leaf = w.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(net(w_leaf, x[idx]), labels[idx]), w_leaf, create_graph=True)
        (gx,) = torch.autograd.grad(torch.dot(v, g) / D, x)
        out += gx
        w = w - alpha * g.detach()
    return out


def _distiller(cfg: DistillConfig, images: torch.Tensor) -> Distiller:
    d = Distiller.__new__(Distiller)
    d.cfg = cfg
    d.state = State(values={"images": images.clone(), "alpha": 0.01},
                    velocities={"images": torch.zeros_like(images), "alpha": 0.0}, labels=torch.zeros(images.shape[0]),
                    iteration=0, generators=[], queues=[])
    return d


@pytest.mark.parametrize("fast_path", [True, False])
def test_constant_update_equals_the_released_code(fast_path: bool) -> None:
    net, images, labels, theta_s, theta_t, batches = _problem()
    alpha, lr_img = 0.02, 100.0
    r = match(net, images, labels, theta_s, theta_t, alpha, batches, None, "constant", fast_path=fast_path)
    reference = released_image_gradient(net, images, labels, theta_s, theta_t, alpha, batches)
    cfg = DistillConfig(lr_img=lr_img, momentum_img=0.5)  # step_units = "released" by default
    d = _distiller(cfg, images)
    assert d.apply_update({"images": r.grad_images, "alpha": 0.0})
    torch.testing.assert_close(d.state.images, images - lr_img * reference, rtol=1e-10, atol=1e-12)
    # A second update with the same gradient: the momentum buffer holds released-unit gradients too.
    assert d.apply_update({"images": r.grad_images, "alpha": 0.0})
    expected = images - lr_img * reference - lr_img * (0.5 * reference + reference)
    torch.testing.assert_close(d.state.images, expected, rtol=1e-10, atol=1e-12)
    # Exact units: twice the step (what mctool 0.1 took with Table A's lr_img).
    d = _distiller(dataclasses.replace(cfg, step_units="exact"), images)
    assert d.apply_update({"images": r.grad_images, "alpha": 0.0})
    torch.testing.assert_close(d.state.images, images - 2 * lr_img * reference, rtol=1e-10, atol=1e-12)


def test_every_grad_mode_uses_the_same_units_under_mct_and_mtt_stays_exact() -> None:
    net, images, labels, theta_s, theta_t, batches = _problem(1)
    for mode in ("constant", "adjoint", "unrolled"):
        cfg = DistillConfig(grad=mode, lr_img=1.0)
        assert cfg.image_grad_scale == 0.5, mode
        assert dataclasses.replace(cfg, step_units="exact").image_grad_scale == 1.0
    assert DistillConfig(method="mtt").image_grad_scale == 1.0  # MTT's released code applies its exact gradient
    # The scale is a units change only: with one inner step every mode's gradient is the same vector.
    one = batches[:1]
    grads = [match(net, images, labels, theta_s, theta_t, 0.02, one, None, mode).grad_images
             for mode in ("constant", "adjoint", "unrolled")]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grads[0], grads[2], rtol=1e-9, atol=1e-12)


def test_stored_config_says_which_units() -> None:
    assert dataclasses.asdict(DistillConfig())["step_units"] == "released"
    from mctool.core.settings import legacy_values

    assert legacy_values(DistillConfig)["step_units"] == "exact"  # synsets written before the change
