"""`--device` resolution, including the CUDA and torchrun rules, on a machine pretending to have GPUs."""

from __future__ import annotations

import pytest
import torch

from mctool.core.device import resolve_device
from mctool.core.errors import UsageError


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)


def torchrun_env(monkeypatch: pytest.MonkeyPatch, world: int, local_rank: int, local_world: int | None = None) -> None:
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(world if local_world is None else local_world))


def test_cpu_only_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UsageError, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(UsageError, match="unknown device 'gpu'"):
        resolve_device("gpu")


@pytest.mark.usefixtures("two_gpus")
def test_single_process_cuda_always_has_an_index() -> None:
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(UsageError, match="has 2 GPU"):
        resolve_device("cuda:2")


@pytest.mark.usefixtures("two_gpus")
@pytest.mark.parametrize("name", ["auto", "cuda"])
def test_torchrun_gives_each_process_its_own_gpu(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    for rank in (0, 1):
        torchrun_env(monkeypatch, world=2, local_rank=rank)
        assert resolve_device(name) == torch.device("cuda", rank)


@pytest.mark.usefixtures("two_gpus")
def test_torchrun_refuses_a_shared_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    torchrun_env(monkeypatch, world=2, local_rank=1)
    with pytest.raises(UsageError, match="cuda:LOCAL_RANK"):
        resolve_device("cuda:0")
    torchrun_env(monkeypatch, world=3, local_rank=2)  # three processes, two GPUs
    with pytest.raises(UsageError, match="--nproc-per-node 2"):
        resolve_device("auto")
    assert resolve_device("cpu") == torch.device("cpu")  # gloo on the CPU is still fine


@pytest.mark.usefixtures("two_gpus")
def test_one_process_per_machine_may_name_its_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    torchrun_env(monkeypatch, world=4, local_rank=0, local_world=1)  # 4 machines, 1 process each
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda", 0)
