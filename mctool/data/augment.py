"""Differentiable Siamese Augmentation (DSA) with replayable draws (method.md §3.1).

Sampling and applying are separate: ``DSA.sample`` draws one op and its small per-sample
parameters from a caller-supplied CPU ``torch.Generator`` into an ``AugParams``;
``DSA.apply`` is a deterministic, differentiable function of the images given those
parameters. Distillation can thus run an augmentation without a graph and later replay the
identical augmentation with one, and CPU and CUDA runs see the same draws.

Why plain torch ops and not kornia.augmentation: kornia's random augmentations have their
own parameter ranges and sampling (e.g. ColorJitter's saturation works in HSV, RandomCrop
crops instead of shifting with zero fill), and their parameter replay is tied to kornia's
own generators, so neither the §3.1 formulas nor "draw from our generator, replay later"
fit without working around them. kornia.geometry's warp_affine wraps the same
affine_grid/grid_sample pair but works in pixel coordinates with its own normalisation;
calling F.affine_grid/F.grid_sample directly with align_corners=True is exactly what §3.1
specifies, so every op here is a few vectorised torch lines.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# Defined without torch for the CLI; OPS is re-exported.
from mctool.configs.choices import DEFAULT_STRATEGY, OPS, augment_problem  # noqa: F401
from mctool.core.errors import UsageError


# ParamDiffAug values of the reference (method.md §3.1).
PROB_FLIP = 0.5
RATIO_SCALE = 1.2
RATIO_ROTATE = 15.0  # degrees
RATIO_CROP_PAD = 0.125
RATIO_CUTOUT = 0.5
BRIGHTNESS = 1.0
SATURATION = 2.0
CONTRAST = 0.5


@dataclass(frozen=True)
class AugParams:
    """One augmentation draw for a batch: the op and its per-sample parameters.

    ``values`` by op (all shaped (B,)):
      color:  brightness, saturation, contrast — the raw U[0,1) draws r of each step
      crop:   tx (row shift), ty (column shift) — int64
      cutout: ox (row centre), oy (column centre) — int64
      flip:   flip — bool, True where the sample is flipped
      scale:  sx, sy — grid scale factors
      rotate: angle — radians
      none:   {}
    """

    op: str
    values: dict[str, torch.Tensor] = field(default_factory=dict)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> AugParams:
        """A copy on `device`; floating-point values also cast to `dtype` when given."""
        device = torch.device(device)
        moved = {}
        for k, v in self.values.items():
            if dtype is not None and v.is_floating_point():
                v = v.to(dtype)  # cast where the draw lies, so the copy below stays a plain copy
            if device.type == "cuda" and v.device.type == "cpu":
                # Draws are made on the CPU for every batch; a copy from pageable memory would wait
                # for all queued GPU work each time, a pinned non-blocking one does not.
                v = v.pin_memory().to(device, non_blocking=True)
            moved[k] = v.to(device)
        return AugParams(self.op, moved)

    def select(self, rows: slice | torch.Tensor) -> AugParams:
        """The draw for the samples at positions `rows` of the batch: the same op, their parameters."""
        return AugParams(self.op, {k: v[rows] for k, v in self.values.items()})

    @property
    def batch(self) -> int | None:
        """Number of samples the draw is for (None for the identity)."""
        for v in self.values.values():
            return int(v.shape[0])
        return None


def crop_shift(size: int) -> int:
    """Maximum translation in pixels along an axis of `size` pixels (4 for 32, 8 for 64)."""
    return int(size * RATIO_CROP_PAD + 0.5)


def cutout_size(size: int) -> int:
    """Side of the cutout square along an axis of `size` pixels (16 for 32)."""
    return int(size * RATIO_CUTOUT + 0.5)


class DSA:
    """Mode-'S' DSA: each call picks ONE op uniformly from the strategy and applies it per sample."""

    def __init__(self, strategy: str = DEFAULT_STRATEGY, flip: bool = True) -> None:
        self.strategy = strategy
        self.flip = flip
        problem = augment_problem(strategy)
        if problem is not None:
            raise UsageError(problem)
        ops: list[str] = [] if strategy.lower() == "none" else strategy.split("_")
        # Digit datasets (MNIST-like) must not be mirrored: flip=False removes the op
        # rather than making it a no-op, so the other ops keep a uniform share.
        self.ops: tuple[str, ...] = tuple(o for o in ops if flip or o != "flip")

    def __repr__(self) -> str:
        return f"DSA(strategy={self.strategy!r}, flip={self.flip}, ops={self.ops})"

    def sample(self, batch: int, height: int, width: int, generator: torch.Generator) -> AugParams:
        """Draw one op and its per-sample parameters (CPU tensors) from `generator`."""
        if generator.device.type != "cpu":
            # A CPU generator keeps draws identical whatever device the images live on.
            raise ValueError("DSA.sample needs a CPU torch.Generator")
        if not self.ops:
            return AugParams("none", {})
        g = generator
        op = self.ops[int(torch.randint(0, len(self.ops), (1,), generator=g))]
        if op == "color":
            values = {
                "brightness": torch.rand(batch, generator=g),
                "saturation": torch.rand(batch, generator=g),
                "contrast": torch.rand(batch, generator=g),
            }
        elif op == "crop":
            sh, sw = crop_shift(height), crop_shift(width)
            values = {
                "tx": torch.randint(-sh, sh + 1, (batch,), generator=g),
                "ty": torch.randint(-sw, sw + 1, (batch,), generator=g),
            }
        elif op == "cutout":
            ch, cw = cutout_size(height), cutout_size(width)
            values = {
                "ox": torch.randint(0, height + 1 - ch % 2, (batch,), generator=g),
                "oy": torch.randint(0, width + 1 - cw % 2, (batch,), generator=g),
            }
        elif op == "flip":
            values = {"flip": torch.rand(batch, generator=g) < PROB_FLIP}
        elif op == "scale":
            lo, hi = 1.0 / RATIO_SCALE, RATIO_SCALE
            values = {
                "sx": torch.rand(batch, generator=g) * (hi - lo) + lo,
                "sy": torch.rand(batch, generator=g) * (hi - lo) + lo,
            }
        else:  # rotate
            max_rad = RATIO_ROTATE / 180.0 * math.pi
            values = {"angle": (torch.rand(batch, generator=g) - 0.5) * 2.0 * max_rad}
        return AugParams(op, values)

    def apply(self, x: torch.Tensor, params: AugParams) -> torch.Tensor:
        """Apply the drawn augmentation to `x` (B×C×H×W): deterministic, differentiable in `x`."""
        if params.op == "none":
            return x
        if x.dim() != 4:
            raise ValueError(f"DSA expects a B×C×H×W tensor, got shape {tuple(x.shape)}")
        if params.batch != x.shape[0]:
            raise ValueError(f"augmentation drawn for {params.batch} samples, got {x.shape[0]}")
        p = params.to(x.device, x.dtype).values
        if params.op == "color":
            x = _brightness(x, p["brightness"])
            x = _saturation(x, p["saturation"])
            return _contrast(x, p["contrast"])
        if params.op == "crop":
            return _translate(x, p["tx"], p["ty"])
        if params.op == "cutout":
            return _cutout(x, p["ox"], p["oy"])
        if params.op == "flip":
            return torch.where(p["flip"].view(-1, 1, 1, 1), x.flip(3), x)
        if params.op == "scale":
            zero = torch.zeros_like(p["sx"])
            theta = torch.stack(
                [torch.stack([p["sx"], zero, zero], 1), torch.stack([zero, p["sy"], zero], 1)], 1
            )
            return _warp(x, theta)
        if params.op == "rotate":
            return _warp(x, _rotation_theta(p["angle"], x.shape[2], x.shape[3]))
        raise UsageError(f"unknown augmentation op {params.op!r}")

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Sample a draw for `x` from `generator` and apply it."""
        return self.apply(x, self.sample(x.shape[0], x.shape[2], x.shape[3], generator))


class StepAugment:
    """Pre-drawn DSA params of each inner step, replayed on demand (what matching calls).

    ``aug(x, k)`` augments step k's whole batch; ``aug(x, k, rows)`` augments the samples at
    positions `rows` (a slice) of that batch with exactly their parameters, so a micro-batch
    sees the same augmentation as in the whole batch.
    """

    def __init__(self, dsa: DSA, params: Sequence[AugParams]) -> None:
        self.dsa = dsa
        self.params = list(params)

    def __call__(self, x: torch.Tensor, k: int, rows: slice | None = None) -> torch.Tensor:
        p = self.params[k]
        return self.dsa.apply(x, p if rows is None else p.select(rows))


def _brightness(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    return x + (r.view(-1, 1, 1, 1) - 0.5) * BRIGHTNESS


def _saturation(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    m = x.mean(dim=1, keepdim=True)  # per-pixel channel mean; 1 channel => identity
    return (x - m) * (r.view(-1, 1, 1, 1) * SATURATION) + m


def _contrast(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - m) * (r.view(-1, 1, 1, 1) + CONTRAST) + m


def _translate(x: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    """out[b, :, i, j] = x[b, :, i + tx_b, j + ty_b] inside the image, else 0."""
    b, _, h, w = x.shape
    # One zero pixel of padding on each side; clamping an out-of-range index into it reads 0,
    # so a single gather gives an exact shift with zero fill for every sample at once.
    xp = F.pad(x, (1, 1, 1, 1))
    rows = (torch.arange(h, device=x.device).view(1, h) + tx.view(b, 1) + 1).clamp(0, h + 1)
    cols = (torch.arange(w, device=x.device).view(1, w) + ty.view(b, 1) + 1).clamp(0, w + 1)
    bidx = torch.arange(b, device=x.device).view(b, 1, 1)
    out = xp.permute(0, 2, 3, 1)[bidx, rows.view(b, h, 1), cols.view(b, 1, w)]  # B×H×W×C
    return out.permute(0, 3, 1, 2)


def _cutout(x: torch.Tensor, ox: torch.Tensor, oy: torch.Tensor) -> torch.Tensor:
    """Zero, per sample, the square of side cutout_size centred at (ox, oy), clipped to the image."""
    b, _, h, w = x.shape
    ch, cw = cutout_size(h), cutout_size(w)
    r0 = (ox - ch // 2).view(b, 1)
    c0 = (oy - cw // 2).view(b, 1)
    rows = torch.arange(h, device=x.device).view(1, h)
    cols = torch.arange(w, device=x.device).view(1, w)
    in_r = (rows >= r0) & (rows < r0 + ch)  # B×H
    in_c = (cols >= c0) & (cols < c0 + cw)  # B×W
    keep = ~(in_r.view(b, 1, h, 1) & in_c.view(b, 1, 1, w))
    return x * keep.to(x.dtype)


def _rotation_theta(angle: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """affine_grid matrices rotating by `angle` about the image centre (B×2×3)."""
    cos, sin = torch.cos(angle), torch.sin(angle)
    # affine_grid works in [-1, 1] coordinates per axis; for non-square images the
    # off-diagonal terms are rescaled by the aspect ratio so the rotation is rigid in pixel
    # space. For square images (all the datasets) the factors are 1 and this is exactly
    # [[cos, -sin, 0], [sin, cos, 0]] of §3.1.
    a_xy = (h - 1) / max(w - 1, 1)
    a_yx = (w - 1) / max(h - 1, 1)
    zero = torch.zeros_like(angle)
    row0 = torch.stack([cos, -sin * a_xy, zero], 1)
    row1 = torch.stack([sin * a_yx, cos, zero], 1)
    return torch.stack([row0, row1], 1)


def _warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
