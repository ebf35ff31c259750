"""Exporting synsets for MTT-family scripts and DD-Ranking, and the field's scores."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mctool.core.errors import UsageError
from mctool.interop import h5out
from mctool.interop.export import (
    META_NAME, SynsetData, class_folder, export_pngs, export_tensors, load_export, preprocessing_without_data,
    to_pixels,
)
from mctool.evaluate.scores import hard_label_recovery, paired_gain, whole_data_accuracy
from mctool.data.prepared import prepare_like
from tests.conftest import cli

TINY = ["--ipc", "2", "--syn-steps", "2", "--expert-epochs", "1", "--max-start-epoch", "2", "--lr-img", "100",
        "--lr-lr", "1e-5", "--lr-init", "0.01", "--iterations", "2", "--quiet"]


@pytest.fixture(scope="module")
def synset_file(tmp_path_factory: pytest.TempPathFactory, convex_buffer: Path, data_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("syn") / "syn.h5"
    r = cli("distill", "--buffer", convex_buffer, "-o", out, "--data-dir", data_dir, *TINY)
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def stored(synset_file: Path) -> SynsetData:
    return h5out.read_synset(synset_file)


@pytest.fixture(scope="module")
def prep(stored: SynsetData, data_dir: Path):
    return prepare_like(stored.meta, data_dir, torch.device("cpu")).prep


# `stored` holds the final images after 2 iterations: MTT's distill.py names those images_2.pt.
@pytest.mark.parametrize("layout,names", [("mtt", ("images_2.pt", "labels_2.pt", "lr_2.pt")),
                                          ("ddranking", ("images.pt", "labels.pt", "lr.pt"))])
def test_tensor_export_round_trips_bit_for_bit(tmp_path: Path, stored: SynsetData, prep, layout: str,
                                               names: tuple[str, ...]) -> None:
    assert stored.meta.zca and stored.images.shape == (20, 1, 28, 28)
    out = tmp_path / layout
    doc = export_tensors(stored, out, layout, prep, zca_matrix=True)
    back = load_export(out)
    assert torch.equal(back.images, stored.images) and back.images.dtype == torch.float32
    assert torch.equal(back.labels, stored.labels) and back.labels.dtype == torch.int64
    assert back.lr == stored.lr  # float64 on disk: the exact value
    # What a receiver does: a plain weights-only torch.load of each file.
    images, labels, lr = (torch.load(out / n, weights_only=True) for n in names)
    assert torch.equal(images, stored.images) and torch.equal(labels, stored.labels) and lr.item() == stored.lr
    # DD-Ranking builds hard labels as class-major blocks of ipc: ours are exactly those.
    assert doc["labels"]["class_major"] and doc["labels"]["kind"] == "hard"
    assert labels.tolist() == [c for c in range(10) for _ in range(2)]
    # The description tells a receiver the space.
    saved = json.loads((out / META_NAME).read_text())
    assert saved["space"]["kind"] == "zca" and saved["space"]["zca_eps"] == 0.1 and saved["space"]["fitted_on"] == "train"
    assert saved["class_names"] == list(stored.meta.class_names) and saved["ipc"] == 2
    assert saved["receivers"]["ddranking"]["use_zca"] is True and saved["receivers"]["mtt"]["dataset"] == "MNIST"
    assert saved["receivers"]["ddranking"]["model_name"] == "ConvNet-3"
    # zca.pt de-whitens exactly as documented, and whitening the pixels gives the images back.
    mean, transform, transform_inv = back.zca
    assert torch.equal(transform, prep.transform) and torch.equal(transform_inv, prep.transform_inv)
    pixels = stored.images.reshape(20, -1) @ transform_inv + mean
    rewhitened = ((pixels - mean) @ transform).view_as(stored.images)
    torch.testing.assert_close(rewhitened, stored.images, rtol=1e-3, atol=1e-3)
    if layout == "mtt":
        assert torch.equal(back.pixels, to_pixels(prep, stored.images, clamp=False))
        torch.testing.assert_close(back.pixels, pixels.view_as(stored.images))
    else:
        assert back.pixels is None


def test_export_refuses_foreign_folders_and_detects_changes(tmp_path: Path, stored: SynsetData, prep) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="not empty"):
        export_tensors(stored, busy, "mtt", prep)
    out = tmp_path / "again"
    export_tensors(stored, out, "mtt", prep)
    export_tensors(stored, out, "mtt", prep)  # an earlier export is replaced
    lr = torch.load(out / "lr_2.pt", weights_only=True)
    torch.save(lr * 2, out / "lr_2.pt")
    with pytest.raises(UsageError, match="checksum"):
        load_export(out)
    with pytest.raises(UsageError, match="unknown tensor layout"):
        export_tensors(stored, tmp_path / "x", "tfrecord", prep)
    with pytest.raises(UsageError, match="needs the fitted ZCA"):
        export_tensors(stored, tmp_path / "y", "mtt", None, zca_matrix=True)
    # Without the fitted ZCA the whitened tensors are still exported; the pixels file is left out.
    doc = export_tensors(stored, tmp_path / "z", "mtt", None)
    assert doc["files"]["pixels"] is None and load_export(tmp_path / "z").pixels is None


def test_png_folders_per_class(tmp_path: Path, stored: SynsetData, prep) -> None:
    out = tmp_path / "png"
    doc = export_pngs(stored, out, prep)
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert folders == [class_folder(c, n, 10) for c, n in enumerate(stored.meta.class_names)]
    assert doc["png"]["per_class"] == {str(c): 2 for c in range(10)}
    expected = (to_pixels(prep, stored.images, clamp=True) * 255 + 0.5).floor().to(torch.uint8)
    for i, label in enumerate(stored.labels.tolist()):
        path = out / folders[label] / f"{i % 2:04d}.png"
        with Image.open(path) as im:
            assert im.mode == "L"
            assert np.array_equal(np.asarray(im), expected[i, 0].numpy())
    assert class_folder(7, "T-shirt/top", 10) == "007_T-shirt_top"


def test_soft_labels_and_normalised_space(tmp_path: Path, stored: SynsetData) -> None:
    meta = dataclasses.replace(stored.meta, zca=False, mean=(0.5,), std=(0.25,))
    soft = torch.softmax(torch.randn(20, 10, generator=torch.Generator().manual_seed(0)), dim=1)
    syn = dataclasses.replace(stored, meta=meta, labels=soft,
                              experts_reference={"mean": float("nan"), "experts": 2})  # imported, not measured
    out = tmp_path / "soft"
    doc = export_tensors(syn, out, "ddranking", None)
    back = load_export(out)
    assert torch.equal(back.labels, soft) and doc["labels"]["kind"] == "soft" and not doc["labels"]["class_major"]
    assert doc["space"]["kind"] == "normalize" and doc["space"]["zca_eps"] is None
    assert json.loads((out / META_NAME).read_text())["experts_reference"] == {"mean": None, "experts": 2}
    prep = preprocessing_without_data(meta)
    assert prep is not None and preprocessing_without_data(stored.meta) is None
    pngs = export_pngs(syn, tmp_path / "soft-png", prep)
    assert sum(pngs["png"]["per_class"].values()) == 20
    assert pngs["png"]["per_class"] == {str(c): int((soft.argmax(1) == c).sum()) for c in soft.argmax(1).unique().tolist()}
    torch.testing.assert_close(to_pixels(prep, syn.images, clamp=False), syn.images * 0.25 + 0.5)


def test_scores_follow_their_definitions() -> None:
    # Paired per-run differences (same seeds per run), population std — as DD-Ranking reports.
    mean, std, paired = paired_gain([0.5, 0.6, 0.7], [0.3, 0.5, 0.4])
    assert paired and math.isclose(mean, 1 / 3 * (0.2 + 0.1 + 0.3)) and math.isclose(std, np.std([0.2, 0.1, 0.3]))
    mean, std, paired = paired_gain([0.5, 0.7], [0.3, 0.5, 0.4])
    assert not paired and std is None and math.isclose(mean, 0.6 - 0.4)
    mean, std = hard_label_recovery(0.8, [0.5, 0.6, 0.7])
    assert math.isclose(mean, 0.2) and math.isclose(std, np.std([0.5, 0.6, 0.7]))
    assert whole_data_accuracy({"mean": 0.71}, None) == (0.71, "experts")
    assert whole_data_accuracy({"mean": float("nan")}, None) == (None, "unknown")
    assert whole_data_accuracy({"mean": 0.71}, 84.5) == (0.845, "option")
    with pytest.raises(UsageError):
        whole_data_accuracy(None, 250.0)
