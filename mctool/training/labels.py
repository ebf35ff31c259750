"""Labels from an expert (DATM's rule), shared by learned soft labels and evaluate's baseline.

DATM (ICLR 2024) initialises its learned soft labels from an expert: real images drawn per class
that the expert misclassifies are replaced by real images of the same class it classifies right,
and each image's label logits are the expert's logits on it. `mctool distill --learn-labels`
starts from this; `mctool evaluate --baseline random --baseline-labels expert` labels its random
real images by the same rule, so that the gain over random real compares like with like.

The expert is the buffer's first expert at its final epoch K (docs/method.md, "Learned labels").
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mctool import store
from mctool.models.functional import FlatNet
from mctool.models import build_model
from mctool.convexify.trajectory import ConvexTrajectory

Predict = Callable[[torch.Tensor], torch.Tensor]  # images -> logits [n, classes], no graph

CHUNK = 500  # images per forward pass: bounds the activations' memory on large pools


def expert_predictor(buffer: store.Buffer, method: str, device: torch.device) -> Predict:
    """The logits of the buffer's first finished expert at its final epoch K: the end of its
    convexified path for `method` "mct", its last snapshot for "mtt"."""
    net = FlatNet(build_model(buffer.spec, seed=0).to(device))
    # convex_experts / done_experts refuse a buffer without one (ArtifactError, one line).
    if method == "mct":
        w, b = buffer.convex_expert(int(buffer.convex_experts()[0]))
        positions = list(buffer.convex.meta.positions)
        theta = ConvexTrajectory(w, b, positions, buffer.layer_sizes).to(device).at(float(positions[-1]))
    else:
        info = buffer.require_experts()
        theta = buffer.snapshot(int(buffer.done_experts()[0]), info.epochs).to(device)

    @torch.no_grad()
    def predict(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([net(theta, x[i:i + CHUNK]) for i in range(0, x.shape[0], CHUNK)]) if x.shape[0] else \
            net(theta, x)

    return predict


def _predicted(predict: Predict, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The expert's class for images x[idx] (CPU int64), a chunk at a time."""
    out = [predict(x[idx[i:i + CHUNK].to(x.device)]).argmax(1).cpu() for i in range(0, idx.numel(), CHUNK)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def replace_misclassified(predict: Predict, x: torch.Tensor, y: torch.Tensor, picks: torch.Tensor,
                          generator: torch.Generator, pool: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """`picks` (CPU indices into x, y) with every image the expert misclassifies replaced by a
    random image of the same class from `pool` (default: all) that it classifies right and that
    is not picked already. Returns (the picks, how many misclassified ones had no replacement:
    they stay). Only the classes with a misclassified pick are scanned."""
    y_cpu = y.cpu()
    picks = picks.clone()
    wrong = _predicted(predict, x, picks) != y_cpu[picks]
    if not bool(wrong.any()):
        return picks, 0
    candidates = pool.cpu() if pool is not None else torch.arange(y_cpu.numel())
    taken = torch.zeros(y_cpu.numel(), dtype=torch.bool)
    taken[picks] = True
    left = 0
    for c in torch.unique(y_cpu[picks[wrong]]).tolist():
        slots = torch.nonzero(wrong & (y_cpu[picks] == c)).flatten()
        pool_c = candidates[(y_cpu[candidates] == c) & ~taken[candidates]]
        pool_c = pool_c[torch.randperm(pool_c.numel(), generator=generator)]
        right = pool_c[_predicted(predict, x, pool_c) == c]
        k = min(slots.numel(), right.numel())
        picks[slots[:k]] = right[:k]
        left += slots.numel() - k
    return picks, left


def expert_logits(predict: Predict, images: torch.Tensor) -> torch.Tensor:
    """The expert's logits on `images`: the initial label logits of DATM's rule."""
    return predict(images).detach()
