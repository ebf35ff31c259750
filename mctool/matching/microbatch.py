"""Micro-batching of an inner step: chunks of a batch, and which networks allow it.

One inner step of trajectory matching works on the mean loss of a batch B_k. When every
sample's output depends on that sample alone, ℓ_k = Σ_chunks (1/|B_k|) Σ_{i ∈ chunk} CE_i,
so g_k, the image term and the Hessian-vector product are sums over chunks (mctool.matching.loss).
A network that mixes samples in its forward pass (BatchNorm's batch statistics) breaks this:
chunking would silently change the maths, so it is refused instead.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd


def chunks(n: int, size: int | None) -> list[slice]:
    """Consecutive position ranges of at most `size` rows covering 0..n (one range if size is None/0)."""
    if not size or size >= n:
        return [slice(0, n)]
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


def sample_coupling(module: nn.Module) -> str | None:
    """Why `module`'s outputs in its current mode are not per-sample functions, or None if they are.

    Checked by layer type: batch norm that normalises with batch statistics (train mode, or no
    running statistics) couples the samples of a batch; dropout in train mode draws one random
    mask per call, so a chunked step would not see the masks of the whole one. Instance, group
    and layer norm (statistics per sample), convolutions, pooling and linear layers are
    per-sample. A custom layer that mixes samples (e.g. x − x.mean(0)) is not detected.
    """
    for name, m in module.named_modules():
        label = f"{type(m).__name__} {name!r}" if name else type(m).__name__
        if isinstance(m, _BatchNorm) and (m.training or not m.track_running_stats):
            return f"{label} normalises with the statistics of the whole batch"
        if isinstance(m, _DropoutNd) and m.training and m.p > 0:
            return f"{label} draws a random mask per call in train mode"
    return None


def couples_samples(module: nn.Module) -> bool:
    """True when a batch's outputs are not the concatenation of its chunks' outputs (see sample_coupling)."""
    return sample_coupling(module) is not None


def accepts_rows(augment: Callable[..., object]) -> bool:
    """Whether ``augment(x, k, rows)`` is a valid call (the micro-batching form of an augmentation)."""
    try:
        inspect.signature(augment).bind(None, 0, slice(0, 1))
    except TypeError:
        return False
    except ValueError:  # no signature (some builtins): assume the documented protocol
        return True
    return True


def chunked_forward(net: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], w: torch.Tensor, x: torch.Tensor,
                    micro_batch: int | None) -> torch.Tensor:
    """``net(w, x)`` computed `micro_batch` rows at a time and concatenated (e.g. soft labels of every image).

    Only for per-sample networks (the caller checks ``couples_samples``); None/0: one call.
    """
    parts = chunks(x.shape[0], micro_batch)
    if len(parts) == 1:
        return net(w, x)
    return torch.cat([net(w, x[rows]) for rows in parts])
