"""The ConvNet's default depth by image size (models/spec.default_depth) and a buffer keeping its depth."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from tests.helpers import cli
from mctool.models import ModelSpec, build_model, default_depth
from mctool.models.spec import MIN_LAST_BLOCK_SIDE


@pytest.mark.parametrize("side", range(2, 130))
def test_depth_is_the_deepest_whose_last_block_sees_3x3(side: int) -> None:
    d = default_depth(side)
    top = 3 if side <= 64 else 5  # MTT/MCT's depth 3 (Tiny ImageNet too), 5 above
    fits = [k for k in range(1, top + 1) if side >> (k - 1) >= MIN_LAST_BLOCK_SIDE]
    assert d == (max(fits) if fits else 1)
    assert d == top or side < 12  # unchanged from 12 px on: every preset's size keeps its depth
    build_model(ModelSpec(depth=d, width=2, channels=1, im_size=(side, side)))  # the network builds


def test_the_smaller_side_decides() -> None:
    assert default_depth(28, 8) == default_depth(8, 28) == default_depth(8) == 2
    assert default_depth(28) == default_depth(32) == default_depth(64) == 3 and default_depth(65) == 5
    assert default_depth(128, 48) == 5  # 3 or 5 by the height, as before; only the shrinking reads the width


def _tiny_folder(root: Path, side: int = 8) -> Path:
    """2 classes of side×side greyscale PNGs (bright vs dark: learnable) under train/ and test/."""
    g = np.random.default_rng(0)
    for split, n in (("train", 8), ("test", 4)):
        for c, base in (("dark", 40), ("light", 200)):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(base + g.normal(0, 20, (side, side)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels, "L").save(d / f"{i}.png")
    return root


def _depth(buffer: Path) -> int:
    with h5py.File(buffer, "r") as f:
        return int(f["model"].attrs["depth"])


TINY = ("--epochs", "1", "--width", "4", "--batch-size", "8", "--quiet", "--seed", "1")


def test_experts_on_8px_images_default_to_depth_2_and_a_depth_3_buffer_keeps_3(tmp_path: Path) -> None:
    data = f"folder:{_tiny_folder(tmp_path / 'd')}"
    tiny = (*TINY, "--data-dir", tmp_path / "cache")  # the fitted ZCA is cached under the data folder
    fresh = tmp_path / "fresh.h5"
    r = cli("experts", data, "--n", "1", "-o", fresh, *tiny)
    assert r.exit_code == 0, r.output
    assert _depth(fresh) == 2
    # A buffer of depth-3 experts (what earlier releases made for 8 px images): adding experts
    # without --depth keeps depth 3 instead of refusing "made with other settings".
    old = tmp_path / "old.h5"
    assert cli("experts", data, "--n", "1", "--depth", "3", "-o", old, *tiny).exit_code == 0
    r = cli("experts", data, "--n", "2", "-o", old, *tiny)
    assert r.exit_code == 0, r.output
    with h5py.File(old, "r") as f:
        assert f["experts/done"][:].tolist() == [True, True]
        assert json.loads(f["experts"].attrs["config"])["depth"] == 3
    assert _depth(old) == 3
    # An explicit other depth is still refused with the one line that names it.
    r = cli("experts", data, "--n", "3", "--depth", "2", "-o", old, *tiny)
    assert r.exit_code == 2 and "depth=3 (now 2)" in r.output
