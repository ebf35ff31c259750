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

Learned labels (``label_logits`` Z, DATM): the steps train on Y = softmax(Z). ℓ_k is linear in Y,
and with ż = ∂z/∂w·v the logits' tangent, ∂/∂y_i [vᵀ g_k] = ((ż_i·p_i)·1 − ż_i)/|B_k|; ``constant``
and ``adjoint`` add it to ∂L/∂Y wherever they add the image term (same v, same scale), and
∂L/∂Z = Y ⊙ (∂L/∂Y − ⟨Y, ∂L/∂Y⟩) at the end; ``unrolled`` keeps softmax(Z) in its graph
(docs/method.md, "Learned labels").

Cost per step: ``unrolled`` one forward + backward(create_graph) and, at the end, the double
backward of the whole graph; ``constant`` and ``adjoint`` one plain forward+backward (pass 1)
plus one second-order step (pass 2 / reverse) that yields g_k, the image term and, for
``adjoint``, H_k λ. For the ConvNet of every preset (conv → instance norm → ReLU → average
pooling) that step can be mctool.matching.fastgrad's hand-written forward-over-reverse sweep or
autograd's double backward; mctool.matching.secondorder picks one (by measurement by default). Any
other network uses autograd.

Micro-batching (``micro_batch``): with a network whose outputs are per-sample (no BatchNorm
in train mode; mctool.matching.microbatch), ℓ_k = Σ_chunks (1/|B_k|) Σ_{i ∈ chunk} CE_i, so g_k, H_k v
and the image term of step k are sums over consecutive chunks of B_k, each chunk's loss
divided by the whole |B_k|. ``constant`` and ``adjoint`` then hold one chunk's activations at
a time (memory set by the chunk, not by |B_k|); ``unrolled`` gets the same numbers but keeps
every chunk's graph to the end, so its memory hardly shrinks (only the final backward's
temporaries are one chunk's at a time). The augmentation of a chunk is
the step's own draw restricted to the chunk's rows (``augment(x, k, rows)``).

Gradients are taken with ``torch.autograd.grad`` w.r.t. private leaves (or by mctool.matching.fastgrad
under ``no_grad``), so nothing is accumulated into ``images.grad`` or into the module's
parameters. In modes ``constant`` and
``adjoint`` each step differentiates w.r.t. a leaf copy of its own batch X[B_k] and scatters the
result with ``index_add_`` (duplicates within a batch add up), which avoids a full-size
zero tensor per step. Note that a module with BatchNorm in train mode updates its running
statistics on every forward, so the recomputing modes update them twice per step; the
train-mode outputs (and so every result here) do not depend on those buffers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from mctool.matching.microbatch import accepts_rows, chunks, sample_coupling
from mctool.configs.choices import MODES  # defined without torch for the CLI
from mctool.matching.secondorder import POLICIES, SecondOrder, ce_loss
from mctool.models.functional import FlatNet

# augment(x_batch, k) for step k's whole batch; augment(x_chunk, k, rows) for the samples at
# positions `rows` (a slice) of step k's batch (needed only when micro-batching splits a batch).
Augment = Callable[..., torch.Tensor]


# The learnables every mode differentiates L with respect to (keys of MatchResult.grads):
# "images" X, "alpha" α and, when `match` is given label logits, "labels" Z. A new learnable
# adds its key here and its gradient to each of the three `_match_*` functions below (see
# docs/method.md, "Learnables").
LEARNED = ("images", "alpha", "labels")


@dataclass
class MatchResult:
    """Outcome of one trajectory-matching evaluation."""

    loss: float  # L = ‖w_N − θ_T‖² / D
    grads: dict[str, torch.Tensor]  # dL/d(learnable), keyed as LEARNED ("labels" only when learned); detached
    start_distance: float  # D = ‖θ_s − θ_T‖², useful for logging
    second_order: list[str] = field(default_factory=list)  # implementations used ("fastgrad", "autograd")

    @property
    def grad_images(self) -> torch.Tensor:
        """dL/dX, shape of X (rows in no batch are 0)."""
        return self.grads["images"]

    @property
    def grad_alpha(self) -> float:
        """dL/dα."""
        return float(self.grads["alpha"])


@dataclass
class _Inputs:
    """What every step of one match call shares."""

    net: FlatNet
    images: torch.Tensor
    labels: torch.Tensor  # the targets of every step: class indices or probabilities (softmax(Z) when learned)
    augment: Augment | None
    micro_batch: int | None
    logits: torch.Tensor | None = None  # the learned label logits Z (None: the labels are not learned)


def _augmented(inp: _Inputs, x: torch.Tensor, k: int, rows: slice | None) -> torch.Tensor:
    """A_k on a batch (rows None) or on the rows `rows` of step k's batch."""
    if inp.augment is None:
        return x
    return inp.augment(x, k) if rows is None else inp.augment(x, k, rows)


def _pieces(inp: _Inputs, idx: torch.Tensor) -> list[tuple[torch.Tensor, slice | None]]:
    """(index chunk, rows of the batch or None for the whole batch) for each micro-batch of `idx`."""
    parts = chunks(int(idx.numel()), inp.micro_batch)
    if len(parts) == 1:
        return [(idx, None)]
    return [(idx[rows], rows) for rows in parts]


def _plain_grad(inp: _Inputs, w: torch.Tensor, idx: torch.Tensor, k: int) -> torch.Tensor:
    """g_k = ∇_w ℓ_k(w, X) as a plain value (summed over micro-batches): no graph kept."""
    w = w.detach().requires_grad_(True)
    total = int(idx.numel())
    g: torch.Tensor | None = None
    images = inp.images.detach()
    for sub, rows in _pieces(inp, idx):
        x = _augmented(inp, images[sub], k, rows)
        (part,) = torch.autograd.grad(ce_loss(inp.net(w, x), inp.labels[sub], total), w)
        g = part if g is None else g.add_(part)
    assert g is not None
    return g


def _second_order_step(
    inp: _Inputs,
    so: SecondOrder,
    w: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor,
    k: int,
    want_hvp: bool,
    grad_x: torch.Tensor,
    e_scale: float,
    grad_y: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """For step k at w: g_k and, if `want_hvp`, H_k v (else None); adds e_scale·(∂g_k/∂X)ᵀ v to grad_x
    and, when `grad_y` is given (learned labels), e_scale·(∂g_k/∂Y)ᵀ v to it (Y the probabilities).

    Micro-batch by micro-batch: `so` computes each chunk's share of g_k, H_k v and the image
    term on the augmented chunk; autograd carries the image term back through the augmentation.
    """
    total = int(idx.numel())
    images = inp.images.detach()
    g: torch.Tensor | None = None
    hv: torch.Tensor | None = None
    for sub, rows in _pieces(inp, idx):
        x_leaf = images[sub]
        y = inp.labels[sub]
        want_label = grad_y is not None
        if inp.augment is None:
            g_c, e, hv_c, *ey = so(w, v, x_leaf, y, want_hvp, total, want_label)
        else:
            x_leaf.requires_grad_(True)
            x_aug = _augmented(inp, x_leaf, k, rows)
            g_c, e_aug, hv_c, *ey = so(w, v, x_aug.detach(), y, want_hvp, total, want_label)
            (e,) = torch.autograd.grad(x_aug, x_leaf, e_aug)
            del x_aug, e_aug
        grad_x.index_add_(0, sub, e, alpha=e_scale)  # duplicates within a batch add up
        if grad_y is not None:  # labels are not augmented: the term lands on the rows as it is
            grad_y.index_add_(0, sub, ey[0], alpha=e_scale)
        g = g_c if g is None else g.add_(g_c)
        if hv_c is not None:
            hv = hv_c if hv is None else hv.add_(hv_c)
        del x_leaf, e, g_c, hv_c
    assert g is not None
    return g, hv


def _forward_pass(
    inp: _Inputs,
    theta_start: torch.Tensor,
    alpha: float,
    batches: list[torch.Tensor],
    keep_path: bool,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Pass 1 of ``constant``/``adjoint``: run the N steps with ᾱ, graph-free.

    Returns G = Σ g_k and, if `keep_path`, the list [w_0, …, w_N] (else empty).
    """
    w = theta_start.detach()
    grad_sum = torch.zeros_like(w)
    path = [w] if keep_path else []
    for k, idx in enumerate(batches):
        g = _plain_grad(inp, w, idx, k)
        grad_sum.add_(g)
        w = torch.add(w, g, alpha=-alpha)  # out of place: earlier w_k may be stored
        if keep_path:
            path.append(w)
    return grad_sum, path


def _match_unrolled(
    inp: _Inputs,
    so: SecondOrder,
    theta_start: torch.Tensor,
    theta_target: torch.Tensor,
    alpha: float,
    batches: list[torch.Tensor],
    dist: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MTT's exact gradient: one autograd graph over all N steps (`so` is unused).

    Micro-batches give the same numbers but every chunk's graph is kept: no memory saving.
    """
    x = inp.images.detach().requires_grad_(True)
    a = torch.tensor(alpha, dtype=theta_start.dtype, device=theta_start.device, requires_grad=True)
    w = theta_start.detach().requires_grad_(True)
    leaves = [x, a]
    labels = inp.labels
    if inp.logits is not None:  # Y = softmax(Z) inside the graph: autograd gives dL/dZ directly
        z = inp.logits.detach().requires_grad_(True)
        labels = _probabilities(z)
        leaves.append(z)
    for k, idx in enumerate(batches):
        total = int(idx.numel())
        g: torch.Tensor | None = None
        for sub, rows in _pieces(inp, idx):
            loss_c = ce_loss(inp.net(w, _augmented(inp, x[sub], k, rows)), labels[sub], total)
            (part,) = torch.autograd.grad(loss_c, w, create_graph=True)
            g = part if g is None else g + part
        w = w - a * g
    loss = (w - theta_target).pow(2).sum() / dist
    grad_x, grad_a, *grad_z = torch.autograd.grad(loss, leaves)
    grads = {"images": grad_x, "alpha": grad_a}
    if grad_z:
        grads["labels"] = grad_z[0]
    return loss.detach(), grads


def _match_constant(
    inp: _Inputs,
    so: SecondOrder,
    theta_start: torch.Tensor,
    theta_target: torch.Tensor,
    alpha: float,
    batches: list[torch.Tensor],
    dist: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MCT's truncated two-pass gradient, memory flat in N (see module docstring)."""
    grad_sum, _ = _forward_pass(inp, theta_start, alpha, batches, False)
    residual = theta_start - alpha * grad_sum - theta_target
    loss = residual.pow(2).sum() / dist
    grad_a = -2.0 * torch.dot(grad_sum, residual) / dist
    v = residual * -alpha  # = ᾱ(θ_T − θ_s) + ᾱ² G
    del grad_sum, residual

    grad_x = torch.zeros_like(inp.images)
    grad_y = _label_accumulator(inp)
    scale = 2.0 / dist
    w = theta_start.detach()
    for k, idx in enumerate(batches):
        g, _ = _second_order_step(inp, so, w, v, idx, k, False, grad_x, 1.0, grad_y)
        # Same update as pass 1 (g is pass 1's g_k up to rounding), so w_k is reproduced
        # without storing it.
        w = torch.add(w, g, alpha=-alpha)
        del g
    grad_x.mul_(scale)
    grads = {"images": grad_x, "alpha": grad_a}
    if grad_y is not None:
        grads["labels"] = _logit_grad(inp.labels, grad_y.mul_(scale))
    return loss, grads


def _match_adjoint(
    inp: _Inputs,
    so: SecondOrder,
    theta_start: torch.Tensor,
    theta_target: torch.Tensor,
    alpha: float,
    batches: list[torch.Tensor],
    dist: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Exact gradient by a hand-written reverse sweep over stored w_k (see module docstring)."""
    _, path = _forward_pass(inp, theta_start, alpha, batches, True)
    w_last = path.pop()
    loss = (w_last - theta_target).pow(2).sum() / dist
    lam = (w_last - theta_target) * (2.0 / dist)  # λ_N = ∂L/∂w_N
    del w_last

    grad_x = torch.zeros_like(inp.images)
    grad_y = _label_accumulator(inp)
    grad_a = torch.zeros((), dtype=lam.dtype, device=lam.device)
    for k in range(len(batches) - 1, -1, -1):
        w = path.pop()  # w_k; popping frees it after this step
        # grad_x += −ᾱ (∂g_k/∂X_k)ᵀ λ_{k+1}
        # (and ∂L/∂Y += −ᾱ (∂g_k/∂Y)ᵀ λ_{k+1} when the labels are learned)
        g, hv = _second_order_step(inp, so, w, lam, batches[k], k, True, grad_x, -alpha, grad_y)
        assert hv is not None
        grad_a -= torch.dot(g, lam)  # −g_kᵀ λ_{k+1}
        lam = torch.add(lam, hv, alpha=-alpha)  # λ_k = λ_{k+1} − ᾱ H_k λ_{k+1}
        del w, g, hv
    grads = {"images": grad_x, "alpha": grad_a}
    if grad_y is not None:
        grads["labels"] = _logit_grad(inp.labels, grad_y)
    return loss, grads


def _probabilities(logits: torch.Tensor) -> torch.Tensor:
    """The soft targets Y = softmax(Z) of learned label logits Z (temperature 1, as DATM)."""
    return torch.softmax(logits, dim=1)


def _label_accumulator(inp: _Inputs) -> torch.Tensor | None:
    """∂L/∂Y's accumulator [n, classes] when the labels are learned, else None."""
    return None if inp.logits is None else torch.zeros_like(inp.labels)


def _logit_grad(y: torch.Tensor, grad_y: torch.Tensor) -> torch.Tensor:
    """∂L/∂Z from ∂L/∂Y through Y = softmax(Z): Y ⊙ (∂L/∂Y − ⟨Y, ∂L/∂Y⟩ per row)."""
    return y * (grad_y - (y * grad_y).sum(1, keepdim=True))


_IMPL = {"unrolled": _match_unrolled, "constant": _match_constant, "adjoint": _match_adjoint}


def check_micro_batch(net: FlatNet, micro_batch: int | None) -> None:
    """Raise ValueError (one line) if `micro_batch` is invalid or `net` couples the samples of a batch."""
    if micro_batch is None or micro_batch == 0:
        return
    if micro_batch < 0:
        raise ValueError(f"the micro-batch must be a positive number of images (0 or none: whole batch), "
                         f"got {micro_batch}")
    why = sample_coupling(net.module)
    if why is not None:
        raise ValueError(f"cannot split inner steps into micro-batches: {why}, so the network's result on a "
                         "batch is not the sum of its micro-batches' (drop the micro-batch option)")


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
    fast_path: bool | str = "auto",
    micro_batch: int | None = None,
    label_logits: torch.Tensor | None = None,
) -> MatchResult:
    """Trajectory-matching loss L and its gradients (dL/dX, dL/dα: `MatchResult.grads`) for one
    (start, target) pair.

    Args:
        net: the student network as a function of a flat parameter vector.
        images: synthetic images X [n, C, H, W]; not modified, its ``.grad`` is not touched.
        labels: int64 [n] class indices or float [n, num_classes] probabilities.
        theta_start, theta_target: flat [P] parameters θ_s, θ_T.
        alpha: current value ᾱ of the learnable step size.
        batches: one int64 index tensor into X per inner step (N = len(batches) ≥ 1).
        augment: ``augment(x_batch, k)``, deterministic and differentiable for a fixed k
            (called more than once per step by ``constant``/``adjoint``), or None. When
            micro-batches split a batch it is called as ``augment(x_chunk, k, rows)`` with
            `rows` the chunk's positions (a slice) in step k's batch, and must apply the
            step's draw for exactly those samples (mctool.data.augment.StepAugment does).
        mode: one of MODES; see the module docstring for the maths of each.
        fast_path: which implementation runs the second-order steps of ``constant``/``adjoint``
            on a network mctool.matching.fastgrad supports: "auto" (measure both on the first step of
            each shape and keep the faster: mctool.matching.secondorder), True or "fastgrad" (the
            hand-written sweep), False or "autograd" (autograd's double backward: tests,
            benchmarks). Other networks always use autograd.
        micro_batch: compute every inner step in consecutive chunks of at most this many
            images (None or 0: whole batches). Same result to rounding; ``constant`` and
            ``adjoint`` then need one chunk's activations instead of one batch's.
        label_logits: learned label logits Z [n, classes] (DATM's soft labels): the steps then
            train on Y = softmax(Z) (`labels` is ignored and may be None) and ``grads["labels"]``
            is dL/dZ, in every mode as exact as the image gradient (docs/method.md, "Learned labels").

    Raises:
        ValueError: unknown mode, no steps, wrong parameter sizes, θ_s == θ_T (D = 0), a
            negative micro-batch, or micro-batches that would split a batch of a network that
            couples samples (BatchNorm in train mode), or with an augment that takes no rows.
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
    policy = {True: "fastgrad", False: "autograd"}.get(fast_path, fast_path)  # type: ignore[call-overload]
    if policy not in POLICIES:
        raise ValueError(f"fast_path must be True, False or one of {', '.join(POLICIES)}, got {fast_path!r}")
    micro_batch = micro_batch or None
    if micro_batch is not None and (micro_batch < 0 or micro_batch < max(int(b.numel()) for b in batches)):
        check_micro_batch(net, micro_batch)  # coupling matters only when a batch is really split
        if augment is not None and not accepts_rows(augment):
            raise ValueError("micro-batches need an augmentation called as augment(x, k, rows) that applies "
                             "step k's draw to the batch rows `rows` (mctool.data.augment.StepAugment)")
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
    if label_logits is not None:
        if label_logits.dim() != 2 or label_logits.shape[0] != images.shape[0]:
            raise ValueError(f"label_logits {tuple(label_logits.shape)} must be [n, classes] for the {images.shape[0]} "
                             "images")
        logits = label_logits.detach().to(images.device)
        inp = _Inputs(net, images, _probabilities(logits), augment, micro_batch, logits)
    else:
        inp = _Inputs(net, images, labels.to(images.device), augment, micro_batch)
    so = SecondOrder(net, policy)
    with torch.enable_grad():  # the caller may be in no_grad (e.g. an eval context)
        loss, grads = _IMPL[mode](inp, so, theta_start, theta_target, alpha, batches, dist)
    return MatchResult(
        loss=float(loss),
        grads={k: g.detach() for k, g in grads.items()},
        start_distance=dist_value,
        second_order=sorted(so.used),
    )
