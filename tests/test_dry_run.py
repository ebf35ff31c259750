"""`mctool distill --dry-run`: estimated peak memory per gradient mode and the micro-batch `auto`
would choose, for a Tiny-ImageNet-shaped buffer — without data, and without running anything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mctool import store
from mctool.distill import DistillConfig, dry_run, resolve_config
from mctool.models import ModelSpec, layer_sizes, layout_of
from tests.helpers import assert_one_line_error, cli


def tiny_imagenet_buffer(path: Path, depth: int = 3) -> Path:
    """A buffer shaped like the MCT authors' Tiny ImageNet experts (K = 50, ConvNet width 128 on
    3×64×64, 200 classes, 2 interior waypoints); its rows are allocated but never written."""
    data = store.DatasetMeta(name="tinyimagenet", num_classes=200, channels=3, height=64, width=64, zca=True,
                             zca_eps=0.1, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), class_names=(),
                             train_fingerprint="0" * 16)
    spec = ModelSpec(depth=depth, width=128, channels=3, num_classes=200, im_size=(64, 64))
    layout = layout_of(spec)
    sizes = layer_sizes(layout)
    rows = store.RowLayout(50, sum(sizes), len(sizes), trajectories=False, num_waypoints=4)
    meta = store.ConvexMeta((0, 17, 33, 50), "mct", False)
    store.create_buffer(path, data, spec, layout, 2, rows, {"epochs": 50, "lr": 0.01, "seed": 0},
                        (meta, store.provenance({"streaming": True}, 0)))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_imagenet_buffer(tmp_path_factory.mktemp("tiny") / "tiny.h5")


def test_dry_run_reports_every_mode_and_auto_chunks_what_does_not_fit(tiny: Path, monkeypatch) -> None:
    from mctool.matching import memory

    gib = 2**30
    monkeypatch.setattr(memory, "free_bytes", lambda device: 16 * gib)  # a 16 GiB device
    report = dry_run("tinyimagenet-ipc50", {}, tiny, "cpu")
    assert [r.mode for r in report.rows] == ["constant", "adjoint", "unrolled"]
    assert report.images == 10000 and report.batch == 10000 and report.syn_steps == 50
    constant = report.rows[0]
    assert constant.selected and not constant.whole_fits  # 10,000 images of 64 px: far beyond 16 GiB
    assert constant.micro_batch is not None and constant.micro_batch < 10000 and constant.fits
    assert constant.chunked_bytes <= 0.6 * 16 * gib < constant.whole_bytes
    # Memory is set by the micro-batch, not by ipc: ipc 10 chunks to the same size and peak (± resident images).
    small = dry_run("tinyimagenet-ipc10", {}, tiny, "cpu").rows[0]
    assert small.micro_batch is not None
    assert abs(small.chunked_bytes - constant.chunked_bytes) < 0.25 * constant.chunked_bytes
    # The resident training split is counted (110,000 images of 3×64×64 floats).
    assert constant.whole_bytes > 110_000 * 3 * 64 * 64 * 4


def test_dry_run_cli_prints_a_table_and_json(tiny: Path) -> None:
    r = cli("distill", "--preset", "tinyimagenet-ipc50", "--buffer", tiny, "--dry-run", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "constant" in r.stdout and "adjoint" in r.stdout and "unrolled" in r.stdout
    assert "--micro-batch auto" in r.stdout and "GiB" in r.stdout
    doc = json.loads(cli("distill", "--preset", "tinyimagenet-ipc50", "--buffer", tiny, "--dry-run", "--json",
                         "--device", "cpu").stdout)
    assert {row["mode"] for row in doc["rows"]} == {"constant", "adjoint", "unrolled"}
    assert not list(tiny.parent.glob("synset*")), "a dry run writes nothing"


def test_dry_run_refuses_what_a_run_would(tmp_path: Path, tiny: Path) -> None:
    assert_one_line_error(cli("distill", "--preset", "cifar10-ipc10", "--buffer", tiny, "--dry-run"), 2,
                          "holds experts for 'tinyimagenet'")
    assert_one_line_error(cli("distill", "--buffer", tmp_path / "none.h5", "--dry-run"), 2, "no such file")
    assert_one_line_error(cli("distill", "--buffer", tiny, "--dry-run", "--micro-batch", "lots"), 2,
                          "--micro-batch must be auto or a whole number")


def test_tiny_presets_were_made_for_depth_3(tiny: Path, tmp_path: Path) -> None:
    with store.open_buffer(tiny) as buf:
        assert resolve_config("tinyimagenet-ipc10", {}, buf).depth == 3
    assert DistillConfig().depth == 0
