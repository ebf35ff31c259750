"""The ConvNet family of MTT/MCT: depth × [conv3x3 → norm → act → pool] → linear."""

from __future__ import annotations

import torch
from torch import nn

from mctool.core.errors import UsageError
from mctool.models.spec import ModelSpec

NORMS = ("instancenorm", "batchnorm", "layernorm", "groupnorm", "none")
ACTS = ("relu", "sigmoid", "leakyrelu")
POOLS = ("avgpooling", "maxpooling", "none")


def _norm_layer(norm: str, channels: int, hw: tuple[int, int]) -> nn.Module | None:
    if norm == "instancenorm":
        # One group per channel: per-sample, per-channel statistics, no running stats.
        return nn.GroupNorm(channels, channels, affine=True)
    if norm == "batchnorm":
        return nn.BatchNorm2d(channels)
    if norm == "layernorm":
        return nn.LayerNorm([channels, hw[0], hw[1]], elementwise_affine=True)
    if norm == "groupnorm":
        return nn.GroupNorm(4, channels, affine=True)
    return None


def _act_layer(act: str) -> nn.Module:
    if act == "sigmoid":
        return nn.Sigmoid()
    if act == "leakyrelu":
        return nn.LeakyReLU(0.01)
    return nn.ReLU(inplace=True)


class ConvNet(nn.Module):
    """depth × [conv3x3 → norm → act → pool] → linear, as in MTT's networks.ConvNet."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        if spec.norm not in NORMS or spec.act not in ACTS or spec.pool not in POOLS:
            raise UsageError(f"unknown ConvNet setting in {spec}")
        layers: list[nn.Module] = []
        channels = spec.channels
        h, w = spec.im_size
        if h == 28 and w == 28:
            # MTT treats 28x28 greyscale as 32x32: the first conv pads by 3.
            h, w = 32, 32
            first_padding = 3
        else:
            first_padding = 1
        if spec.pool != "none" and min(h, w) >> spec.depth < 1:
            raise UsageError(f"a ConvNet of depth {spec.depth} is too deep for {spec.im_size[0]}×{spec.im_size[1]} "
                             f"images: every block halves them, so depth {min(h, w).bit_length() - 1} at most")
        for d in range(spec.depth):
            layers.append(nn.Conv2d(channels, spec.width, 3, padding=first_padding if d == 0 else 1))
            channels = spec.width
            norm = _norm_layer(spec.norm, channels, (h, w))
            if norm is not None:
                layers.append(norm)
            layers.append(_act_layer(spec.act))
            if spec.pool != "none":
                layers.append(nn.AvgPool2d(2, 2) if spec.pool == "avgpooling" else nn.MaxPool2d(2, 2))
                h, w = h // 2, w // 2
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels * h * w, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of images."""
        return self.classifier(self.features(x).flatten(1))
