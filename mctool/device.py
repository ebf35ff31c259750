"""Choosing the torch device: `--device auto|cpu|cuda|cuda:N`, honest on CPU-only machines."""

from __future__ import annotations

import os

import torch

from mctool.errors import UsageError


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` means cuda (cuda:LOCAL_RANK under torchrun) when present, else cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device '{name}' (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine (use --device cpu or auto)")
    return device
