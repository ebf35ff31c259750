"""The device the maths and loop tests run on, and the tolerances that go with it.

One switch: ``MCTOOL_TEST_DEVICE=cuda`` (or ``cuda:N``) runs the device-parametrised tests on
a GPU; unset or ``cpu`` keeps them on the CPU (CI). Tests that need the device take the
``device`` fixture (tests/conftest.py), which skips cleanly when the named device is absent.

Tolerances are stated once, per device type and dtype. On CUDA, PyTorch's default TF32
convolutions (Ampere and newer) carry ~10 mantissa bits, so float32 comparisons there are
looser than on the CPU; float64 never uses TF32.
"""

from __future__ import annotations

import os

import torch

DEVICE_NAME = os.environ.get("MCTOOL_TEST_DEVICE", "cpu").strip() or "cpu"

# (device type, dtype) -> relative tolerance for "the same number computed two ways".
RTOL = {
    ("cpu", torch.float64): 1e-10,
    ("cpu", torch.float32): 1e-4,
    ("cuda", torch.float64): 1e-9,
    ("cuda", torch.float32): 5e-3,  # TF32 convolutions
}


def available(name: str = DEVICE_NAME) -> bool:
    """Whether the named device exists on this machine."""
    device = torch.device(name)
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return torch.cuda.is_available() and (device.index is None or device.index < torch.cuda.device_count())
    return False


def rtol(device: torch.device | str, dtype: torch.dtype) -> float:
    """The relative tolerance for comparing two computations of one quantity on `device`."""
    return RTOL[(torch.device(device).type, dtype)]
