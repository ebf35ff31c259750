r"""The second-order step of ``constant``/``adjoint`` matching, and which implementation runs it.

For a batch x (already augmented), labels y, parameters w and a direction v, one step gives

    g = ∇_w ℓ,   e = ∂/∂x [vᵀ ∇_w ℓ],   h = ∇²_w ℓ · v   (h only when asked),

with ℓ = Σ_i CE_i / total (total = the whole batch's size; a micro-batch passes its batch's), and,
when asked (learned labels), the label term  e_y = ∂/∂y [vᵀ ∇_w ℓ]  [B, classes] as a fourth item.
Two implementations give the same numbers up to rounding:

``fastgrad``  mctool.matching.fastgrad's hand-written forward-over-reverse sweep (ConvNets with instance
              norm only: ``plan_for`` says which);
``autograd``  one backward with ``create_graph`` and one double backward of vᵀg.

Which is faster depends on the device, the shapes and the library versions (fastgrad was ~1.4×
faster on the project's 2-core CPU; on GPUs cuDNN's fused kernels may win), so policy
``"auto"`` measures both on the first step of each (device, dtype, image shape, batch size
rounded up to a power of two, network, want_hvp) and keeps the faster for the rest of the process, as cudnn.benchmark does for
convolution algorithms. The decision and its timings are kept in a process-wide table
(``choices()``) so a caller can report them. Ties go to fastgrad (it must be ``TIE_MARGIN``
slower to lose) so that run-to-run noise does not flip a decision that changes rounding.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from mctool.matching.fastgrad import Plan, plan_for, second_order
from mctool.configs.choices import POLICIES  # defined without torch for the CLI
from mctool.models.functional import FlatNet

IMPLS = ("fastgrad", "autograd")
TIE_MARGIN = 1.05  # autograd must be this much faster than fastgrad to be chosen

# (g, e, h) — and e_y as a fourth item when the label term is asked for (`want_label`).
Step = tuple[torch.Tensor, ...]


def ce_loss(logits: torch.Tensor, y: torch.Tensor, total: int) -> torch.Tensor:
    """Σ CE / total: the batch mean when `total` is the batch size, a chunk's share of it otherwise."""
    # F.cross_entropy takes int64 class indices and float probability targets alike.
    # mctool.matching.fastgrad writes this loss out by hand (_head): change both together.
    if total == logits.shape[0]:
        return F.cross_entropy(logits, y)
    return F.cross_entropy(logits, y, reduction="sum") / total


def autograd_step(net: FlatNet, w: torch.Tensor, v: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                  want_hvp: bool, total: int, want_label: bool = False) -> Step:
    """(g, e, h) by autograd: backward with create_graph, then the double backward of vᵀg
    (with `want_label`, (g, e, h, e_y): the labels are one more leaf of the same double backward)."""
    w_leaf = w.detach().requires_grad_(True)
    x_leaf = x.detach().requires_grad_(True)
    y_leaf = y.detach().requires_grad_(True) if want_label else y
    (g,) = torch.autograd.grad(ce_loss(net(w_leaf, x_leaf), y_leaf, total), w_leaf, create_graph=True)
    s = torch.dot(g, v)
    if want_label:
        leaves = [x_leaf, y_leaf] + ([w_leaf] if want_hvp else [])
        e, ey, *rest = torch.autograd.grad(s, leaves)
        return g.detach(), e, rest[0] if want_hvp else None, ey
    if want_hvp:
        hv, e = torch.autograd.grad(s, [w_leaf, x_leaf])
        return g.detach(), e, hv
    (e,) = torch.autograd.grad(s, x_leaf)
    return g.detach(), e, None


def run_step(impl: str, plan: Plan | None, net: FlatNet, w: torch.Tensor, v: torch.Tensor, x: torch.Tensor,
             y: torch.Tensor, want_hvp: bool, total: int, want_label: bool = False) -> Step:
    """(g, e, h) (and e_y with `want_label`) by implementation `impl` ("fastgrad" needs a plan)."""
    if impl == "fastgrad":
        assert plan is not None
        return second_order(plan, net, w, v, x.detach(), y, want_hvp, batch_size=total, want_label=want_label)
    return autograd_step(net, w, v, x, y, want_hvp, total, want_label)


@dataclass
class Choice:
    """Which implementation runs the second-order steps of one problem shape, and why."""

    impl: str  # one of IMPLS
    reason: str  # "measured", "requested", "network not supported by fastgrad", "fastgrad out of memory" …
    seconds: dict[str, float] = field(default_factory=dict)  # best measured time of a step, by impl
    key: str = ""  # the problem shape it applies to, readable

    def describe(self) -> str:
        """One line for a log: 'fastgrad (measured: fastgrad 0.31 s, autograd 0.45 s per step; …)'."""
        times = ", ".join(f"{k} {t:.3g} s" for k, t in self.seconds.items())
        detail = f"{self.reason}: {times} per step" if times else self.reason
        return f"{self.impl} ({detail}; {self.key})" if self.key else f"{self.impl} ({detail})"


_CHOICES: dict[tuple, Choice] = {}


def choices() -> list[Choice]:
    """Every decision made by policy "auto" in this process, in order (for reports and artifacts)."""
    return list(_CHOICES.values())


def forget_choices() -> None:
    """Clear the measured decisions (tests; a new device)."""
    _CHOICES.clear()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> tuple[float, Step]:
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


class SecondOrder:
    """Computes second-order steps for one matching call under a policy (see module docstring)."""

    def __init__(self, net: FlatNet, policy: str) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown second-order policy {policy!r}; choose from {', '.join(POLICIES)}")
        self.net, self.policy = net, policy
        self.plan = plan_for(net) if policy != "autograd" else None
        self.used: set[str] = set()

    def __call__(self, w: torch.Tensor, v: torch.Tensor, x: torch.Tensor, y: torch.Tensor, want_hvp: bool,
                 total: int, want_label: bool = False) -> Step:
        """(g, e, h) of ℓ = Σ CE / total on the (augmented) batch x; e has x's shape; with
        `want_label` also e_y = ∂/∂y [vᵀg] (y's shape: float probabilities)."""
        if self.plan is None or self.policy == "fastgrad":
            impl = "autograd" if self.plan is None else "fastgrad"
            self.used.add(impl)
            return run_step(impl, self.plan, self.net, w, v, x, y, want_hvp, total, want_label)
        # Batch sizes by power-of-two bucket: the chunks of one batch (equal to within one image)
        # and the batches of a run share one decision instead of each paying for a measurement.
        bucket = 1 << max(0, int(x.shape[0]) - 1).bit_length()
        key = (x.device.type, x.device.index, x.dtype, bucket, tuple(x.shape[1:]), y.dtype, y.dim(), self.plan,
               self.net.num_params, want_hvp, want_label)
        choice = _CHOICES.get(key)
        if choice is not None:
            self.used.add(choice.impl)
            return run_step(choice.impl, self.plan, self.net, w, v, x, y, want_hvp, total, want_label)
        choice, out = self._measure(w, v, x, y, want_hvp, total, want_label)
        choice.key = (f"{x.device.type} {str(x.dtype).removeprefix('torch.')}, measured on a batch "
                      f"{tuple(x.shape)}{' with Hessian-vector product' if want_hvp else ''}")
        _CHOICES[key] = choice
        self.used.add(choice.impl)
        return out

    def _measure(self, w: torch.Tensor, v: torch.Tensor, x: torch.Tensor, y: torch.Tensor, want_hvp: bool,
                 total: int, want_label: bool = False) -> tuple[Choice, Step]:
        """Time both on this very step (a warm-up and two interleaved runs each); return the faster's result."""
        device = x.device
        best: dict[str, float] = {}
        results: dict[str, Step] = {}
        try:
            for rep in range(3):
                for impl in IMPLS:
                    seconds, out = _timed(
                        lambda: run_step(impl, self.plan, self.net, w, v, x, y, want_hvp, total, want_label), device)
                    if rep > 0:  # the first call of each pays one-off costs (kernels, algorithm search)
                        best[impl] = min(best.get(impl, seconds), seconds)
                    results[impl] = out
                    del out
        except torch.cuda.OutOfMemoryError:
            # autograd's double backward keeps more activations than the sweep; a micro-batch sized
            # for the sweep may not fit it.
            results.pop("autograd", None)
            if "fastgrad" not in results:
                results["fastgrad"] = run_step("fastgrad", self.plan, self.net, w, v, x, y, want_hvp, total,
                                               want_label)
            return Choice("fastgrad", "autograd ran out of memory", best), results["fastgrad"]
        impl = "autograd" if best["autograd"] * TIE_MARGIN < best["fastgrad"] else "fastgrad"
        return Choice(impl, "measured", best), results[impl]
