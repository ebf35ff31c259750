"""`mctool distill --dry-run`: estimated peak memory per gradient mode, nothing run or written."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mctool import store
from mctool.distill.config import check_buffer_matches, missing_buffer_hint, resolve_config
from mctool.distill.loop import second_order_policy
from mctool.core.errors import UsageError


@dataclass
class DryRunRow:
    """One gradient mode's estimated peak memory, whole steps and as `--micro-batch auto` would run."""

    mode: str
    whole_bytes: int
    whole_fits: bool | None  # None: free memory unknown
    micro_batch: int | None  # auto's choice (None: whole steps)
    chunked_bytes: int
    fits: bool
    why: str
    selected: bool  # the mode this run would use


@dataclass
class DryRunReport:
    """What `mctool distill --dry-run` prints: nothing is run or written."""

    buffer: str
    device: str
    free_bytes: int | None
    budget_fraction: float
    images: int
    batch: int
    syn_steps: int
    second_order: str
    rows: list[DryRunRow]
    notes: list[str]
    memory_given: bool = False  # free_bytes is the --memory size, not this device's free memory


def dry_run(preset: str | None, overrides: dict[str, Any], buffer: Path, device: str = "auto",
            default_buffer: bool = False, width: int | None = None, memory_size: int | None = None) -> DryRunReport:
    """Estimated peak memory of one iteration per gradient mode, and the micro-batch `auto` would
    choose, on this device's free memory or in `memory_size` bytes. Reads only the buffer's metadata
    (no data, no experts' values); with no buffer at the default path, the preset's dataset (shape and
    classes known without the data) and the ConvNet of the preset's depth (or --depth) and `width`."""
    from mctool.matching import memory
    from mctool.distill import sizes

    probe = resolve_config(preset, overrides)
    if memory_size is not None and memory_size < 1:
        raise UsageError(f"--memory must be a positive size, got {memory_size}")
    dev = _device(device, memory_size)
    if buffer.exists():
        if width is not None:
            raise UsageError("--width is for --dry-run without a buffer (the buffer's experts fix the network)")
        with store.open_buffer(buffer) as buf:
            cfg = resolve_config(preset, overrides, buf)
            check_buffer_matches(cfg, buf)
            shape = sizes.shape_of_buffer(cfg, buf)
            sizes.check_epochs(cfg, shape.epochs)  # refused as the run would refuse it
    elif default_buffer:  # nothing at buffer.h5: the preset's dataset and network, without data or experts
        cfg, shape = probe, sizes.shape_without_buffer(probe, width)
    else:
        raise UsageError(missing_buffer_hint(buffer, probe.dataset, default_buffer))
    notes = list(shape.notes)
    work = sizes.workload(cfg, shape)
    profile = sizes.profile(shape)
    policy = second_order_policy(cfg, dev)
    impl = "fastgrad" if policy == "fastgrad" else "auto"
    selected = "unrolled" if cfg.method == "mtt" else cfg.grad
    free = memory_size if memory_size is not None else memory.free_bytes(dev)
    rows = []
    for r in memory.dry_run(profile, work, dev, free=free, impl=impl):
        budget = r.auto.budget_bytes
        rows.append(DryRunRow(mode=r.mode, whole_bytes=r.whole.total_bytes,
                              whole_fits=None if budget is None else r.whole.total_bytes <= budget,
                              micro_batch=r.auto.micro_batch if r.auto.micro_batch < work.batch else None,
                              chunked_bytes=r.auto.estimate.total_bytes, fits=r.auto.fits, why=r.auto.why,
                              selected=r.mode == selected))
    if not memory.CALIBRATED.get(dev.type, False):
        notes.append(f"the memory model's {dev.type} factors are the CPU's until bench/memory.py has run on "
                     f"{dev.type}: estimates are rougher")
    return DryRunReport(buffer=str(buffer) if buffer.exists() else f"{shape.dataset} (no buffer)", device=str(dev),
                        free_bytes=free, budget_fraction=memory.DEFAULT_SAFETY.get(dev.type, 0.6),
                        images=work.n_images, batch=work.batch, syn_steps=cfg.syn_steps, second_order=policy,
                        rows=rows, notes=notes, memory_given=memory_size is not None)


def _device(device: str, memory_size: int | None) -> torch.device:
    """The device to estimate for: this machine's, or — with --memory, which replaces its free
    memory — any CPU or CUDA device, present or not (asking whether a run fits a GPU elsewhere)."""
    from mctool.core.device import resolve_device

    if memory_size is not None and device != "auto":
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise UsageError(f"unknown device '{device}' (use auto, cpu, cuda or cuda:N)") from None
        if dev.type in ("cpu", "cuda"):
            return dev
    return resolve_device(device)
