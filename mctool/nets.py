"""The ConvNet family of MTT/MCT and the flat parameter layout shared by every command.

Parameter names and order are those of the reference ConvNet (``features.0.weight``,
``features.0.bias``, ``features.1.weight`` ... ``classifier.bias``): that order defines the
flat parameter vector stored in artifacts.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mctool.errors import UsageError

NORMS = ("instancenorm", "batchnorm", "layernorm", "groupnorm", "none")
ACTS = ("relu", "sigmoid", "leakyrelu")
POOLS = ("avgpooling", "maxpooling", "none")


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a network: stored as /model attributes."""

    arch: str = "ConvNet"
    depth: int = 3
    width: int = 128
    norm: str = "instancenorm"
    act: str = "relu"
    pool: str = "avgpooling"
    channels: int = 3
    num_classes: int = 10
    im_size: tuple[int, int] = (32, 32)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-friendly) of the spec."""
        d = dataclasses.asdict(self)
        d["im_size"] = list(self.im_size)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        """Inverse of to_dict; ignores unknown keys written by newer versions."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if "im_size" in kw:
            kw["im_size"] = tuple(int(v) for v in kw["im_size"])
        for key in ("depth", "width", "channels", "num_classes"):
            if key in kw:
                kw[key] = int(kw[key])
        return cls(**kw)


def default_depth(height: int) -> int:
    """Depth by image size: 3 for 32 px (and 28 px), 4 for 64 px (MTT's Tiny ImageNet), 5 for 128 px."""
    if height <= 32:
        return 3
    if height <= 64:
        return 4
    return 5


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


# Name -> overrides of the base spec, for the ConvNet variants used in cross-architecture runs.
CONVNET_VARIANTS: dict[str, dict[str, Any]] = {
    "ConvNet": {},
    "ConvNetBN": {"norm": "batchnorm"},
    "ConvNetLN": {"norm": "layernorm"},
    "ConvNetGN": {"norm": "groupnorm"},
    "ConvNetNN": {"norm": "none"},
    "ConvNetMP": {"pool": "maxpooling"},
    **{f"ConvNetD{d}": {"depth": d} for d in range(1, 6)},
}


def model_names() -> list[str]:
    """Every architecture name `build_model` accepts."""
    from mctool import archs

    return list(CONVNET_VARIANTS) + list(archs.ARCHS)


def spec_for(name: str, base: ModelSpec) -> ModelSpec:
    """The spec of architecture `name` on the data shape of `base` (ConvNet variants keep width/depth)."""
    from mctool import archs

    if name in CONVNET_VARIANTS:
        return dataclasses.replace(base, arch="ConvNet", **CONVNET_VARIANTS[name])
    if name in archs.ARCHS:
        return dataclasses.replace(base, arch=name)
    raise UsageError(f"unknown model '{name}'; choose from {', '.join(model_names())}")


def build_model(spec: ModelSpec, seed: int | None = None) -> nn.Module:
    """A fresh network with PyTorch's default init; `seed` makes the init repeatable
    without touching the global RNG."""
    from mctool import archs

    def make() -> nn.Module:
        if spec.arch == "ConvNet":
            return ConvNet(spec)
        if spec.arch in archs.ARCHS:
            return archs.ARCHS[spec.arch](spec)
        raise UsageError(f"unknown architecture '{spec.arch}'")

    if seed is None:
        return make()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def param_layout(module: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter in flat-vector order."""
    return [(name, tuple(p.shape)) for name, p in module.named_parameters()]


def layout_json(layout: list[tuple[str, tuple[int, ...]]]) -> str:
    """The layout as stored in /model attrs: JSON list of {name, shape}."""
    return json.dumps([{"name": n, "shape": list(s)} for n, s in layout])


def layout_from_json(text: str) -> list[tuple[str, tuple[int, ...]]]:
    """Inverse of layout_json."""
    return [(d["name"], tuple(int(x) for x in d["shape"])) for d in json.loads(text)]
