"""A network as a pure function of one flat parameter vector (torch.func.functional_call)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call


class FlatNet:
    """Wraps a module so that ``net(flat, x)`` runs it with the weights taken from ``flat``.

    The module's own parameters are only a template (shapes, order); gradients flow into
    ``flat``. Buffers (e.g. BatchNorm running stats) stay those of the module.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.names = [n for n, _ in module.named_parameters()]
        self.shapes = [tuple(p.shape) for _, p in module.named_parameters()]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.num_params = sum(self.sizes)

    def flatten(self, module: nn.Module | None = None) -> torch.Tensor:
        """The parameters of `module` (default: the template) as one detached flat vector (a copy)."""
        m = self.module if module is None else module
        return torch.cat([p.detach().reshape(-1) for p in m.parameters()]).clone()

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of `flat` shaped like each parameter (no copy, so autograd sees through)."""
        chunks = flat.split(self.sizes)
        return {n: c.view(s) for n, c, s in zip(self.names, chunks, self.shapes)}

    def load_into(self, module: nn.Module, flat: torch.Tensor) -> None:
        """Copy `flat` into the parameters of `module` (same architecture)."""
        with torch.no_grad():
            for p, c in zip(module.parameters(), flat.split(self.sizes)):
                p.copy_(c.view_as(p))

    def __call__(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Logits of the network with parameters `flat` on images `x`."""
        return functional_call(self.module, self.unflatten(flat), (x,))

    def layer_index(self) -> torch.Tensor:
        """For each flat entry, the index of its parameter tensor (layer), as int64 [P]."""
        return torch.repeat_interleave(torch.arange(len(self.sizes)), torch.tensor(self.sizes))
