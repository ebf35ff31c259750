"""`mctool distill --dry-run`: estimated peak memory per gradient mode, nothing run or written."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mctool import store
from mctool.distill.config import check_buffer_matches, missing_buffer_hint, resolve_config
from mctool.distill.loop import second_order_policy, workload
from mctool.errors import UsageError


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


def dry_run(preset: str | None, overrides: dict[str, Any], buffer: Path, device: str = "auto") -> DryRunReport:
    """Estimated peak memory of one iteration per gradient mode on this device, and the micro-batch
    `auto` would choose; reads only the buffer's metadata (no data, no experts' values)."""
    from mctool import memory
    from mctool.data import SHAPES, SPLIT_SIZES
    from mctool.device import resolve_device
    from mctool.models import build_model

    resolve_config(preset, overrides)
    if not buffer.exists():
        raise UsageError(missing_buffer_hint(buffer, None, False))
    dev = resolve_device(device)
    notes = []
    with store.open_buffer(buffer) as buf:
        cfg = resolve_config(preset, overrides, buf)
        check_buffer_matches(cfg, buf)
        split = SPLIT_SIZES.get(buf.data.name)
        if split is None:
            notes.append(f"the size of '{buf.data.name}' is not known before loading it: its train/test tensors on "
                         "the device are not counted")
            data = 0
        else:
            data = memory.split_bytes(*split, SHAPES[buf.data.name])
        work = workload(cfg, buf, data)
        with torch.device("meta"):
            module = build_model(buf.spec)
        profile = memory.profile_network(module, buf.data.image_shape)
    policy = second_order_policy(cfg, dev)
    impl = "fastgrad" if policy == "fastgrad" else "auto"
    selected = "unrolled" if cfg.method == "mtt" else cfg.grad
    rows = []
    for r in memory.dry_run(profile, work, dev, impl=impl):
        budget = r.auto.budget_bytes
        rows.append(DryRunRow(mode=r.mode, whole_bytes=r.whole.total_bytes,
                              whole_fits=None if budget is None else r.whole.total_bytes <= budget,
                              micro_batch=r.auto.micro_batch if r.auto.micro_batch < work.batch else None,
                              chunked_bytes=r.auto.estimate.total_bytes, fits=r.auto.fits, why=r.auto.why,
                              selected=r.mode == selected))
    if not memory.CALIBRATED.get(dev.type, False):
        notes.append(f"the memory model's {dev.type} factors are the CPU's until bench/memory.py has run on "
                     f"{dev.type}: estimates are rougher")
    free = memory.free_bytes(dev)
    return DryRunReport(buffer=str(buffer), device=str(dev), free_bytes=free,
                        budget_fraction=memory.DEFAULT_SAFETY.get(dev.type, 0.6), images=work.n_images,
                        batch=work.batch, syn_steps=cfg.syn_steps, second_order=policy, rows=rows, notes=notes)
