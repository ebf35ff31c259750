"""Choosing the torch device: `--device auto|cpu|cuda|cuda:N`, honest on CPU-only machines."""

from __future__ import annotations

import os

import torch

from mctool.core.errors import UsageError


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` means CUDA when present, else the CPU. A CUDA device always gets its index:
    `cuda` is the current GPU, and under torchrun every process takes `cuda:LOCAL_RANK`."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device '{name}' (use auto, cpu, cuda or cuda:N)") from None
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine (use --device cpu or auto)")
    count = torch.cuda.device_count()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and device.index is None:  # torchrun: process r of a machine takes cuda:r
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= count:
            raise UsageError(f"torchrun started more processes on this machine than it has GPUs ({count}): "
                             f"use --nproc-per-node {count} or fewer")
        return torch.device("cuda", local_rank)
    if device.index is not None and int(os.environ.get("LOCAL_WORLD_SIZE", str(world))) > 1:
        # Every process of this machine on one GPU: NCCL fails ("Duplicate GPU") or hangs.
        raise UsageError(f"--device {name}: under torchrun every process takes cuda:LOCAL_RANK; "
                         "use --device cuda or auto")
    index = torch.cuda.current_device() if device.index is None else device.index
    if index >= count:
        raise UsageError(f"--device {name}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}")
    return torch.device("cuda", index)
