"""Building a network from a spec or an architecture name (ConvNet variants and the zoo)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from mctool.core.errors import UsageError
from mctool.models.convnet import ConvNet
from mctool.models.spec import ModelSpec
from mctool.models.zoo import ARCHS

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
    return list(CONVNET_VARIANTS) + list(ARCHS)


def spec_for(name: str, base: ModelSpec) -> ModelSpec:
    """The spec of architecture `name` on the data shape of `base` (ConvNet variants keep width/depth)."""
    if name in CONVNET_VARIANTS:
        return dataclasses.replace(base, arch="ConvNet", **CONVNET_VARIANTS[name])
    if name in ARCHS:
        return dataclasses.replace(base, arch=name)
    raise UsageError(f"unknown model '{name}'; choose from {', '.join(model_names())}")


def build_model(spec: ModelSpec, seed: int | None = None) -> nn.Module:
    """A fresh network with PyTorch's default init; `seed` makes the init repeatable
    without touching the global RNG."""

    def make() -> nn.Module:
        if spec.arch == "ConvNet":
            return ConvNet(spec)
        if spec.arch in ARCHS:
            return ARCHS[spec.arch](spec)
        raise UsageError(f"unknown architecture '{spec.arch}'")

    if seed is None:
        return make()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def layout_of(spec: ModelSpec) -> list[tuple[str, tuple[int, ...]]]:
    """The flat parameter layout of `spec`'s network, built on the meta device (no memory, no RNG)."""
    from mctool.models.spec import param_layout

    with torch.device("meta"):
        return param_layout(build_model(spec))
