"""Tests for mctool.plots: grids, PIL line plots and the `inspect --png` overview."""

from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from mctool import store
from mctool.models import ModelSpec, build_model, layer_sizes, param_layout
from mctool.store import ConvexMeta, DatasetMeta
from mctool.plots import (
    WAYPOINTS_LABEL,
    _test_subset,
    class_labels,
    convexified_accuracy,
    line_plot,
    layer_picks,
    minmax_images,
    nice_axis,
    save_grid,
    synset_caption,
    synset_grid,
    synset_picture,
    write_overview,
)
from mctool.store.synsets import BestImages
from mctool.data.prepared import prepare
from mctool.convexify.trajectory import ConvexTrajectory, convexify

CPU = torch.device("cpu")
BLUE, ORANGE, GREEN = (31, 119, 180), (255, 127, 14), (44, 160, 44)  # series 1, 2, 3
SPEC = ModelSpec(depth=1, width=4, channels=1, num_classes=3, im_size=(8, 8))
K = 6
POSITIONS = [0, 3, 6]
IPC = 2
E = 2


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _has_colour(px: np.ndarray, colour: tuple[int, int, int]) -> bool:
    """Whether a curve or legend swatch of `colour` is drawn (antialiasing shifts shades a little)."""
    return int((np.abs(px.astype(int) - colour) <= 12).all(-1).sum()) > 20


def _meta(name: str = "folder:/nonexistent", fingerprint: str = "0" * 16) -> DatasetMeta:
    return DatasetMeta(name=name, num_classes=3, channels=1, height=8, width=8, zca=False, zca_eps=0.0,
                       mean=(0.5,), std=(0.25,), class_names=("a", "b", "c"), train_fingerprint=fingerprint)


def _trajectory(seed: int) -> tuple[torch.Tensor, list[int]]:
    """A smooth random walk from a real init, [K+1, P], and the layer sizes."""
    model = build_model(SPEC, seed=seed)
    layout = param_layout(model)
    start = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    g = torch.Generator().manual_seed(seed)
    steps = 0.05 * torch.randn(K, start.numel(), generator=g)
    traj = torch.cat([start[None], start[None] + steps.cumsum(0)])
    return traj, layer_sizes(layout)


def _build(path: Path, meta: DatasetMeta, synsets: bool = True, convex: bool = True,
           experts: bool = True) -> None:
    """A tiny artifact written through the store's writers (a buffer that also holds synsets,
    so that one file makes every picture)."""
    layout = param_layout(build_model(SPEC))
    sizes = layer_sizes(layout)
    with store.create(path) as f:
        store.write_dataset(f, meta)
        store.write_model(f, SPEC, layout)
        if experts:
            store.experts.create_rows(f, E, store.RowLayout(K, sum(sizes), len(sizes), False, None))
            f["experts"].attrs["epochs"] = K
        if convex:
            c = store.create_convex(f, E, ConvexMeta(tuple(POSITIONS), "mct", False), layout, store.provenance({}, 0))
            for e in range(E):
                store.write_convex_row(c, e, *convexify(*_trajectory(e), POSITIONS, "mct"))
            store.complete(c)
        if synsets:
            for name, ipc, created in (("old", 1, "2020-01-01T00:00:00+00:00"),
                                       ("new", IPC, "2024-01-01T00:00:00+00:00")):
                syn = store.Synset(name=name, images=torch.randn(3 * ipc, 1, 8, 8),
                                   labels=torch.arange(3).repeat_interleave(ipc), lr=0.01, ipc=ipc)
                store.synsets.write_synset(f, syn, {**store.provenance({}, 0), "created": created})
    if experts:
        acc = np.stack([np.linspace(0.3, 0.8, K + 1), np.linspace(0.1, 0.6, K + 1)]).astype(np.float32)
        acc[1, 2] = np.nan  # a missing value must not break the mean
        with store.append(path) as f:
            rows = store.ExpertRows(f)
            for e in range(E):
                rows.finish(e, seed=e, test_accuracy=list(acc[e]), train_loss=[float("nan")] * (K + 1))


# --------------------------------------------------------------------------- grids


def test_save_grid_upscales_small_images_and_pads_white(tmp_path: Path) -> None:
    out = save_grid(torch.zeros(6, 3, 8, 8), tmp_path / "sub" / "g.png", nrow=3)
    px = _pixels(out)
    # 8 px -> x8 = 64 px tiles, 2 px white padding around and between: 3 x 2 tiles.
    assert px.shape == (2 + 2 * 66, 2 + 3 * 66, 3)
    assert (px[0] == 255).all() and (px[2:66, 2:66] == 0).all()


def test_save_grid_leaves_large_images_alone(tmp_path: Path) -> None:
    px = _pixels(save_grid(torch.rand(2, 1, 64, 64), tmp_path / "g.png", nrow=2))
    assert px.shape == (68, 134, 3)


def test_synset_grid_shows_at_most_ten_per_class(tmp_path: Path) -> None:
    images = torch.randn(3 * 12, 1, 32, 32)  # ipc 12, class-major
    px = _pixels(synset_grid(images, None, 12, tmp_path / "s.png"))
    assert px.shape == (2 + 3 * 66, 2 + 10 * 66, 3)  # 3 rows of 10, 32 px upscaled x2


def _syn(ipc: int = 12, **changes) -> store.Synset:
    images = torch.rand(3 * ipc, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    values = dict(name="fashion-mnist-ipc10", images=images, labels=torch.arange(3).repeat_interleave(ipc), lr=0.01,
                  ipc=ipc, iterations=500, config={"iterations": 500},
                  best=BestImages(images=1 - images, labels=torch.arange(3).repeat_interleave(ipc), lr=0.01,
                                  iteration=300, selected_on="validation", score={"mean": 0.7234}))
    values.update(changes)
    return store.Synset(**values)


def test_the_synset_caption_says_what_the_picture_shows() -> None:
    meta = _meta("fashion-mnist")
    final = synset_caption(_syn(), meta).splitlines()
    assert final[0].startswith("Synthetic images (MCT distillation), not real ones: fashion-mnist, synset "
                               "'fashion-mnist-ipc10', ipc 12 (12 per class, the first 10 shown)")
    assert final[1] == "final images after 500 iterations"
    assert final[2] == "one row per class; de-normalised for display"
    best = synset_caption(_syn(), meta, best=True).splitlines()[1]
    assert best == ("best images: iteration 300 of 500, selected on a validation split held out of the training set "
                    "(72.3% there)")
    syn = _syn(2, iterations=120, complete=False)
    syn.best.selected_on = "test"  # type: ignore[union-attr]
    assert "selected on the TEST split (the authors' protocol)" in synset_caption(syn, meta, best=True)
    assert "latest images of a run not finished: iteration 120 of 500" in synset_caption(syn, meta)
    assert "(2 per class)" in synset_caption(syn, meta)
    assert "min-max scaled" in synset_caption(syn, meta, dewhitened=False)
    assert "moving average" not in synset_caption(syn, meta) and "learned" not in synset_caption(syn, meta)
    levers = _syn(config={"iterations": 500, "ema": 0.99, "learn_labels": True})
    lines = synset_caption(levers, meta).splitlines()
    assert lines[1] == "final images after 500 iterations (their moving average, --ema 0.99)"
    assert lines[2] == ("one row per class (the class each image was made for; its labels are learned); "
                        "de-normalised for display")


def test_class_labels_name_every_row() -> None:
    assert class_labels(_meta()) == ["0 a", "1 b", "2 c"]
    digits = DatasetMeta(**{**_meta().__dict__, "class_names": ("0", "1", "2")})
    assert class_labels(digits) == ["0", "1", "2"]
    unnamed = DatasetMeta(**{**_meta().__dict__, "class_names": ()})
    assert class_labels(unnamed) == ["class 0", "class 1", "class 2"]


def test_the_synset_picture_keeps_the_grid_under_its_caption_right_of_the_class_names(tmp_path: Path) -> None:
    syn = _syn(IPC)
    plain = _pixels(synset_grid(syn.images, None, IPC, tmp_path / "plain.png"))
    px = _pixels(synset_picture(syn, _meta(), None, tmp_path / "s.png"))
    h, w = plain.shape[:2]
    (x,) = [x for x in range(px.shape[1] - w + 1) if (px[-h:, x:x + w] == plain).all()]  # the grid, once
    assert x > 0 and (px[-h:, :x] < 128).any()  # the class names, left of the grid
    assert (px[:-h] < 128).any()  # the caption, above it
    best = _pixels(synset_picture(syn, _meta(), None, tmp_path / "b.png", best=True))
    assert best.shape[0] >= px.shape[0] and not (best[-h:, x:x + w] == plain).all()  # the best images, not the final


def test_minmax_handles_constant_images() -> None:
    x = torch.cat([torch.full((1, 1, 4, 4), 7.0), torch.arange(16.0).view(1, 1, 4, 4)])
    y = minmax_images(x)
    assert torch.isfinite(y).all() and y.min() == 0 and y[1].max() == 1


# --------------------------------------------------------------------------- line plots


def test_nice_axis_ticks_and_constant_range() -> None:
    lo, hi, ticks = nice_axis(0, 50)
    assert (lo, hi) == (0, 50) and ticks == [0, 10, 20, 30, 40, 50]
    lo, hi, ticks = nice_axis(0.5, 0.5)
    assert lo < 0.5 < hi and 3 <= len(ticks) <= 7
    lo, hi, ticks = nice_axis(math.nan, math.nan)
    assert (lo, hi) == (0, 1)


def test_line_plot_with_nan_and_constant_series(tmp_path: Path) -> None:
    xs = list(range(11))
    series = [
        ("with gaps", xs, [0.1 * i if i % 4 else math.nan for i in xs]),
        ("constant", xs, [0.5] * 11),
        ("isolated point", [3.0], [0.2]),
    ]
    out = line_plot(series, tmp_path / "p.png", "a title", "epoch", "value", vlines=[0, 5, 10], size=(640, 400))
    px = _pixels(out)
    assert px.shape == (400, 640, 3)
    assert (px[0, 0] == 255).all()  # white background
    assert all(_has_colour(px, c) for c in (BLUE, ORANGE, GREEN))


def test_the_legend_never_overlaps_and_explains_the_dashed_lines(tmp_path: Path, monkeypatch) -> None:
    import mctool.plots as plots

    cv = plots._Canvas((800, 500))
    labels = [f"features.{i}.weight" for i in range(7)] + [WAYPOINTS_LABEL]
    side = plots._legend(cv, labels, 1, plot_height=cv.u(400))
    assert side is not None and not side.below and side.columns == 1
    assert side.row >= plots._line_height(cv.font) + cv.u(4)  # entries a line apart, never overlapping
    small = plots._Canvas((500, 240))
    under = plots._legend(small, labels, 1, plot_height=small.u(150))
    assert under is not None and under.below and under.columns > 1 and under.rows * under.columns >= len(labels)
    frame = plots._layout(small, under, [0.0, 1.0], "t", (0, 1, 0, 1))
    assert frame.bottom + small.u(20) < small.img.size[1] - under.height  # the plot stops above the legend
    px = _pixels(line_plot([(lab, [0, 1], [i, i + 1]) for i, lab in enumerate(labels[:-1])], tmp_path / "p.png",
                           "t", "epoch", "beta", vlines=[0.5], size=(500, 240), vline_label=WAYPOINTS_LABEL))
    assert px.shape == (240, 500, 3)
    # β and accuracy plots name their dashed lines in the legend.
    calls = []
    monkeypatch.setattr(plots, "line_plot", lambda *a, **k: calls.append(k) or tmp_path / "x.png")
    layout = param_layout(build_model(SPEC))
    traj, sizes = _trajectory(0)
    w, b = convexify(traj, sizes, POSITIONS)
    plots.beta_plot(plots._Convex(0, POSITIONS, w, b, SPEC, layout), tmp_path / "beta.png")
    assert calls[-1]["vline_label"] == WAYPOINTS_LABEL and calls[-1]["vlines"] == [0.0, 3.0, 6.0]


def test_line_plot_all_nan_and_empty(tmp_path: Path) -> None:
    px = _pixels(line_plot([("nothing", [0, 1], [math.nan, math.nan])], tmp_path / "a.png", "t", "x", "y"))
    assert px.shape == (500, 800, 3)
    assert _pixels(line_plot([], tmp_path / "b.png", "t", "x", "y")).shape == (500, 800, 3)


# --------------------------------------------------------------------------- overview


def test_overview_writes_three_pictures_without_the_dataset(tmp_path: Path) -> None:
    file = tmp_path / "a.h5"
    _build(file, _meta())
    paths = write_overview(file, tmp_path / "out" / "overview.png", device=CPU)
    assert [p.name for p in paths] == ["overview-synset.png", "overview-beta.png", "overview-accuracy.png"]
    synset = _pixels(paths[0])
    # The latest synset ("new", ipc 2): 3 class rows x 2 columns of 8 px upscaled x8, at the
    # bottom, under its caption and right of the class names.
    grid = _pixels(synset_grid(torch.zeros(3 * IPC, 1, 8, 8), None, IPC, tmp_path / "plain.png"))
    assert grid.shape == (2 + 3 * 66, 2 + IPC * 66, 3)
    assert synset.shape[0] > grid.shape[0] and synset.shape[1] > grid.shape[1]
    for p in paths[1:]:
        assert _pixels(p).shape == (500, 800, 3)
    # Without the dataset: stored mean + expert 0's stored curve, no convexified curve.
    accuracy = _pixels(paths[2])
    assert _has_colour(accuracy, BLUE) and _has_colour(accuracy, ORANGE) and not _has_colour(accuracy, GREEN)


def test_overview_skips_missing_parts(tmp_path: Path) -> None:
    file = tmp_path / "a.h5"
    _build(file, _meta(), synsets=False, convex=False)
    assert [p.name for p in write_overview(file, tmp_path / "o.png", device=CPU)] == ["o-accuracy.png"]

    bare = tmp_path / "b.h5"
    _build(bare, _meta(), synsets=False, convex=False, experts=False)
    assert write_overview(bare, tmp_path / "b.png", device=CPU) == []

    # An interrupted /convex is no β picture (and no error).
    with h5py.File(file, "r+") as f:
        c = f.create_group("convex")
        c.attrs.update({"complete": False, "positions": np.array(POSITIONS), "strategy": "mct", "smoothing": "none"})
    assert [p.name for p in write_overview(file, tmp_path / "o.png", device=CPU)] == ["o-accuracy.png"]


def _folder_dataset(root: Path) -> Path:
    """3 classes of 8x8 greyscale PNGs under train/ and test/."""
    g = np.random.default_rng(0)
    for split, n in (("train", 4), ("test", 3)):
        for c in "abc":
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(g.integers(0, 256, (8, 8), dtype=np.uint8), "L").save(d / f"{i}.png")
    return root


def test_overview_with_the_dataset_evaluates_the_convexified_path(tmp_path: Path) -> None:
    prepared = prepare(f"folder:{_folder_dataset(tmp_path / 'data')}", None, False, 0.0, CPU)
    file = tmp_path / "a.h5"
    _build(file, prepared.meta)
    paths = write_overview(file, tmp_path / "overview.png", device=CPU)
    assert len(paths) == 3 and all(p.exists() for p in paths)
    assert _has_colour(_pixels(paths[2]), GREEN)  # the convexified curve was computed


def test_convexified_accuracy_matches_the_waypoint_networks() -> None:
    traj, sizes = _trajectory(0)
    waypoints, beta = convexify(traj, sizes, POSITIONS, "mct")
    path = ConvexTrajectory(waypoints, beta, POSITIONS, sizes)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2500, 1, 8, 8, generator=g), torch.randint(0, 3, (2500,), generator=g)
    acc = convexified_accuracy(SPEC, path, x, y)
    assert len(acc) == K + 1
    for i, p in enumerate(POSITIONS):  # at a waypoint, θ̂ is the waypoint itself
        model = build_model(SPEC)
        torch.nn.utils.vector_to_parameters(waypoints[i], model.parameters())
        with torch.no_grad():
            expected = (model(x).argmax(1) == y).float().mean().item()
        assert acc[p] == pytest.approx(expected)


def test_test_subset_is_strided_and_capped_on_cpu() -> None:
    x, y = torch.zeros(2500, 1, 2, 2), torch.arange(2500)
    sx, sy = _test_subset(x, y, None)
    assert sx.shape[0] <= 1000 and sy[1] - sy[0] == 3  # every 3rd image, all classes kept
    assert _test_subset(x, y, 0)[0].shape[0] == 2500
    assert _test_subset(x, y, 5000)[0].shape[0] == 2500


def test_layer_picks_prefer_weights() -> None:
    assert layer_picks(["a.weight", "a.bias"]) == ([0, 1], "")
    picks, how = layer_picks(["w.weight", "w.bias"] * 7)  # ConvNet depth 3: 14 tensors
    assert picks == [0, 2, 4, 6, 8, 10, 12] and "7 weight" in how
    picks, how = layer_picks([f"t{i}" for i in range(20)])
    assert len(picks) == 8 and picks[0] == 0 and picks[-1] == 19 and "evenly" in how
