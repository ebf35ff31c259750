"""Shared fixtures: a tiny MNIST-format dataset on disk and artifacts made from it by the CLI."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest
from tests.devices import DEVICE_NAME, available
from tests.helpers import cli

# Tests must never read the user's data cache or the network.
os.environ.setdefault("MCTOOL_DATA", str(Path(__file__).parent / ".no-data-here"))


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 IDX file (the MNIST on-disk format)."""
    magic = 0x0800 | array.ndim
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def make_tiny_mnist(root: Path, per_class_train: int = 30, per_class_test: int = 10, seed: int = 0) -> Path:
    """A learnable 10-class 28x28 dataset in MNIST's IDX layout under root/mnist/."""
    rng = np.random.default_rng(seed)
    # Blocky low-frequency prototypes: a small ConvNet separates them within a few epochs.
    prototypes = np.kron(rng.integers(0, 256, size=(10, 4, 4)), np.ones((7, 7)))
    folder = root / "mnist"
    folder.mkdir(parents=True, exist_ok=True)
    for split, per in (("train", per_class_train), ("t10k", per_class_test)):
        labels = np.repeat(np.arange(10), per)
        noise = rng.normal(0, 40, size=(labels.size, 28, 28))
        images = np.clip(prototypes[labels] + noise, 0, 255)
        order = rng.permutation(labels.size)
        write_idx(folder / f"{split}-images-idx3-ubyte", images[order])
        write_idx(folder / f"{split}-labels-idx1-ubyte", labels[order])
    return root


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device-only", action="store_true",
                     help="run only the tests that take the `device` fixture (the GPU subset of bench/gpu.sh)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("--device-only"):
        return
    keep = [item for item in items if "device" in getattr(item, "fixturenames", ())]
    config.hook.pytest_deselected(items=[item for item in items if item not in keep])
    items[:] = keep


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread in the module's tests, as in the subprocesses they start with
    OMP_NUM_THREADS=1: bit-identical comparisons need the same thread count (PyTorch's CPU
    kernels reduce in a thread-dependent order), and on a busy 2-core machine two threads can
    be many times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def device() -> "object":
    """The torch device named by MCTOOL_TEST_DEVICE (default cpu); skips when it is absent."""
    import torch

    if not available(DEVICE_NAME):
        pytest.skip(f"MCTOOL_TEST_DEVICE={DEVICE_NAME}: no such device on this machine")
    return torch.device(DEVICE_NAME)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Data directory holding the tiny MNIST-format dataset."""
    return make_tiny_mnist(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def buffer(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """A buffer with 2 tiny experts (K = 4) made by `mctool experts`."""
    out = tmp_path_factory.mktemp("buffer") / "buffer.h5"
    r = cli("experts", "mnist", "--data-dir", data_dir, "--n", "2", "--epochs", "4", "--width", "8",
            "--batch-size", "32", "--lr", "0.05", "-o", out, "--quiet", "--seed", "1")
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="session")
def convex_buffer(tmp_path_factory: pytest.TempPathFactory, buffer: Path) -> Path:
    """A compact convexified artifact (I = 1) made by `mctool convexify -o`."""
    out = tmp_path_factory.mktemp("convex") / "small.h5"
    r = cli("convexify", buffer, "-o", out, "--interior", "1", "--quiet")
    assert r.exit_code == 0, r.output
    return out
