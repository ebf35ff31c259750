"""`distill --init correct`: the starting images are random real images per class with those the
buffer's first expert misclassifies replaced by images of the same class it classifies right
(DATM's rule, as `--learn-labels` starts), drawn from the training images the run may use."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from mctool import store
from mctool.data.prepared import Prepared, prepare_like
from mctool.distill import DistillConfig, resolve_config
from mctool.distill.runner import _selection
from mctool.distill.state import initial_state
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


def _wrong_on_every_third(prepared: Prepared) -> Callable[[torch.Tensor], torch.Tensor]:
    """An expert that gets every third training image wrong (a stand-in: the tiny experts get the
    tiny set's draws right)."""
    x, y = prepared.train_x, prepared.train_y
    classes = int(y.max()) + 1

    def predict(images: torch.Tensor) -> torch.Tensor:
        rows = _rows(images, x)
        return torch.nn.functional.one_hot((y[rows] + (rows % 3 == 0).long()) % classes, classes).float()

    return predict


def test_misclassified_draws_are_replaced_by_right_ones_of_their_class(convex_buffer: Path, data_dir: Path) -> None:
    """Each draw the (stand-in) expert gets wrong is replaced by a right one of its class."""
    cfg, prepared, pool = _setup(convex_buffer, data_dir, 2)
    x, y = prepared.train_x, prepared.train_y
    expert = _wrong_on_every_third(prepared)
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


def test_distill_starts_from_them_and_records_it(tmp_path: Path, convex_buffer: Path, data_dir: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """`distill --init correct` builds the expert from the buffer (as --learn-labels does) and starts
    from the rule's images: with the stand-in expert of the test above (the tiny experts get every
    draw right), the synset's starting images are the rule's, not the plain draw."""
    from mctool.distill import runner

    cfg, prepared, pool = _setup(convex_buffer, data_dir, 2)
    built: list[str] = []

    def stand_in(buffer: object, method: str, device: object) -> object:
        built.append(method)
        return _wrong_on_every_third(prepared)

    monkeypatch.setattr(runner, "expert_predictor", stand_in)
    r = cli("distill", "--buffer", convex_buffer, "-o", tmp_path / "s.h5", "--data-dir", data_dir, "--ipc", "3",
            "--syn-steps", "2", "--expert-epochs", "1", "--max-start-epoch", "1", "--iterations", "0",
            "--init", "correct", "--seed", "2", "--json", "--quiet")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["config"]["pix_init"] == "correct" and built == ["mct"]
    real = initial_state(cfg, prepared, torch.Generator().manual_seed(2), pool).images
    right = initial_state(cfg, prepared, torch.Generator().manual_seed(2), pool, _wrong_on_every_third(prepared)).images
    with store.open_synsets(tmp_path / "s.h5") as sf:
        syn = sf.read(sf.pick(None))
    assert torch.equal(syn.images, right) and not torch.equal(syn.images, real)
    built.clear()  # --init real never builds an expert
    r = cli("distill", "--buffer", convex_buffer, "-o", tmp_path / "r.h5", "--data-dir", data_dir, "--ipc", "3",
            "--syn-steps", "2", "--expert-epochs", "1", "--max-start-epoch", "1", "--iterations", "0",
            "--seed", "2", "--json", "--quiet")
    assert r.exit_code == 0 and built == []
