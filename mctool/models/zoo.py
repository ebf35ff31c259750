"""cross-architecture models for `mctool evaluate --models`.

The small-image networks that dataset-distillation papers (DC, DSA, MTT) use to check that a
distilled set transfers beyond the ConvNet it was made with. Each builder takes the input
shape (channels, im_size) and num_classes from a `ModelSpec`; depth/width/norm/act/pool are
ignored (the norm is fixed by the name: plain names use instance norm, ``...BN`` batch norm).
28x28 inputs are handled like the reference code does (extra padding in the first conv).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from mctool.core.errors import UsageError
from mctool.models.spec import ModelSpec


def _out(size: int, kernel: int, padding: int = 0, stride: int = 1) -> int:
    """Spatial size after a conv (or pool) with the given kernel, padding and stride."""
    return (size + 2 * padding - kernel) // stride + 1


def _is_28(spec: ModelSpec) -> bool:
    return tuple(spec.im_size) == (28, 28)


def _check(spec: ModelSpec, h: int, w: int) -> None:
    if h < 1 or w < 1:
        raise UsageError(f"{spec.arch} cannot take {spec.im_size[0]}x{spec.im_size[1]} images (too small)")


def _norm(kind: str, channels: int) -> nn.Module:
    """Instance norm (one GroupNorm group per channel, as the DC family does) or BatchNorm2d."""
    if kind == "batchnorm":
        return nn.BatchNorm2d(channels)
    return nn.GroupNorm(channels, channels, affine=True)


class MLP(nn.Module):
    """Three-layer perceptron: flatten → 128 → 128 → classes with ReLU (DC's 'MLP').

    CIFAR-10 shape (3x32x32, 10 classes): 411,146 parameters.
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        h, w = spec.im_size
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(spec.channels * h * w, 128),
            nn.ReLU(),
            nn.Linear(128, 128),
            nn.ReLU(),
            nn.Linear(128, spec.num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of images."""
        return self.classifier(x)


class LeNet(nn.Module):
    """LeNet-5: two 5x5 conv/ReLU/max-pool stages (6, 16 maps), then fc 120 → 84 → classes.

    The first conv pads by 2 on 28x28 input so MNIST-sized and 32 px images give 16x5x5.
    CIFAR-10 shape: 62,006 parameters.
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        pad = 2 if _is_28(spec) else 0
        self.features = nn.Sequential(
            nn.Conv2d(spec.channels, 6, 5, padding=pad),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
        )
        h, w = (_out(_out(s, 5, pad) // 2, 5) // 2 for s in spec.im_size)
        _check(spec, h, w)
        self.classifier = nn.Sequential(
            nn.Linear(16 * h * w, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, spec.num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of images."""
        return self.classifier(self.features(x).flatten(1))


class AlexNet(nn.Module):
    """The small-image AlexNet of DC/DSA: five convs (128, 192, 256, 192, 192 maps), three
    max-pools, one linear classifier. The first conv pads by 4 on 28x28 input (else 2).

    CIFAR-10 shape: 1,872,202 parameters.
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        pad = 4 if _is_28(spec) else 2
        self.features = nn.Sequential(
            nn.Conv2d(spec.channels, 128, 5, stride=1, padding=pad),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(128, 192, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(192, 256, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(256, 192, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(192, 192, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
        )
        h, w = (_out(s, 5, pad) // 2 // 2 // 2 for s in spec.im_size)
        _check(spec, h, w)
        self.classifier = nn.Linear(192 * h * w, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of images."""
        return self.classifier(self.features(x).flatten(1))


VGG11_CFG: list[int | str] = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]


class VGG11(nn.Module):
    """VGG11 with 3x3 convs, a norm after every conv, ReLU and five max-pools, then one linear
    layer on the 512 x H/32 x W/32 features. The first conv pads by 3 on 28x28 input.

    Instance norm ('VGG11', 9,231,114 parameters on CIFAR-10 shape) or BatchNorm ('VGG11BN',
    same count).
    """

    def __init__(self, spec: ModelSpec, norm: str = "instancenorm") -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = spec.channels
        h, w = spec.im_size
        first = True
        for v in VGG11_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                h, w = h // 2, w // 2
                continue
            pad = 3 if first and _is_28(spec) else 1
            layers += [nn.Conv2d(channels, int(v), 3, padding=pad), _norm(norm, int(v)), nn.ReLU()]
            h, w = _out(h, 3, pad), _out(w, 3, pad)
            channels, first = int(v), False
        _check(spec, h, w)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels * h * w, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of images."""
        return self.classifier(self.features(x).flatten(1))


class BasicBlock(nn.Module):
    """Two 3x3 conv/norm layers with an identity (or 1x1 conv/norm) shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = _norm(norm, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.bn2 = _norm(norm, out_ch)
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), _norm(norm, out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual block output."""
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet18: 3x3 stride-1 stem (no max-pool), BasicBlocks [2, 2, 2, 2] with
    64/128/256/512 channels, global average pool, Linear(512, classes).

    Instance norm ('ResNet18', 11,173,962 parameters on CIFAR-10 shape) or BatchNorm
    ('ResNet18BN', same count).
    """

    def __init__(self, spec: ModelSpec, norm: str = "instancenorm") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(spec.channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = _norm(norm, 64)
        blocks: list[nn.Module] = []
        in_ch = 64
        for i, out_ch in enumerate((64, 128, 256, 512)):
            for j in range(2):
                blocks.append(BasicBlock(in_ch, out_ch, 2 if i > 0 and j == 0 else 1, norm))
                in_ch = out_ch
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(512, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of images."""
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.pool(self.layers(out))
        return self.classifier(out.flatten(1))


ARCHS: dict[str, Callable[[ModelSpec], nn.Module]] = {
    "MLP": MLP,
    "LeNet": LeNet,
    "AlexNet": AlexNet,
    "VGG11": VGG11,
    "VGG11BN": lambda spec: VGG11(spec, norm="batchnorm"),
    "ResNet18": ResNet18,
    "ResNet18BN": lambda spec: ResNet18(spec, norm="batchnorm"),
}
