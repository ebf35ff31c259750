"""What defines a network in an artifact: its spec and its flat parameter layout.

The layout (parameter names and shapes in module order) defines the flat parameter vector
stored in artifacts: for the ConvNet that order is the reference code's
(``features.0.weight``, ``features.0.bias``, ``features.1.weight`` ... ``classifier.bias``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from torch import nn

Layout = list[tuple[str, tuple[int, ...]]]


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


# The smallest map side the last ConvNet block may see by default (default_depth).
MIN_LAST_BLOCK_SIDE = 3


def default_depth(height: int, width: int | None = None) -> int:
    """ConvNet depth by image size: 3 up to 64 px, 5 above — but never so deep that the last
    block sees maps under 3×3 (depth 2 for 6–11 px, 1 below 6).

    3 for 28/32 px (MTT/MCT) and for 64 px: the MCT authors' Tiny ImageNet runs used a depth-3
    ConvNet (their released storage figures match it; MTT used depth 4 there: `--depth 4`).
    Every block halves the maps, and a last block on 2×2 maps (depth 3 on 8×8 images) normalises
    4 values per channel: on 8×8 Fashion-MNIST the depth-3 experts learned less
    (66.5 % against 77.9 % at depth 2) and distillation needed an lr_img 100× under the size
    rule's, where depth 2 took the rule's (bench/README.md, "The lr_img size rule below 28×28").
    """
    side = min(height, width) if width is not None else height
    depth = 3 if height <= 64 else 5
    while depth > 1 and side >> (depth - 1) < MIN_LAST_BLOCK_SIDE:
        depth -= 1
    return depth


def param_layout(module: nn.Module) -> Layout:
    """(name, shape) of every parameter in flat-vector order."""
    return [(name, tuple(p.shape)) for name, p in module.named_parameters()]


def layer_sizes(layout: Layout) -> list[int]:
    """Number of entries of each parameter tensor, in flat order."""
    sizes = []
    for _, shape in layout:
        n = 1
        for d in shape:
            n *= int(d)
        sizes.append(n)
    return sizes


def layout_json(layout: Layout) -> str:
    """The layout as stored in /model attrs: JSON list of {name, shape}."""
    return json.dumps([{"name": n, "shape": list(s)} for n, s in layout])


def layout_from_json(text: str) -> Layout:
    """Inverse of layout_json."""
    return [(d["name"], tuple(int(x) for x in d["shape"])) for d in json.loads(text)]
