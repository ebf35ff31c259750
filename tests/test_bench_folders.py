"""bench/fmnist_folder.py: the class-folder copy of Fashion-MNIST that bench/README.md's untuned-dataset rows use."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from tests.conftest import make_tiny_mnist

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "fmnist_folder.py"


def _source(tmp_path: Path) -> Path:
    """The tiny IDX dataset under the file names Debian's package uses (gzipped)."""
    folder = make_tiny_mnist(tmp_path / "raw", per_class_train=3, per_class_test=2) / "mnist"
    for idx in folder.iterdir():
        idx.with_name(idx.name + ".gz").write_bytes(gzip.compress(idx.read_bytes()))
    return folder


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_size_14_averages_each_2x2_block(tmp_path):
    src = _source(tmp_path)
    out = tmp_path / "out"
    done = _run(str(out), "--source", str(src), "--train-per-class", "2", "--test-per-class", "1", "--size", "14")
    assert done.returncode == 0, done.stderr
    assert "20 training and 10 test images" in done.stdout and "14x14" in done.stdout
    raw = np.frombuffer(gzip.decompress((src / "train-images-idx3-ubyte.gz").read_bytes()), np.uint8, offset=16)
    raw = raw.reshape(-1, 28, 28)
    files = sorted((out / "train").rglob("*.png"))
    assert len(files) == 20
    for f in files[:5]:
        small = np.asarray(Image.open(f))
        assert small.shape == (14, 14)
        blocks = raw[int(f.stem)].astype(float).reshape(14, 2, 14, 2).mean(axis=(1, 3))
        assert np.abs(small - blocks).max() <= 1  # the block mean (PIL rounds in fixed point: off by at most 1)


def test_default_size_keeps_the_idx_bytes_and_bad_size_is_refused(tmp_path):
    src = _source(tmp_path)
    out = tmp_path / "out"
    assert _run(str(out), "--source", str(src), "--train-per-class", "1", "--test-per-class", "1").returncode == 0
    raw = np.frombuffer(gzip.decompress((src / "t10k-images-idx3-ubyte.gz").read_bytes()), np.uint8, offset=16)
    f = next((out / "test").rglob("*.png"))
    assert np.array_equal(np.asarray(Image.open(f)), raw.reshape(-1, 28, 28)[int(f.stem)])
    bad = _run(str(tmp_path / "x"), "--source", str(src), "--size", "0")
    assert bad.returncode != 0 and "--size" in bad.stderr and not (tmp_path / "x").exists()
