"""Malformed artifacts (issue 12, issue 14 items 6/7): every damaged file is refused by every
command that reads it with exit 2 and one line naming the file and the field — never an
internal error, a traceback or a silent success — and the file is left byte-identical.

The matrix: each damage (wrong type, wrong shape, wrong dtype, missing attribute or dataset,
out-of-range values, NaN where none may be, groups that disagree) of each group (/, /dataset,
/model, /experts, /convex, /synsets/NAME with best/ and checkpoint/) applied to artifacts
made by the current commands and by release 0.1.0, run through the commands that read it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from tests.conftest import cli
from tests.damage import DISTILL_TINY, command, digest, one_line_refusal

RELEASE = Path(__file__).parent / "data" / "release-0.1.0"

# The commands that read each kind of artifact.
READERS = {
    "buffer": ("inspect", "inspect-json", "inspect-png", "convexify", "convexify-o", "distill", "experts"),
    "compact": ("inspect", "inspect-json", "inspect-png", "distill"),
    "streamed": ("inspect", "inspect-json", "inspect-png", "distill", "experts-stream"),
    "synset": ("inspect", "inspect-json", "inspect-png", "evaluate", "distill-resume", "export", "export-png"),
}
# Which artifacts each base is: built now by the commands, or written by release 0.1.0.
BASES = {
    "buffer": "buffer", "compact": "compact", "synset": "synset",
    "release-buffer": "buffer", "release-compact": "compact", "release-streamed": "streamed",
    "release-synset": "synset",
}
ALL = tuple(BASES)
BUFFERS = ("buffer", "compact", "release-buffer", "release-compact", "release-streamed")
WITH_TRAJECTORIES = ("buffer", "release-buffer")
SYNSETS = ("synset", "release-synset")
NAME = "mct-ipc1"  # the built synset; the release one is mct-ipc2


# --------------------------------------------------------------------------- damages


@dataclass(frozen=True)
class Damage:
    """One way to damage a file: what to change, the field the refusal must name, where it applies."""

    name: str
    change: Callable[[h5py.File], None]
    field: str
    bases: tuple[str, ...] = ALL
    commands: tuple[str, ...] | None = None  # None: every reader of the base


def synset_group(f: h5py.File) -> str:
    """The path of the (only) synset in a synset file."""
    return f"synsets/{next(iter(f['synsets']))}"


def _resolve(f: h5py.File, path: str) -> str:
    return path.replace("SYN", synset_group(f)) if "SYN" in path else path


def attr(path: str, key: str, value: Any = None, delete: bool = False) -> Callable[[h5py.File], None]:
    """Set (or delete) attribute `key` of group `path`."""

    def change(f: h5py.File) -> None:
        obj = f[_resolve(f, path)]
        if delete:
            del obj.attrs[key]
        else:
            obj.attrs[key] = value

    return change


def data(path: str, make: Callable[[np.ndarray], Any]) -> Callable[[h5py.File], None]:
    """Replace dataset `path` by `make(old values)` (a numpy array, or "group" for a group)."""

    def change(f: h5py.File) -> None:
        p = _resolve(f, path)
        old = f[p][()] if isinstance(f[p], h5py.Dataset) else None
        new = make(old)
        del f[p]
        if isinstance(new, str) and new == "group":
            f.create_group(p)
        elif new is not None:
            f.create_dataset(p, data=new)

    return change


def values(path: str, edit: Callable[[np.ndarray], None]) -> Callable[[h5py.File], None]:
    """Change some values of dataset `path` in place (same shape and dtype)."""

    def change(f: h5py.File) -> None:
        ds = f[_resolve(f, path)]
        arr = ds[()]
        edit(arr)
        ds[...] = arr

    return change


def group_as_dataset(path: str) -> Callable[[h5py.File], None]:
    """Replace group `path` by a small dataset."""

    def change(f: h5py.File) -> None:
        p = _resolve(f, path)
        del f[p]
        f[p] = np.arange(3)

    return change


def both(*changes: Callable[[h5py.File], None]) -> Callable[[h5py.File], None]:
    """Several changes at once (groups that disagree)."""

    def change(f: h5py.File) -> None:
        for c in changes:
            c(f)

    return change


def _nan_everywhere(arr: np.ndarray) -> None:
    arr.reshape(arr.shape[0], -1)[:, 1] = np.nan  # every row: whichever a command reads


def _set(index: Any, value: Any) -> Callable[[np.ndarray], None]:
    def edit(arr: np.ndarray) -> None:
        arr[index] = value

    return edit


def _wider_model(f: h5py.File) -> None:
    """A /model consistent in itself (width 16) whose parameter count no longer matches the rows."""
    from mctool.models import ModelSpec, layer_sizes, layout_json, layout_of

    g = f["model"]
    spec = ModelSpec(arch="ConvNet", depth=int(g.attrs["depth"]), width=16, norm=str(g.attrs["norm"]),
                     act=str(g.attrs["act"]), pool=str(g.attrs["pool"]), channels=int(g.attrs["channels"]),
                     num_classes=int(g.attrs["num_classes"]), im_size=tuple(json.loads(g.attrs["im_size"])))
    layout = layout_of(spec)
    g.attrs["width"] = 16
    g.attrs["layers"] = layout_json(layout)
    g.attrs["num_params"] = sum(layer_sizes(layout))


def _soft(rows_sum: float, classes: int = 10) -> Callable[[np.ndarray], np.ndarray]:
    def make(old: np.ndarray) -> np.ndarray:
        out = np.full((old.shape[0], classes), rows_sum / classes, np.float32)
        return out

    return make


nan = float("nan")
INSPECT = ("inspect", "inspect-json")
_traj_readers = ("convexify", "convexify-o")
_beta_readers = ("inspect", "inspect-json", "inspect-png", "distill")
_waypoint_readers = ("inspect-png", "distill")
_image_readers = ("inspect-png", "evaluate", "distill-resume", "export", "export-png")

DAMAGES = [
    # / ------------------------------------------------------------------------------------------------
    Damage("root-version-str", attr("/", "format_version", "1"), "format_version"),
    Damage("root-version-float", attr("/", "format_version", 1.0), "format_version"),
    Damage("root-version-array", attr("/", "format_version", np.array([1, 1])), "format_version"),
    Damage("root-version-missing", attr("/", "format_version", delete=True), "format_version"),
    Damage("root-version-zero", attr("/", "format_version", 0), "format_version"),
    Damage("root-format-missing", attr("/", "format", delete=True), "format"),
    Damage("root-format-int", attr("/", "format", 5), "format"),
    Damage("root-artifact-id-int", attr("/", "artifact_id", 7), "artifact_id"),
    Damage("root-created-array", attr("/", "created", np.array([1.0, 2.0])), "created"),
    Damage("root-mctool-version-float", attr("/", "mctool_version", 0.1), "mctool_version"),
    # /dataset -----------------------------------------------------------------------------------------
    Damage("dataset-missing", lambda f: f.__delitem__("dataset"), "/dataset"),
    Damage("dataset-is-dataset", group_as_dataset("dataset"), "/dataset"),
    Damage("dataset-channels-str", attr("dataset", "channels", "1"), "'channels'"),
    Damage("dataset-channels-float", attr("dataset", "channels", 1.5), "'channels'"),
    Damage("dataset-channels-zero", attr("dataset", "channels", 0), "'channels'"),
    Damage("dataset-channels-array", attr("dataset", "channels", np.array([1, 1])), "'channels'"),
    Damage("dataset-classes-missing", attr("dataset", "num_classes", delete=True), "'num_classes'"),
    Damage("dataset-classes-huge", attr("dataset", "num_classes", 10**9), "'num_classes'"),
    Damage("dataset-height-negative", attr("dataset", "height", -28), "'height'"),
    Damage("dataset-width-bool", attr("dataset", "width", True), "'width'"),
    Damage("dataset-zca-str", attr("dataset", "zca", "yes"), "'zca'"),
    Damage("dataset-zca-eps-nan", attr("dataset", "zca_eps", nan), "'zca_eps'"),
    Damage("dataset-zca-eps-zero", attr("dataset", "zca_eps", 0.0), "'zca_eps'"),
    Damage("dataset-normalization-json", attr("dataset", "normalization", "{"), "'normalization'"),
    Damage("dataset-normalization-std-zero", attr("dataset", "normalization", '{"mean": [0.1], "std": [0]}'),
           "'normalization'"),
    Damage("dataset-normalization-nan", attr("dataset", "normalization", '{"mean": [NaN], "std": [1]}'),
           "'normalization'"),
    Damage("dataset-normalization-int", attr("dataset", "normalization", 3), "'normalization'"),
    Damage("dataset-class-names-count", attr("dataset", "class_names", '["a", "b", "c"]'), "'class_names'"),
    Damage("dataset-class-names-numbers", attr("dataset", "class_names", json.dumps(list(range(10)))),
           "'class_names'"),
    Damage("dataset-name-int", attr("dataset", "name", 5), "'name'"),
    Damage("dataset-fingerprint-missing", attr("dataset", "train_fingerprint", delete=True), "'train_fingerprint'"),
    Damage("dataset-flip-int", attr("dataset", "flip", 2), "'flip'"),
    # groups that disagree: the data's classes and shape vs the network's
    Damage("dataset-classes-vs-model", both(attr("dataset", "num_classes", 5),
                                            attr("dataset", "class_names", json.dumps(list("abcde")))),
           "'num_classes'"),
    Damage("dataset-shape-vs-model", attr("dataset", "height", 32), "'im_size'"),
    # /model -------------------------------------------------------------------------------------------
    Damage("model-missing", lambda f: f.__delitem__("model"), "/model"),
    Damage("model-is-dataset", group_as_dataset("model"), "/model"),
    Damage("model-depth-str", attr("model", "depth", "3"), "'depth'"),
    Damage("model-width-zero", attr("model", "width", 0), "'width'"),
    Damage("model-norm-unknown", attr("model", "norm", "foonorm"), "'norm'"),
    Damage("model-act-int", attr("model", "act", 1), "'act'"),
    Damage("model-im-size-short", attr("model", "im_size", "[28]"), "'im_size'"),
    Damage("model-im-size-text", attr("model", "im_size", "28x28"), "'im_size'"),
    Damage("model-layers-fewer", lambda f: f["model"].attrs.__setitem__(
        "layers", json.dumps(json.loads(f["model"].attrs["layers"])[:-1])), "'layers'"),
    Damage("model-layers-junk", attr("model", "layers", '[{"x": 1}]'), "'layers'"),
    Damage("model-num-params", attr("model", "num_params", 123), "'num_params'"),
    Damage("model-arch-unknown", attr("model", "arch", "ResNet999"), "'arch'"),
    Damage("model-classes-missing", attr("model", "num_classes", delete=True), "'num_classes'"),
    # a network consistent in itself whose parameter count disagrees with the stored rows
    Damage("model-vs-trajectories", _wider_model, "/experts/trajectories", WITH_TRAJECTORIES),
    Damage("model-vs-waypoints", _wider_model, "/convex/waypoints", ("compact", "release-compact",
                                                                      "release-streamed")),
    # /experts -----------------------------------------------------------------------------------------
    Damage("experts-missing", lambda f: f.__delitem__("experts"), "/experts", WITH_TRAJECTORIES,
           ("convexify", "convexify-o", "experts")),
    Damage("experts-is-dataset", group_as_dataset("experts"), "/experts", BUFFERS),
    Damage("experts-epochs-str", attr("experts", "epochs", "4"), "'epochs'", BUFFERS),
    Damage("experts-epochs-zero", attr("experts", "epochs", 0), "'epochs'", BUFFERS),
    Damage("experts-epochs-vs-rows", attr("experts", "epochs", 5), "/experts/test_accuracy", BUFFERS),
    Damage("experts-done-missing", data("experts/done", lambda a: None), "/experts/done", BUFFERS),
    Damage("experts-done-float", data("experts/done", lambda a: a.astype(np.float32)), "/experts/done", BUFFERS),
    Damage("experts-done-2d", data("experts/done", lambda a: np.ones((a.shape[0], 2), bool)), "/experts/done",
           BUFFERS),
    Damage("experts-done-group", data("experts/done", lambda a: "group"), "/experts/done", BUFFERS),
    Damage("experts-seeds-float", data("experts/seeds", lambda a: a.astype(np.float64)), "/experts/seeds",
           BUFFERS),
    Damage("experts-seeds-rows", data("experts/seeds", lambda a: np.zeros(a.shape[0] + 1, np.int64)),
           "/experts/seeds", BUFFERS),
    Damage("experts-accuracy-shape", data("experts/test_accuracy", lambda a: a[:, :3]), "/experts/test_accuracy",
           BUFFERS),
    Damage("experts-accuracy-int", data("experts/test_accuracy", lambda a: a.astype(np.int32)),
           "/experts/test_accuracy", BUFFERS),
    Damage("experts-accuracy-range", values("experts/test_accuracy", _set((0, -1), 7.0)), "/experts/test_accuracy",
           BUFFERS, ("inspect", "inspect-json", "inspect-png", "distill")),
    Damage("experts-loss-shape", data("experts/train_loss", lambda a: a[:, :2]), "/experts/train_loss", BUFFERS),
    Damage("experts-trajectories-shape", data("experts/trajectories", lambda a: a[:, :, :-1]),
           "/experts/trajectories", WITH_TRAJECTORIES),
    Damage("experts-trajectories-int", data("experts/trajectories", lambda a: a.astype(np.int16)),
           "/experts/trajectories", WITH_TRAJECTORIES),
    Damage("experts-trajectories-group", data("experts/trajectories", lambda a: "group"), "/experts/trajectories",
           WITH_TRAJECTORIES),
    Damage("experts-trajectories-nan", values("experts/trajectories", _nan_everywhere), "/experts/trajectories",
           WITH_TRAJECTORIES, _traj_readers),
    Damage("experts-lr-str", attr("experts", "lr", "0.05"), "'lr'", BUFFERS),
    Damage("experts-lr-negative", attr("experts", "lr", -1.0), "'lr'", BUFFERS),
    Damage("experts-config-json", attr("experts", "config", "{"), "'config'", BUFFERS),
    Damage("experts-config-list", attr("experts", "config", "[1]"), "'config'", BUFFERS),
    Damage("experts-batch-size-zero", attr("experts", "batch_size", 0), "'batch_size'", BUFFERS),
    Damage("experts-seed-float", attr("experts", "seed", 1.5), "'seed'", BUFFERS),
    Damage("experts-trajectories-in-int", attr("experts", "trajectories_in", 5), "'trajectories_in'",
           ("compact", "release-compact")),
    # /convex ------------------------------------------------------------------------------------------
    Damage("convex-is-dataset", group_as_dataset("convex"), "/convex", ("compact", "release-compact")),
    Damage("convex-positions-str", attr("convex", "positions", "0,2,4"), "'positions'", BUFFERS),
    Damage("convex-positions-float", attr("convex", "positions", np.array([0.0, 2.0, 4.0])), "'positions'", BUFFERS),
    Damage("convex-positions-unordered", attr("convex", "positions", np.array([0, 3, 2, 4])), "'positions'",
           BUFFERS),
    Damage("convex-positions-vs-epochs", attr("convex", "positions", np.array([0, 2, 3])), "'positions'", BUFFERS),
    Damage("convex-positions-missing", attr("convex", "positions", delete=True), "'positions'", BUFFERS),
    Damage("convex-strategy-unknown", attr("convex", "strategy", "foo"), "'strategy'", BUFFERS),
    Damage("convex-strategy-int", attr("convex", "strategy", 3), "'strategy'", BUFFERS),
    Damage("convex-smoothing-unknown", attr("convex", "smoothing", "lots"), "'smoothing'", BUFFERS),
    Damage("convex-complete-str", attr("convex", "complete", "yes"), "'complete'", BUFFERS),
    Damage("convex-config-json", attr("convex", "config", "{"), "'config'", BUFFERS),
    Damage("convex-waypoints-shape", data("convex/waypoints", lambda a: a[:, :2]), "/convex/waypoints", BUFFERS),
    Damage("convex-waypoints-int", data("convex/waypoints", lambda a: a.astype(np.int32)), "/convex/waypoints",
           BUFFERS),
    Damage("convex-waypoints-missing", data("convex/waypoints", lambda a: None), "/convex/waypoints", BUFFERS),
    Damage("convex-waypoints-nan", values("convex/waypoints", _nan_everywhere), "/convex/waypoints", BUFFERS,
           _waypoint_readers),
    Damage("convex-beta-layers", data("convex/beta", lambda a: np.zeros((*a.shape[:2], a.shape[2] + 1), a.dtype)),
           "/convex/beta", BUFFERS),
    Damage("convex-beta-nan", values("convex/beta", _nan_everywhere), "/convex/beta", BUFFERS, _beta_readers),
    Damage("convex-beta-range", values("convex/beta", _set((slice(None), 1, 0), 7.0)), "/convex/beta", BUFFERS,
           _beta_readers),
    Damage("convex-done-rows", data("convex/done", lambda a: np.ones(a.shape[0] + 1, bool)), "/convex/",
           BUFFERS),
    Damage("convex-done-int", data("convex/done", lambda a: a.astype(np.float32)), "/convex/done", BUFFERS),
    # /synsets -----------------------------------------------------------------------------------------
    Damage("synsets-is-dataset", group_as_dataset("synsets"), "/synsets", SYNSETS),
    Damage("synsets-member-dataset", lambda f: f.create_dataset("synsets/junk", data=[1]), "/synsets/junk",
           SYNSETS),
    Damage("synset-images-shape", data("SYN/images", lambda a: np.zeros((a.shape[0], 1, 32, 32), a.dtype)),
           "/images", SYNSETS),
    Damage("synset-images-count", data("SYN/images", lambda a: np.concatenate([a, a[:1]])), "/images", SYNSETS),
    Damage("synset-images-channels", data("SYN/images", lambda a: np.concatenate([a, a], 1)), "/images", SYNSETS),
    Damage("synset-images-int", data("SYN/images", lambda a: a.astype(np.int8)), "/images", SYNSETS),
    Damage("synset-images-missing", data("SYN/images", lambda a: None), "/images", SYNSETS),
    Damage("synset-images-nan", values("SYN/images", _set((0, 0, 0, 0), nan)), "/images", SYNSETS, _image_readers),
    Damage("synset-labels-57", values("SYN/labels", _set(0, 57)), "/labels", SYNSETS),
    Damage("synset-labels-negative", values("SYN/labels", _set(0, -1)), "/labels", SYNSETS),
    Damage("synset-labels-float", data("SYN/labels", lambda a: a.astype(np.float32)), "/labels", SYNSETS),
    Damage("synset-labels-count", data("SYN/labels", lambda a: np.concatenate([a, a[:1]])), "/labels", SYNSETS),
    Damage("synset-labels-soft-sum", data("SYN/labels", _soft(3.0)), "/labels", SYNSETS),
    Damage("synset-labels-soft-classes", data("SYN/labels", _soft(1.0, 7)), "/labels", SYNSETS),
    Damage("synset-labels-bool", data("SYN/labels", lambda a: a.astype(bool)), "/labels", SYNSETS),
    Damage("synset-ipc-str", attr("SYN", "ipc", "2"), "'ipc'", SYNSETS),
    Damage("synset-ipc-zero", attr("SYN", "ipc", 0), "'ipc'", SYNSETS),
    Damage("synset-ipc-vs-images", attr("SYN", "ipc", 3), "/synsets/", SYNSETS),
    Damage("synset-lr-nan", attr("SYN", "lr", nan), "'lr'", SYNSETS),
    Damage("synset-lr-negative", attr("SYN", "lr", -0.1), "'lr'", SYNSETS),
    Damage("synset-lr-missing", attr("SYN", "lr", delete=True), "'lr'", SYNSETS),
    Damage("synset-iterations-negative", attr("SYN", "iterations", -3), "'iterations'", SYNSETS),
    Damage("synset-iterations-str", attr("SYN", "iterations", "3"), "'iterations'", SYNSETS),
    Damage("synset-complete-str", attr("SYN", "complete", "yes"), "'complete'", SYNSETS),
    Damage("synset-evaluations-json", attr("SYN", "evaluations", "[{"), "'evaluations'", SYNSETS),
    Damage("synset-evaluations-object", attr("SYN", "evaluations", '{"a": 1}'), "'evaluations'", SYNSETS),
    Damage("synset-evaluations-items", attr("SYN", "evaluations", "[1, 2]"), "'evaluations'", SYNSETS),
    Damage("synset-evaluations-mean", attr("SYN", "evaluations", '[{"mean": "high"}]'), "'evaluations'", SYNSETS),
    Damage("synset-evaluations-runs", attr("SYN", "evaluations", '[{"mean": 0.5, "std": 0.1, "runs": "x"}]'),
           "'evaluations'", SYNSETS),
    Damage("synset-evaluations-std", attr("SYN", "evaluations", '[{"mean": 0.5, "std": "x", "runs": 2}]'),
           "'evaluations'", SYNSETS),
    Damage("synset-evaluations-mean-bool", attr("SYN", "evaluations", '[{"mean": true}]'), "'evaluations'", SYNSETS),
    Damage("synset-config-list", attr("SYN", "config", "[1]"), "'config'", SYNSETS),
    Damage("synset-reference-list", attr("SYN", "experts_reference", "[1]"), "'experts_reference'", SYNSETS),
    Damage("synset-loss-2d", data("SYN/loss", lambda a: np.zeros((3, 2), np.float32)), "/loss", SYNSETS),
    Damage("synset-loss-text", data("SYN/loss", lambda a: np.array([b"x", b"y"])), "/loss", SYNSETS),
    Damage("synset-skipped-negative", attr("SYN", "skipped_iterations", -1), "'skipped_iterations'", SYNSETS),
    Damage("synset-method-int", attr("SYN", "method", 4), "'method'", SYNSETS),
    Damage("synset-created-int", attr("SYN", "created", 4), "'created'", SYNSETS),
    # /synsets/NAME/best (kept by distill --eval-every; the built synset has it)
    Damage("best-is-dataset", group_as_dataset("SYN/best"), "/best", ("synset",)),
    Damage("best-images-shape", data("SYN/best/images", lambda a: a[:, :, :14]), "/best/images", ("synset",)),
    Damage("best-images-nan", values("SYN/best/images", _set((0, 0, 1, 1), nan)), "/best/images", ("synset",),
           ("inspect-png", "evaluate")),
    Damage("best-labels-range", values("SYN/best/labels", _set(0, 10)), "/best/labels", ("synset",)),
    Damage("best-labels-other-kind", data("SYN/best/labels", lambda a: np.eye(10, dtype=np.float32)[a]),
           "/best/labels", ("synset",)),
    Damage("best-lr-nan", attr("SYN/best", "lr", nan), "'lr'", ("synset",)),
    Damage("best-selected-on", attr("SYN/best", "selected_on", "vibes"), "'selected_on'", ("synset",)),
    Damage("best-iteration-negative", attr("SYN/best", "iteration", -1), "'iteration'", ("synset",)),
    Damage("best-iteration-beyond", attr("SYN/best", "iteration", 10**9), "'iteration'", ("synset",)),
    Damage("best-score-list", attr("SYN/best", "score", "[]"), "'score'", ("synset",)),
    Damage("best-score-mean", attr("SYN/best", "score", '{"mean": "x"}'), "'score'", ("synset",)),
    Damage("best-score-mean-null", attr("SYN/best", "score", '{"mean": null}'), "'score'", ("synset",)),
    # /synsets/NAME/checkpoint (what --resume continues)
    Damage("checkpoint-is-dataset", group_as_dataset("SYN/checkpoint"), "/checkpoint", SYNSETS),
    Damage("checkpoint-velocity-shape", data("SYN/checkpoint/images_velocity", lambda a: a[:1]),
           "/checkpoint/images_velocity", SYNSETS),
    Damage("checkpoint-velocity-nan", values("SYN/checkpoint/images_velocity", _set((0, 0, 0, 0), nan)),
           "/checkpoint/images_velocity", SYNSETS, ("distill-resume",)),
    Damage("checkpoint-generators-float", data("SYN/checkpoint/generators", lambda a: a.astype(np.float32)),
           "/checkpoint/generators", SYNSETS),
    Damage("checkpoint-generators-1d", data("SYN/checkpoint/generators", lambda a: a[0]),
           "/checkpoint/generators", SYNSETS),
    Damage("checkpoint-generators-short", data("SYN/checkpoint/generators", lambda a: a[:, :100]),
           "/checkpoint/generators", SYNSETS),
    Damage("checkpoint-queues-json", attr("SYN/checkpoint", "queues", "[["), "'queues'", SYNSETS),
    Damage("checkpoint-world-size", attr("SYN/checkpoint", "world_size", 2), "'world_size'", SYNSETS),
    Damage("checkpoint-run-deep", attr("SYN/checkpoint", "run", "[" * 100_000), "'run'", SYNSETS),
    Damage("checkpoint-queues-count", attr("SYN/checkpoint", "queues", "[[0], [1]]"), "'queues'", SYNSETS),
    Damage("checkpoint-queues-negative", attr("SYN/checkpoint", "queues", "[[-1]]"), "'queues'", SYNSETS),
    Damage("checkpoint-queues-vs-buffer", attr("SYN/checkpoint", "queues", "[[99]]"), "'queues'", SYNSETS,
           ("distill-resume",)),
    Damage("checkpoint-alpha-nan", attr("SYN/checkpoint", "alpha_velocity", nan), "'alpha_velocity'", SYNSETS),
    Damage("checkpoint-alpha-missing", attr("SYN/checkpoint", "alpha_velocity", delete=True), "'alpha_velocity'",
           SYNSETS),
]


def cases(full: bool = True) -> list[Any]:
    """(damage, base, command) for every command that reads each damaged base; not `full`: each
    (damage, command) once, the bases taken in turn (what CI runs)."""
    out = []
    turn = 0
    for d in DAMAGES:
        by_command: dict[str, list[str]] = {}
        for base in d.bases:
            readers = READERS[BASES[base]]
            for cmd in d.commands or readers:
                if cmd in readers:
                    by_command.setdefault(cmd, []).append(base)
        for cmd, bases in by_command.items():
            if not full:
                bases = [bases[turn % len(bases)]]
                turn += 1
            out += [pytest.param(d, base, cmd, id=f"{d.name}:{base}:{cmd}") for base in bases]
    return out


# The whole matrix with MCTOOL_FULL_MATRIX=1 (bench/faults.py sets it); CI runs the sample.
FULL = os.environ.get("MCTOOL_FULL_MATRIX", "") == "1"


# --------------------------------------------------------------------------- artifacts


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory, buffer: Path, convex_buffer: Path,
              data_dir: Path) -> dict[str, Path]:
    """Undamaged artifacts: built by the current commands, and the release 0.1.0 files."""
    root = tmp_path_factory.mktemp("artifacts")
    built = root / "buffer.h5"
    shutil.copyfile(buffer, built)
    r = cli("convexify", built, "--interior", "1", "--quiet")  # /convex in place
    assert r.exit_code == 0, r.output
    synset = root / "synset.h5"
    r = cli("distill", "--buffer", convex_buffer, "-o", synset, "--data-dir", data_dir, *DISTILL_TINY,
            "--checkpoint-every", "1", "--eval-every", "1", "--eval-runs", "1", "--eval-epochs", "1")
    assert r.exit_code == 0, r.output
    with h5py.File(synset) as f:
        assert {"best", "checkpoint"} <= set(f[f"synsets/{NAME}"]), "the built synset must keep best/ and checkpoint/"
    return {
        "buffer": built, "compact": convex_buffer, "synset": synset,
        "release-buffer": RELEASE / "buffer.h5", "release-compact": RELEASE / "compact.h5",
        "release-streamed": RELEASE / "streamed.h5", "release-synset": RELEASE / "synset.h5",
    }


@pytest.fixture(scope="module")
def damaged(tmp_path_factory: pytest.TempPathFactory, artifacts: dict[str, Path]) -> Callable[[Damage, str], Path]:
    """Damaged copies, made once per (damage, base)."""
    root = tmp_path_factory.mktemp("damaged")
    made: dict[tuple[str, str], Path] = {}

    def get(d: Damage, base: str) -> Path:
        key = (d.name, base)
        if key not in made:
            p = root / f"{d.name}.{base}.h5"
            shutil.copyfile(artifacts[base], p)
            with h5py.File(p, "r+") as f:
                d.change(f)
            made[key] = p
        return made[key]

    return get


def resume_args(base: str, artifacts: dict[str, Path]) -> dict[str, Any]:
    """The buffer a synset base was distilled from and its synset's name (what --resume continues)."""
    release = base.startswith("release")
    return {"buffer": artifacts["release-compact" if release else "compact"],
            "synset": "mct-ipc2" if release else NAME}


@pytest.mark.parametrize("damage,base,cmd", cases(FULL))
def test_damaged_file_is_refused_with_one_line(damage: Damage, base: str, cmd: str, damaged, artifacts,
                                               data_dir: Path, tmp_path: Path) -> None:
    source = damaged(damage, base)
    f = tmp_path / source.name  # a private copy: a wrong write must not leak into other cases
    shutil.copyfile(source, f)
    before = digest(f)
    r = cli(*command(cmd, f, tmp_path, data_dir, **resume_args(base, artifacts)))
    one_line_refusal(r, f, damage.field)
    assert digest(f) == before, "the damaged file was changed"
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name != f.name)
    assert not leftovers, f"a refused command left files behind: {leftovers}"


@pytest.mark.parametrize("base", list(BASES))
def test_every_command_accepts_the_undamaged_file(base: str, artifacts, data_dir: Path, tmp_path: Path) -> None:
    """The control: without damage the same commands succeed (so a refusal above is the damage's)."""
    kind = BASES[base]
    for cmd in READERS[kind]:
        f = tmp_path / cmd / artifacts[base].name
        f.parent.mkdir()
        shutil.copyfile(artifacts[base], f)
        r = cli(*command(cmd, f, f.parent, data_dir, **resume_args(base, artifacts)))
        assert r.exit_code == 0, (cmd, r.output)


def test_the_matrix_is_large() -> None:
    """The issue asks for a matrix over every group and kind of damage: keep it that way, and
    let the CI sample run every (damage, command) pair."""
    groups = {d.name.split("-")[0] for d in DAMAGES}
    assert groups >= {"root", "dataset", "model", "experts", "convex", "synsets", "synset", "best", "checkpoint"}
    full, sample = cases(True), cases(False)
    assert len(full) >= 3000 and len(sample) >= 1000
    assert {(p.values[0].name, p.values[2]) for p in full} == {(p.values[0].name, p.values[2]) for p in sample}


# --------------------------------------------------------------------------- damaged bytes

FUZZ = int(os.environ.get("MCTOOL_FUZZ_CASES", "12"))


def test_damaged_bytes_give_one_line_or_a_valid_reading(tmp_path: Path) -> None:
    """Random byte ranges of release files zeroed or scrambled: each read either succeeds (the
    bytes were image values or padding) or is refused with one line — never an internal error,
    a traceback, another exit code, a crash or a hang (bench/faults.py --fuzz runs more)."""
    from tests.damage import fuzz

    tally = fuzz([RELEASE / n for n in ("buffer.h5", "synset.h5", "streamed.h5")], FUZZ, tmp_path, seed=12)
    assert not tally["bad"] and not tally["hung"], tally
    assert tally["refused"] > 0 and tally["read"] > 0, tally  # the damage was real, and sometimes harmless


def test_a_damaged_global_heap_is_refused_not_looped_on(tmp_path: Path) -> None:
    """HDF5 loops forever reading a string from a global heap collection whose free-space object
    has size 0 (the fuzz found it): the store walks collections first and refuses such a file.
    Run in a child process with a timeout, so a regression fails instead of hanging the suite."""
    import subprocess
    import sys

    data = bytearray((RELEASE / "synset.h5").read_bytes())
    at = data.find(b"GCOL")
    assert at >= 0 and data[at + 4] == 1
    end = at + int.from_bytes(data[at + 8:at + 16], "little")
    p = at + 16
    while int.from_bytes(data[p:p + 2], "little") != 0:  # to the free-space object (index 0)
        p += 16 + (int.from_bytes(data[p + 8:p + 16], "little") + 7) // 8 * 8
    assert p < end
    data[p + 8:p + 16] = bytes(8)
    f = tmp_path / "heap.h5"
    f.write_bytes(bytes(data))
    code = f"import sys\nfrom mctool.cli import main\nsys.argv = ['mctool', 'inspect', {str(f)!r}]\nmain()\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=Path(__file__).parent.parent)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "global heap" in lines[0] and str(f) in lines[0], r.stderr
