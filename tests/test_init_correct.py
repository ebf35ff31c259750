"""`distill --init correct`: the starting images are random real images per class with those the
buffer's first expert misclassifies replaced by images of the same class it classifies right
(DATM's rule, as `--learn-labels` starts), drawn from the training images the run may use."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mctool import store
from mctool.data.prepared import Prepared, prepare_like
from mctool.distill import DistillConfig, resolve_config
from mctool.distill.runner import _selection
from mctool.distill.state import initial_state
from mctool.training.labels import _predicted, expert_predictor
from tests.helpers import cli


def _setup(buffer: Path, data_dir: Path, seed: int) -> tuple[DistillConfig, Prepared, torch.Tensor]:
    """(the settings, the data, the run's training pool) of `distill --ipc 3 --seed` on `buffer`."""
    with store.open_buffer(buffer) as buf:
        prepared = prepare_like(buf.data, data_dir, torch.device("cpu"))
        cfg = resolve_config(None, {"ipc": 3, "seed": seed}, buf)
    _, pool = _selection(cfg, prepared)
    assert pool is not None
    return cfg, prepared, pool


def _rows(images: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The training index of each image (every start is a copy of a training image)."""
    d = torch.cdist(images.flatten(1).double(), x.flatten(1).double())
    assert float(d.min(1).values.max()) < 1e-4  # (cdist rounds; other training images are ~10 away)
    return d.argmin(1)


def test_misclassified_draws_are_replaced_by_right_ones_of_their_class(convex_buffer: Path, data_dir: Path) -> None:
    """An expert that gets every third training image wrong (a stand-in: the tiny experts get the
    tiny set's draws right): each such draw is replaced by a right one of its class."""
    cfg, prepared, pool = _setup(convex_buffer, data_dir, 2)
    x, y = prepared.train_x, prepared.train_y
    classes = int(y.max()) + 1

    def expert(images: torch.Tensor) -> torch.Tensor:
        rows = _rows(images, x)
        wrong = (y[rows] + (rows % 3 == 0).long()) % classes
        return torch.nn.functional.one_hot(wrong, classes).float()

    real = initial_state(cfg, prepared, torch.Generator().manual_seed(2), pool).images
    right = initial_state(cfg, prepared, torch.Generator().manual_seed(2), pool, expert).images
    a, b = _rows(real, x), _rows(right, x)
    wrong = a % 3 == 0
    assert 0 < int(wrong.sum()) < a.numel()
    assert torch.equal(a[~wrong], b[~wrong])  # right draws stay, in place
    assert torch.equal(y[a], y[b])  # every slot keeps its class (class-major labels)
    assert bool((b % 3 != 0).all())  # replacements are images the expert gets right
    assert set(b.tolist()) <= set(pool.tolist())  # never a validation image
    assert len(set(b.tolist())) == b.numel()  # no image twice


def test_distill_starts_from_them_and_records_it(tmp_path: Path, convex_buffer: Path, data_dir: Path) -> None:
    """`--init correct` draws the expert from the buffer (its first expert, as --learn-labels does)."""
    r = cli("distill", "--buffer", convex_buffer, "-o", tmp_path / "s.h5", "--data-dir", data_dir, "--ipc", "3",
            "--syn-steps", "2", "--expert-epochs", "1", "--max-start-epoch", "1", "--iterations", "0",
            "--init", "correct", "--seed", "1", "--json", "--quiet")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["config"]["pix_init"] == "correct"
    cfg, prepared, pool = _setup(convex_buffer, data_dir, 1)
    with store.open_buffer(convex_buffer) as buf:
        expert = expert_predictor(buf, cfg.method, torch.device("cpu"))
    right = initial_state(cfg, prepared, torch.Generator().manual_seed(1), pool, expert).images
    with store.open_synsets(tmp_path / "s.h5") as sf:
        syn = sf.read(sf.pick(None))
    assert torch.equal(syn.images, right)
    rows = _rows(syn.images, prepared.train_x)
    assert bool((_predicted(expert, prepared.train_x, rows) == prepared.train_y[rows]).all())
