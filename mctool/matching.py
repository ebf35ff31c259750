r"""Trajectory-matching loss and its gradients w.r.t. the synthetic images and the step size.

Setting (method.md §6.6, §7)
----------------------------
X are the synthetic images, Y their labels (hard int64 or soft probabilities), α the
learnable scalar step size with current value ᾱ, θ_s / θ_T the flat start / target
parameters. For the N inner steps, batch B_k indexes X and A_k is the (pre-sampled,
deterministic, differentiable) augmentation of step k:

    ℓ_k(w, X) = mean CE(f(A_k(X[B_k]); w), Y[B_k])
    w_0 = θ_s,   g_k = ∇_w ℓ_k(w_k, X),   w_{k+1} = w_k − α g_k
    D = ‖θ_s − θ_T‖²,   L = ‖w_N − θ_T‖² / D = ‖θ_s − α G − θ_T‖² / D,   G = Σ_k g_k.

Every mode computes the same forward value L; they differ in the gradient.

``unrolled`` (MTT, exact)
    The N steps are built as one autograd graph (g_k with ``create_graph=True``, α a tensor)
    and L is differentiated end to end. This includes the Hessian terms through every w_k
    and the α-dependence of every step. Memory grows with N (all activations of all steps).

``constant`` (MCT authors' two-pass form, truncated)
    Treat G as a function of X only through each g_k's *own* batch, with every w_k and the α
    inside it frozen at ᾱ. With r = θ_s − ᾱG − θ_T (the residual):

        ∂L/∂α = −(2/D) Gᵀ r
        ∂L/∂X = (2/D) Σ_k (∂g_k/∂X)ᵀ v,   v = −ᾱ r = ᾱ(θ_T − θ_s) + ᾱ² G.

    Pass 1 runs the steps with plain gradients (no graph across steps) to get G, hence r and v.
    Pass 2 re-walks w_k from θ_s; one second-order step per k recomputes g_k together with the
    image term (∂g_k/∂X)ᵀ v, and w_k is advanced with that g_k. Neither pass
    stores per-step tensors, so memory is flat in N (one step's activations + a few [P]
    vectors). The dropped terms are those through w_k (k ≥ 1), so the gradient is exact only at
    N = 1; this is the documented approximation of MCT, not a bug.

``adjoint`` (exact, activation memory flat in N)
    Reverse-mode through the SGD recursion by hand. Pass 1 as in ``constant`` but storing
    w_0 … w_N (O(N·P) floats, no activations). With λ_k = ∂L/∂w_k:

        λ_N = 2 (w_N − θ_T) / D
        for k = N−1 … 0, with H_k = ∇²_w ℓ_k(w_k) (symmetric):
            ∂L/∂X += −ᾱ (∂g_k/∂X)ᵀ λ_{k+1}
            ∂L/∂α += −g_kᵀ λ_{k+1}
            λ_k    = λ_{k+1} − ᾱ H_k λ_{k+1}

    H_k λ_{k+1} and (∂g_k/∂X)ᵀ λ_{k+1} are both derivatives of the scalar s = g_kᵀ λ_{k+1}
    (the directional derivative of ℓ_k along λ_{k+1}), so one second-order step gives both,
    and s itself is the α term. This equals ``unrolled`` up to rounding.

Cost per step: ``unrolled`` one forward + backward(create_graph) and, at the end, the double
backward of the whole graph; ``constant`` and ``adjoint`` one plain forward+backward (pass 1)
plus one second-order step (pass 2 / reverse) that yields g_k, the image term and, for
``adjoint``, H_k λ. For the ConvNet of every preset (conv → instance norm → ReLU → average
pooling) that step is mctool.fastgrad's hand-written forward-over-reverse sweep; for any other
network it is autograd: forward, backward with ``create_graph`` and one double backward.

Gradients are taken with ``torch.autograd.grad`` w.r.t. private leaves (or by mctool.fastgrad
under ``no_grad``), so nothing is accumulated into ``images.grad`` or into the module's
parameters. In modes ``constant`` and
``adjoint`` each step differentiates w.r.t. a leaf copy of its own batch X[B_k] and scatters the
result with ``index_add_`` (duplicates within a batch add up), which avoids a full-size
zero tensor per step. Note that a module with BatchNorm in train mode updates its running
statistics on every forward, so the recomputing modes update them twice per step; the
train-mode outputs (and so every result here) do not depend on those buffers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from mctool.fastgrad import Plan, plan_for, second_order
from mctool.functional import FlatNet

MODES = ("constant", "adjoint", "unrolled")

Augment = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass
class MatchResult:
    """Outcome of one trajectory-matching evaluation."""

    loss: float  # L = ‖w_N − θ_T‖² / D
    grad_images: torch.Tensor  # dL/dX, shape of X (rows in no batch are 0)
    grad_alpha: float  # dL/dα
    start_distance: float  # D = ‖θ_s − θ_T‖², useful for logging


def _step_loss(
    net: FlatNet,
    w: torch.Tensor,
    x_batch: torch.Tensor,
    y_batch: torch.Tensor,
    augment: Augment | None,
    k: int,
) -> torch.Tensor:
    """ℓ_k(w, ·): mean cross-entropy on the (augmented) batch of step k."""
    if augment is not None:
        x_batch = augment(x_batch, k)
    # F.cross_entropy takes int64 class indices and float probability targets alike.
    # mctool.fastgrad writes this loss out by hand (_head): change both together.
    return F.cross_entropy(net(w, x_batch), y_batch)


def _plain_grad(
    net: FlatNet,
    w: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor,
    idx: torch.Tensor,
    augment: Augment | None,
    k: int,
) -> torch.Tensor:
    """g_k = ∇_w ℓ_k(w, X) as a plain value: no graph to X and none kept afterwards."""
    w = w.detach().requires_grad_(True)
    loss = _step_loss(net, w, images.detach()[idx], labels[idx], augment, k)
    (g,) = torch.autograd.grad(loss, w)
    return g


def _second_order_step(
    net: FlatNet,
    plan: Plan | None,
    w: torch.Tensor,
    v: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor,
    idx: torch.Tensor,
    augment: Augment | None,
    k: int,
    want_hvp: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """For step k at w: g_k, (∂g_k/∂X[B_k])ᵀ v and, if `want_hvp`, H_k v (else None).

    With a `plan` the ConvNet's hand-written forward-over-reverse sweep (mctool.fastgrad)
    computes all three; otherwise autograd does, by one backward with ``create_graph`` and
    one double backward of vᵀg_k. Either way the augmentation is differentiated by autograd.
    """
    x_leaf = images.detach()[idx]
    if plan is not None:
        if augment is None:
            return second_order(plan, net, w, v, x_leaf, labels[idx], want_hvp)
        x_leaf.requires_grad_(True)
        x_aug = augment(x_leaf, k)
        g, e_aug, hv = second_order(plan, net, w, v, x_aug.detach(), labels[idx], want_hvp)
        (e,) = torch.autograd.grad(x_aug, x_leaf, e_aug)
        return g, e, hv
    w_leaf = w.detach().requires_grad_(True)
    x_leaf.requires_grad_(True)
    loss_k = _step_loss(net, w_leaf, x_leaf, labels[idx], augment, k)
    (g,) = torch.autograd.grad(loss_k, w_leaf, create_graph=True)
    s = torch.dot(g, v)
    if want_hvp:
        hv, e = torch.autograd.grad(s, [w_leaf, x_leaf])
        return g.detach(), e, hv
    (e,) = torch.autograd.grad(s, x_leaf)
    return g.detach(), e, None


def _forward_pass(
    net: FlatNet,
    images: torch.Tensor,
    labels: torch.Tensor,
    theta_start: torch.Tensor,
    alpha: float,
    batches: list[torch.Tensor],
    augment: Augment | None,
    keep_path: bool,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Pass 1 of ``constant``/``adjoint``: run the N steps with ᾱ, graph-free.

    Returns G = Σ g_k and, if `keep_path`, the list [w_0, …, w_N] (else empty).
    """
    w = theta_start.detach()
    grad_sum = torch.zeros_like(w)
    path = [w] if keep_path else []
    for k, idx in enumerate(batches):
        g = _plain_grad(net, w, images, labels, idx, augment, k)
        grad_sum.add_(g)
        w = torch.add(w, g, alpha=-alpha)  # out of place: earlier w_k may be stored
        if keep_path:
            path.append(w)
    return grad_sum, path


def _match_unrolled(
    net: FlatNet,
    images: torch.Tensor,
    labels: torch.Tensor,
    theta_start: torch.Tensor,
    theta_target: torch.Tensor,
    alpha: float,
    batches: list[torch.Tensor],
    augment: Augment | None,
    dist: torch.Tensor,
    fast_path: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MTT's exact gradient: one autograd graph over all N steps (`fast_path` is unused)."""
    x = images.detach().requires_grad_(True)
    a = torch.tensor(alpha, dtype=theta_start.dtype, device=theta_start.device, requires_grad=True)
    w = theta_start.detach().requires_grad_(True)
    for k, idx in enumerate(batches):
        loss_k = _step_loss(net, w, x[idx], labels[idx], augment, k)
        (g,) = torch.autograd.grad(loss_k, w, create_graph=True)
        w = w - a * g
    loss = (w - theta_target).pow(2).sum() / dist
    grad_x, grad_a = torch.autograd.grad(loss, [x, a])
    return loss.detach(), grad_x, grad_a


def _match_constant(
    net: FlatNet,
    images: torch.Tensor,
    labels: torch.Tensor,
    theta_start: torch.Tensor,
    theta_target: torch.Tensor,
    alpha: float,
    batches: list[torch.Tensor],
    augment: Augment | None,
    dist: torch.Tensor,
    fast_path: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MCT's truncated two-pass gradient, memory flat in N (see module docstring)."""
    grad_sum, _ = _forward_pass(net, images, labels, theta_start, alpha, batches, augment, False)
    residual = theta_start - alpha * grad_sum - theta_target
    loss = residual.pow(2).sum() / dist
    grad_a = -2.0 * torch.dot(grad_sum, residual) / dist
    v = residual * -alpha  # = ᾱ(θ_T − θ_s) + ᾱ² G
    del grad_sum, residual

    grad_x = torch.zeros_like(images)
    scale = 2.0 / dist
    plan = plan_for(net) if fast_path else None
    w = theta_start.detach()
    for k, idx in enumerate(batches):
        g, e, _ = _second_order_step(net, plan, w, v, images, labels, idx, augment, k, False)
        grad_x.index_add_(0, idx, e)
        # Same update as pass 1 (g is pass 1's g_k up to rounding), so w_k is reproduced
        # without storing it.
        w = torch.add(w, g, alpha=-alpha)
        del g, e
    grad_x.mul_(scale)
    return loss, grad_x, grad_a


def _match_adjoint(
    net: FlatNet,
    images: torch.Tensor,
    labels: torch.Tensor,
    theta_start: torch.Tensor,
    theta_target: torch.Tensor,
    alpha: float,
    batches: list[torch.Tensor],
    augment: Augment | None,
    dist: torch.Tensor,
    fast_path: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact gradient by a hand-written reverse sweep over stored w_k (see module docstring)."""
    _, path = _forward_pass(net, images, labels, theta_start, alpha, batches, augment, True)
    w_last = path.pop()
    loss = (w_last - theta_target).pow(2).sum() / dist
    lam = (w_last - theta_target) * (2.0 / dist)  # λ_N = ∂L/∂w_N
    del w_last

    grad_x = torch.zeros_like(images)
    grad_a = torch.zeros((), dtype=lam.dtype, device=lam.device)
    plan = plan_for(net) if fast_path else None
    for k in range(len(batches) - 1, -1, -1):
        w = path.pop()  # w_k; popping frees it after this step
        g, e, hv = _second_order_step(net, plan, w, lam, images, labels, batches[k], augment, k, True)
        grad_x.index_add_(0, batches[k], e, alpha=-alpha)  # −ᾱ (∂g_k/∂X_k)ᵀ λ_{k+1}
        grad_a -= torch.dot(g, lam)  # −g_kᵀ λ_{k+1}
        lam = torch.add(lam, hv, alpha=-alpha)  # λ_k = λ_{k+1} − ᾱ H_k λ_{k+1}
        del w, g, e, hv
    return loss, grad_x, grad_a


_IMPL = {"unrolled": _match_unrolled, "constant": _match_constant, "adjoint": _match_adjoint}


def match(
    net: FlatNet,
    images: torch.Tensor,
    labels: torch.Tensor,
    theta_start: torch.Tensor,
    theta_target: torch.Tensor,
    alpha: float,
    batches: list[torch.Tensor],
    augment: Augment | None,
    mode: str = "constant",
    fast_path: bool = True,
) -> MatchResult:
    """Trajectory-matching loss L and dL/dX, dL/dα for one (start, target) pair.

    Args:
        net: the student network as a function of a flat parameter vector.
        images: synthetic images X [n, C, H, W]; not modified, its ``.grad`` is not touched.
        labels: int64 [n] class indices or float [n, num_classes] probabilities.
        theta_start, theta_target: flat [P] parameters θ_s, θ_T.
        alpha: current value ᾱ of the learnable step size.
        batches: one int64 index tensor into X per inner step (N = len(batches) ≥ 1).
        augment: ``augment(x_batch, k)``, deterministic and differentiable for a fixed k
            (called more than once per step by ``constant``/``adjoint``), or None.
        mode: one of MODES; see the module docstring for the maths of each.
        fast_path: let ``constant``/``adjoint`` use mctool.fastgrad's hand-written sweep when
            the network qualifies (autograd's numbers up to rounding; a whole iteration
            ~1.4× faster on CPU); False forces autograd's double backward (tests, benchmarks).

    Raises:
        ValueError: unknown mode, no steps, wrong parameter sizes, or θ_s == θ_T (D = 0).
    """
    if mode not in MODES:
        raise ValueError(f"unknown matching mode {mode!r}; choose from {', '.join(MODES)}")
    if len(batches) == 0:
        raise ValueError("trajectory matching needs at least one inner step (batches is empty)")
    p = net.num_params
    if theta_start.shape != (p,) or theta_target.shape != (p,):
        raise ValueError(
            f"theta_start {tuple(theta_start.shape)} and theta_target {tuple(theta_target.shape)}"
            f" must both be flat vectors of the network's {p} parameters"
        )
    alpha = float(alpha)
    theta_start = theta_start.detach()
    theta_target = theta_target.detach()
    dist = (theta_start - theta_target).pow(2).sum()
    dist_value = float(dist)  # one host sync, needed for the check anyway
    if dist_value == 0.0:
        raise ValueError(
            "start and target parameters are identical (‖θ_start − θ_target‖² = 0): the "
            "normalised matching loss is undefined; pick a target later than the start"
        )
    # Index tensors must live with X for indexing/index_add_ (a no-op when they already do).
    batches = [b.to(device=images.device, dtype=torch.long) for b in batches]
    labels = labels.to(images.device)
    with torch.enable_grad():  # the caller may be in no_grad (e.g. an eval context)
        loss, grad_x, grad_a = _IMPL[mode](
            net, images, labels, theta_start, theta_target, alpha, batches, augment, dist, fast_path
        )
    return MatchResult(
        loss=float(loss),
        grad_images=grad_x.detach(),
        grad_alpha=float(grad_a),
        start_distance=dist_value,
    )
