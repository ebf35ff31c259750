"""torch.distributed under torchrun: process group from the environment, a few collectives.

Without torchrun (WORLD_SIZE unset or 1) every helper is a cheap single-process no-op.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


COLLECTIVE_TIMEOUT = timedelta(hours=2)


def world_size() -> int:
    """Number of processes (1 without torchrun)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 without torchrun)."""
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0 owns the artifact and the terminal."""
    return rank() == 0


def writes_output() -> bool:
    """Whether this process will be the writer (rank 0), known from torchrun's environment before
    the process group exists: only it checks the output, which it may already hold while another
    rank is still starting (so the others' check would find it busy)."""
    if dist.is_initialized():
        return is_main()
    return int(os.environ.get("WORLD_SIZE", "1")) <= 1 or int(os.environ.get("RANK", "0")) == 0


def init_from_env(device: torch.device) -> None:
    """Join the process group torchrun describes (gloo on CPU, NCCL on CUDA); no-op otherwise."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # While rank 0 alone evaluates or writes, the others wait in a collective; NCCL's default
    # 10-minute limit would kill a run during a long periodic evaluation.
    dist.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT)


def shutdown() -> None:
    """Leave the process group cleanly, all ranks together: a rank that tears down its gloo
    context while a peer still finishes the last collective can make that peer abort
    ("terminate called without an active exception", seen twice in the tests). Called on the
    success path only; if another rank failed meanwhile, torchrun stops this one (one machine),
    else the barrier ends when the failed rank's connections close or at COLLECTIVE_TIMEOUT."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op without torchrun)."""
    if dist.is_initialized():
        dist.barrier()


def broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any) -> list[Any] | None:
    """Every rank's `obj` as a list on rank 0 (None elsewhere)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] | None = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_mean_(t: torch.Tensor) -> torch.Tensor:
    """Average `t` across ranks in place (returns it)."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= world_size()
    return t


def any_flag(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on any rank (e.g. Ctrl-C, a failure)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
