"""The store's API, round trip by round trip, on tiny files made here (no training).

What a writer stores, the checked reader gives back unchanged; a write is all or nothing; a
second writer is refused; a file that is not a readable artifact is refused with one line.
(Damaged and hostile files have their own tests.)
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch

from mctool import store
from mctool.core.errors import ArtifactError, FileBusy
from mctool.models import ModelSpec, layer_sizes, layout_of
from mctool.convexify.trajectory import convexify

K = 3  # epochs of the tiny experts
DATA = store.DatasetMeta(name="tiny", num_classes=3, channels=1, height=8, width=8, zca=False, zca_eps=0.0,
                         mean=(0.5,), std=(0.25,), class_names=("a", "b", "c"), train_fingerprint="f00d",
                         flip=False)
SPEC = ModelSpec(depth=1, width=2, channels=1, num_classes=3, im_size=(8, 8))
LAYOUT = layout_of(SPEC)
SIZES = layer_sizes(LAYOUT)
P = sum(SIZES)
ATTRS = {"epochs": K, "lr": 0.05, "batch_size": 4, "seed": 7, "config": json.dumps({"epochs": K, "seed": 7})}


def rows_layout(trajectories: bool = True, waypoints: int | None = None) -> store.RowLayout:
    return store.RowLayout(epochs=K, num_params=P, num_layers=len(LAYOUT), trajectories=trajectories,
                           num_waypoints=waypoints)


def trajectory(e: int) -> torch.Tensor:
    """A made-up trajectory [K+1, P] for expert e (a random walk: every layer moves)."""
    g = torch.Generator().manual_seed(100 + e)
    return torch.randn(K + 1, P, generator=g).cumsum(0)


def accuracies(e: int) -> list[float]:
    return [0.1 + 0.2 * k + 0.01 * e for k in range(K + 1)]


def new_buffer(path: Path, rows: int, finished: tuple[int, ...] = ()) -> Path:
    store.create_buffer(path, DATA, SPEC, LAYOUT, rows, rows_layout(), ATTRS, None)
    if finished:
        with store.append(path) as f:
            for e in finished:
                store.ExpertRows(f).finish(e, 1000 + e, accuracies(e), [float("nan"), 2.0, 1.5, 1.0],
                                           trajectory(e))
    return path


def raw_rows(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {name: ds[()] for name, ds in f["experts"].items()}


def temporaries(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.tmp"))


# --------------------------------------------------------------------------- /dataset and /model


def test_dataset_and_model_round_trip(tmp_path: Path) -> None:
    p = tmp_path / "meta.h5"
    zca = store.DatasetMeta(name="zca-set", num_classes=3, channels=1, height=8, width=8, zca=True, zca_eps=0.1,
                            mean=(), std=(), class_names=(), train_fingerprint="beef")
    for meta in (DATA, zca):
        with store.create(p) as f:
            store.write_dataset(f, meta)
            store.write_model(f, SPEC, LAYOUT)
        with store.open_artifact(p) as f:
            assert store.read_dataset(p, f) == meta
            assert store.read_model(p, f, meta) == (SPEC, LAYOUT)
            assert f.attrs["format"] == store.FORMAT and f.attrs["format_version"] == store.FORMAT_VERSION
            assert len(f.attrs["artifact_id"]) == 32


def test_model_that_disagrees_with_the_dataset_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "meta.h5"
    other = ModelSpec(depth=1, width=2, channels=1, num_classes=4, im_size=(8, 8))
    with store.create(p) as f:
        store.write_dataset(f, DATA)
        store.write_model(f, other, layout_of(other))
    with store.open_artifact(p) as f, pytest.raises(ArtifactError, match="num_classes.*4 outputs but /dataset has 3"):
        store.read_model(p, f, DATA)


# --------------------------------------------------------------------------- expert rows


def test_rows_are_allocated_up_front_and_count_only_once_finished(tmp_path: Path) -> None:
    p = new_buffer(tmp_path / "b.h5", rows=3)
    with store.open_buffer(p) as buf:
        assert buf.data == DATA and buf.spec == SPEC and buf.num_params == P and buf.layer_sizes == SIZES
        info = buf.require_experts()
        assert info.rows == 3 and info.epochs == K and not info.done.any() and info.has_trajectories
        assert info.lr == 0.05 and info.batch_size == 4 and info.seed == 7 and info.config == {"epochs": K, "seed": 7}
        assert buf.convex_state == "absent" and buf.reference() is None
        with pytest.raises(ArtifactError, match="no finished experts yet"):
            buf.done_experts()
        assert store.rows_ready(buf.file, 3) and not store.rows_ready(buf.file, 4)

    # A row written without finish() (a crash between writing and the done flag) does not count.
    with store.append(p) as f:
        f["experts/trajectories"][0] = trajectory(0).numpy()
    with store.open_buffer(p) as buf:
        assert buf.require_experts().done_indices.tolist() == []

    with store.append(p) as f:
        store.ExpertRows(f).finish(2, 1002, accuracies(2), [float("nan"), 2.0, 1.5, 1.0], trajectory(2))
    with store.open_buffer(p) as buf:
        assert buf.done_experts().tolist() == [2]
        assert torch.equal(buf.trajectory(2), trajectory(2))
        assert torch.equal(buf.snapshot(2, 1), trajectory(2)[1])
        np.testing.assert_array_equal(buf.accuracy(), np.float32([accuracies(2)]).astype(np.float64))
        ref = buf.reference()
        assert ref is not None and ref.experts == 1 and ref.epochs == K
        assert ref.mean == pytest.approx(accuracies(2)[-1]) and ref.std == 0.0
        assert buf.require_experts().seeds[2] == 1002
        assert buf.source()["experts_done"] == 1


class _Recorder:
    """Stands in for the open file: records what a reader would see at each flush."""

    def __init__(self, f: h5py.File, e: int) -> None:
        self.f, self.e, self.seen = f, e, []

    def __getitem__(self, key: str):
        return self.f[key]

    def __contains__(self, key: str) -> bool:
        return key in self.f

    @property
    def attrs(self):
        return self.f.attrs

    def flush(self) -> None:
        self.f.flush()
        row_written = bool(np.array_equal(self.f["experts/trajectories"][self.e], trajectory(self.e).numpy()))
        self.seen.append((row_written, bool(self.f["experts/done"][self.e])))


def test_finish_flushes_the_row_before_setting_done(tmp_path: Path) -> None:
    p = new_buffer(tmp_path / "b.h5", rows=2)
    with store.append(p) as f:
        rec = _Recorder(f, 1)
        store.ExpertRows(rec).finish(1, 5, accuracies(1), [0.0] * (K + 1), trajectory(1))  # type: ignore[arg-type]
    # First flush: the whole row, not yet done; then the flag.
    assert rec.seen == [(True, False), (True, True)]


def test_streaming_rows_write_convex_and_mark_both_done(tmp_path: Path) -> None:
    p = tmp_path / "s.h5"
    positions = (0, 2, K)
    meta = store.ConvexMeta(positions, "mct", False)
    prov = store.provenance({"streaming": True, "positions": list(positions)}, 0)
    store.create_buffer(p, DATA, SPEC, LAYOUT, 2, rows_layout(False, len(positions)), ATTRS, (meta, prov))
    w, b = convexify(trajectory(0), SIZES, list(positions), "mct", False)
    with store.append(p) as f:
        store.ExpertRows(f).finish(0, 1000, accuracies(0), [0.0] * (K + 1), None, w, b)
    with store.open_buffer(p) as buf:
        assert buf.convex_state == "complete" and not buf.require_experts().has_trajectories
        assert buf.convex.meta == meta and buf.convex_experts().tolist() == [0]
        w2, b2 = buf.convex_expert(0)
        assert torch.equal(w2, w) and torch.equal(b2, b)
        with pytest.raises(ArtifactError, match="no full trajectories"):
            buf.trajectory(0)


def test_regrow_keeps_rows_bit_identical_and_the_identity(tmp_path: Path) -> None:
    p = new_buffer(tmp_path / "b.h5", rows=2, finished=(0, 1))
    with h5py.File(p, "r") as f:
        ident, experts_attrs = f.attrs["artifact_id"], dict(f["experts"].attrs)
    before = raw_rows(p)
    store.regrow(p, 5)
    after = raw_rows(p)
    for name, old in before.items():
        assert after[name].shape == (5, *old.shape[1:]), name
        np.testing.assert_array_equal(after[name][:2], old, err_msg=name)  # NaN == NaN: bit-identical rows
    assert not after["done"][2:].any()
    with h5py.File(p, "r") as f:
        assert f.attrs["artifact_id"] == ident
        assert {k: v for k, v in f["experts"].attrs.items()} == experts_attrs
        assert store.rows_ready(f, 5) and not store.rows_ready(f, 6)
    with store.open_buffer(p) as buf:
        assert buf.done_experts().tolist() == [0, 1] and torch.equal(buf.trajectory(1), trajectory(1))
    assert temporaries(tmp_path) == []


# --------------------------------------------------------------------------- /convex


def _beta_ok(positions: tuple[int, ...]) -> torch.Tensor:
    """A valid β [K+1, L]: i at waypoint i, linear between."""
    column = torch.tensor(np.interp(np.arange(K + 1), positions, np.arange(len(positions))), dtype=torch.float32)
    return column[:, None].repeat(1, len(LAYOUT))


def test_convex_create_rows_complete_and_read(tmp_path: Path) -> None:
    p = new_buffer(tmp_path / "b.h5", rows=3, finished=(0, 2))
    positions = (0, 1, K)
    meta = store.ConvexMeta(positions, "uniform", True)
    waypoints = {e: torch.randn(len(positions), P, generator=torch.Generator().manual_seed(e)) for e in (0, 2)}
    with store.rewrite(p) as f:
        g = store.create_convex(f, 3, meta, LAYOUT, store.provenance({"interior": 1}, None))
        store.write_convex_row(g, 0, waypoints[0], _beta_ok(positions))
        store.write_convex_row(g, 2, waypoints[2], _beta_ok(positions))
    with store.open_buffer(p) as buf:  # not marked complete: written rows do not count yet
        assert buf.convex_state == "incomplete"
        with pytest.raises(ArtifactError, match="incomplete"):
            buf.convex_experts()
    with store.rewrite(p) as f:
        store.complete(f["convex"])
    with store.open_buffer(p) as buf:
        assert buf.convex_state == "complete"
        assert buf.convex.meta == meta and meta.epochs == K
        assert buf.convex_experts().tolist() == [0, 2]
        for e in (0, 2):
            w, b = buf.convex_expert(e)
            assert torch.equal(w, waypoints[e]) and torch.equal(b, _beta_ok(positions))
        assert store.read_convex_meta(p, buf.file) == meta
        assert torch.equal(buf.trajectory(0), trajectory(0))  # /experts untouched


def test_beta_that_is_not_a_position_along_the_waypoints_is_refused(tmp_path: Path) -> None:
    p = new_buffer(tmp_path / "b.h5", rows=1, finished=(0,))
    positions = (0, 1, K)
    bad = _beta_ok(positions)
    bad[1, 0] = 0.5  # waypoint 1 must sit at β = 1
    with store.rewrite(p) as f:
        g = store.create_convex(f, 1, store.ConvexMeta(positions, "mct", False), LAYOUT, {})
        store.write_convex_row(g, 0, torch.zeros(len(positions), P), bad)
        store.complete(g)
    with store.open_buffer(p) as buf, pytest.raises(ArtifactError, match="row 0 is not a position"):
        buf.convex_expert(0)


# --------------------------------------------------------------------------- synsets


def synset(name: str, ipc: int = 2, best: bool = True, checkpoint: bool = True, soft: bool = False) -> store.Synset:
    g = torch.Generator().manual_seed(len(name))
    n = ipc * DATA.num_classes
    labels = (torch.softmax(torch.randn(n, DATA.num_classes, generator=g), 1) if soft
              else torch.arange(DATA.num_classes).repeat_interleave(ipc))
    syn = store.Synset(name=name, images=torch.randn(n, 1, 8, 8, generator=g), labels=labels, lr=0.0123, ipc=ipc,
                       method="mct", grad="adjoint", preset="p", iterations=3, complete=False, skipped=1,
                       config={"ipc": ipc, "iterations": 5}, evaluations=[{"kind": "synset", "mean": 0.5}],
                       experts_reference={"mean": 0.9, "std": 0.0, "experts": 2, "epochs": K},
                       loss=[3.0, 2.0, 1.5], source={"artifact_id": "abc"})
    if best:
        syn.best = store.BestImages(images=syn.images + 1, labels=labels.clone(), lr=0.02, iteration=2,
                                    selected_on="validation", score={"mean": 0.75, "runs": 1})
    if checkpoint:
        gens = [torch.Generator().manual_seed(s).get_state() for s in (1, 2)]
        syn.checkpoint = store.Checkpoint(learned={"images_velocity": torch.randn(n, 1, 8, 8, generator=g),
                                                   "alpha_velocity": -0.5}, generators=gens, queues=[[1, 0], []])
    return syn


def prov(syn: store.Synset, created: str | None = None) -> dict:
    """The provenance a writer passes with a synset: its config and source are stored from
    here (write_synset takes them from `prov`, not from the Synset)."""
    out = store.provenance(syn.config, 0, syn.source)
    if created is not None:
        out["created"] = created
    return out


def assert_same_synset(got: store.Synset, want: store.Synset) -> None:
    assert torch.equal(got.images, want.images) and torch.equal(got.labels, want.labels)
    assert got.labels.dtype == want.labels.dtype
    for key in ("name", "ipc", "method", "grad", "preset", "iterations", "complete", "skipped", "config",
                "evaluations", "experts_reference", "source"):
        assert getattr(got, key) == getattr(want, key), key
    assert got.lr == pytest.approx(want.lr, rel=0, abs=0) and got.loss == want.loss
    if want.best is None:
        assert got.best is None
    else:
        assert got.best is not None and torch.equal(got.best.images, want.best.images)
        assert torch.equal(got.best.labels, want.best.labels)
        assert (got.best.lr, got.best.iteration, got.best.selected_on, got.best.score) == \
               (want.best.lr, want.best.iteration, want.best.selected_on, want.best.score)


def test_an_optional_checkpoint_entry_is_read_when_present(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A learnable's checkpoint state declared in CHECKPOINT_LEARNED only: written, read back and
    checked (shape, finite) without other store code; absent (a run without it) is no error."""
    from mctool.store import synsets
    table = (*synsets.CHECKPOINT_LEARNED, synsets.Learned("labels_velocity", "labels", required=False))
    monkeypatch.setattr(synsets, "CHECKPOINT_LEARNED", table)
    p = tmp_path / "s.h5"
    with_it, without = synset("with"), synset("without")
    assert with_it.checkpoint is not None
    n = 2 * DATA.num_classes
    with_it.checkpoint.learned["labels_velocity"] = torch.full((n, DATA.num_classes), 0.25)
    store.save_synset(p, with_it, DATA, SPEC, LAYOUT, prov(with_it))
    store.save_synset(p, without, DATA, SPEC, LAYOUT, prov(without))
    with store.open_synsets(p) as sf:
        got = sf.read("with", checkpoint=True).checkpoint
        assert got is not None and torch.equal(got.learned["labels_velocity"], torch.full((n, DATA.num_classes), 0.25))
        other = sf.read("without", checkpoint=True).checkpoint
        assert other is not None and set(other.learned) == {"images_velocity", "alpha_velocity"}
    with h5py.File(p, "r+") as f:
        f["synsets/with/checkpoint/labels_velocity"][0, 0] = float("nan")
    with store.open_synsets(p) as sf, pytest.raises(ArtifactError, match="labels_velocity"):
        sf.read("with", checkpoint=True)


def test_synset_round_trip_with_best_and_checkpoint(tmp_path: Path) -> None:
    p = tmp_path / "s.h5"
    first, second = synset("one"), synset("two-soft", ipc=1, best=False, soft=True)
    store.save_synset(p, first, DATA, SPEC, LAYOUT, prov(first))
    with h5py.File(p, "r") as f:
        ident = f.attrs["artifact_id"]
    store.save_synset(p, second, DATA, SPEC, LAYOUT, prov(second))  # a rewrite: "one" is kept
    with store.open_synsets(p) as sf:
        assert sf.names == ["one", "two-soft"] and sf.data == DATA and (sf.spec, sf.layout) == (SPEC, LAYOUT)
        assert sf.file.attrs["artifact_id"] == ident
        got = sf.read("one", checkpoint=True)
        assert_same_synset(got, first)
        assert got.checkpoint is not None and first.checkpoint is not None
        assert torch.equal(got.checkpoint.images_velocity, first.checkpoint.images_velocity)
        assert got.checkpoint.alpha_velocity == -0.5 and got.checkpoint.queues == [[1, 0], []]
        assert [torch.equal(a, b) for a, b in zip(got.checkpoint.generators, first.checkpoint.generators)] == [True] * 2
        soft = sf.read("two-soft")
        assert_same_synset(soft, second)
        assert soft.soft_labels and soft.checkpoint is None
        shapes = sf.read("one", values=False)  # checked, not read
        assert shapes.images.numel() == 0 and shapes.best is not None and shapes.best.iteration == 2
        with pytest.raises(ArtifactError, match="no synset named 'three'"):
            sf.pick("three")
    replaced = synset("two-soft", best=False, checkpoint=False)
    store.save_synset(p, replaced, DATA, SPEC, LAYOUT, prov(replaced))
    with store.open_synsets(p) as sf:
        with pytest.raises(ArtifactError, match="has no checkpoint to resume from"):
            sf.read("two-soft", checkpoint=True)
    assert temporaries(tmp_path) == []


def test_pick_takes_the_only_or_the_latest_synset(tmp_path: Path) -> None:
    p = tmp_path / "s.h5"
    store.save_synset(p, synset("b", best=False, checkpoint=False), DATA, SPEC, LAYOUT,
                      prov(synset("b"), created="2024-01-02"))
    with store.open_synsets(p) as sf:
        assert sf.pick(None) == "b"
    store.save_synset(p, synset("a", best=False, checkpoint=False), DATA, SPEC, LAYOUT,
                      prov(synset("a"), created="2024-01-01"))
    store.save_synset(p, synset("c", best=False, checkpoint=False), DATA, SPEC, LAYOUT,
                      prov(synset("c"), created="2024-01-03"))
    with store.open_synsets(p) as sf:
        assert sf.pick(None) == "c"


def test_add_evaluations_appends(tmp_path: Path) -> None:
    p = tmp_path / "s.h5"
    store.save_synset(p, synset("one"), DATA, SPEC, LAYOUT, prov(synset("one")))
    store.add_evaluations(p, "one", [{"kind": "synset", "model": "ConvNet", "mean": 0.6}])
    store.add_evaluations(p, "one", [{"kind": "random-real", "model": "ConvNet", "mean": 0.4},
                                     {"kind": "random-real", "model": "MLP", "mean": 0.3}])
    with store.open_synsets(p) as sf:
        got = sf.read("one", checkpoint=True)
    assert [(e["kind"], e.get("model"), e["mean"]) for e in got.evaluations] == [
        ("synset", None, 0.5), ("synset", "ConvNet", 0.6), ("random-real", "ConvNet", 0.4), ("random-real", "MLP", 0.3)]
    assert_same_synset(dataclasses.replace(got, evaluations=synset("one").evaluations), synset("one"))
    assert got.checkpoint is not None and temporaries(tmp_path) == []


# --------------------------------------------------------------------------- atomic writes


def test_a_failed_rewrite_or_create_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    p = new_buffer(tmp_path / "b.h5", rows=2, finished=(0,))
    os.chmod(p, 0o640)
    before = p.read_bytes()
    with pytest.raises(RuntimeError, match="boom"):
        with store.rewrite(p) as f:
            del f["experts"]
            f.attrs["format_version"] = 99
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        with store.create(p) as f:
            f.attrs["x"] = 1
            raise RuntimeError("boom")
    with pytest.raises(KeyboardInterrupt):
        with store.create(tmp_path / "new.h5") as f:
            raise KeyboardInterrupt
    assert p.read_bytes() == before and not (tmp_path / "new.h5").exists()
    assert temporaries(tmp_path) == []
    with store.rewrite(p) as f:  # a successful rewrite keeps the mode
        f["experts"].attrs["note"] = "changed"
    assert p.stat().st_mode & 0o777 == 0o640 and temporaries(tmp_path) == []
    with h5py.File(p, "r") as f:
        assert f["experts"].attrs["note"] == "changed"


def _hold_write(path: str, writing: Any, release: Any) -> None:
    """In another process: rewrite `path`, and wait inside the write until told to finish."""
    with store.rewrite(path) as f:
        f["experts"].attrs["held"] = True
        writing.set()
        release.wait(60)


def test_a_second_writer_is_refused_while_readers_go_on(tmp_path: Path) -> None:
    p = new_buffer(tmp_path / "b.h5", rows=2, finished=(0,))
    # fork: the child has mctool imported already (a fresh interpreter would spend seconds on it)
    ctx = multiprocessing.get_context("fork")
    writing, release = ctx.Event(), ctx.Event()
    child = ctx.Process(target=_hold_write, args=(str(p), writing, release))
    child.start()
    try:
        assert writing.wait(60), "the other writer never started"
        with pytest.raises(FileBusy, match="in use by another process"):
            with store.rewrite(p):
                pass
        with pytest.raises(FileBusy, match="in use by another process"):
            with store.append(p):
                pass
        with store.open_buffer(p) as buf:  # a reader sees the old file meanwhile
            assert buf.done_experts().tolist() == [0] and "held" not in buf.file["experts"].attrs
        release.set()
        child.join(60)
        assert child.exitcode == 0
    finally:
        if child.is_alive():
            child.kill()
            child.join()
    with store.rewrite(p) as f:  # free again; the other writer's change is in place
        assert f["experts"].attrs["held"]
    assert temporaries(tmp_path) == []


# --------------------------------------------------------------------------- opening


def test_open_refuses_what_is_not_a_readable_artifact(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="missing.h5: no such file"):
        with store.open_artifact(tmp_path / "missing.h5"):
            pass
    with pytest.raises(ArtifactError, match="is a directory"):
        with store.open_artifact(tmp_path):
            pass
    text = tmp_path / "notes.h5"
    text.write_text("hello")
    with pytest.raises(ArtifactError, match="notes.h5: not an HDF5 file"):
        with store.open_artifact(text):
            pass
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["x"] = [1, 2, 3]
    with pytest.raises(ArtifactError, match="not an mctool artifact"):
        with store.open_buffer(plain):
            pass
    newer = new_buffer(tmp_path / "newer.h5", rows=1)
    with h5py.File(newer, "r+") as f:
        f.attrs["format_version"] = store.FORMAT_VERSION + 1
    with pytest.raises(ArtifactError, match=f"format_version {store.FORMAT_VERSION + 1} is newer.*upgrade mctool"):
        with store.open_synsets(newer):
            pass


def test_a_missing_group_names_the_command_that_makes_it(tmp_path: Path) -> None:
    meta_only = tmp_path / "meta.h5"
    with store.create(meta_only) as f:
        store.write_dataset(f, DATA)
    with pytest.raises(ArtifactError, match=r"no /experts group — run `mctool experts DATASET` first"):
        with store.open_buffer(meta_only):
            pass
    with store.open_artifact(meta_only) as f, pytest.raises(ArtifactError, match="no /model group — run `mctool experts"):
        store.read_model(meta_only, f)
    buf = new_buffer(tmp_path / "b.h5", rows=1, finished=(0,))
    with store.open_buffer(buf) as b, pytest.raises(ArtifactError, match="no /convex group — run `mctool convexify"):
        b.convex_experts()
    with store.open_synsets(buf) as sf, pytest.raises(ArtifactError, match="a buffer of experts.*mctool distill --buffer"):
        sf.pick(None)
    syn = tmp_path / "s.h5"
    store.save_synset(syn, synset("one"), DATA, SPEC, LAYOUT, prov(synset("one")))
    with pytest.raises(ArtifactError, match="a synset file"):
        with store.open_buffer(syn):
            pass


def test_summarize_reads_what_the_writers_stored(tmp_path: Path) -> None:
    p = new_buffer(tmp_path / "b.h5", rows=3, finished=(1,))
    s = store.summarize(p)
    assert s["format"] == "mctool" and s["format_version"] == store.FORMAT_VERSION
    assert s["experts"]["rows"] == 3 and s["experts"]["done"] == 1 and s["experts"]["seeds"] == [1001]
    assert s["experts"]["test_accuracy_last"] == pytest.approx(accuracies(1)[-1])
    assert s["model"]["num_params"] == P and s["dataset"]["name"] == "tiny" and s["convex"] is None
    assert s["storage"]["full_bytes_per_expert"] == (K + 1) * P * 4 and s["synsets"] == []


def test_summarize_names_the_step_units_a_synset_was_made_with(tmp_path: Path) -> None:
    p = tmp_path / "s.h5"
    released = dataclasses.replace(synset("new", best=False), config={"ipc": 2, "step_units": "released"})
    store.save_synset(p, released, DATA, SPEC, LAYOUT, prov(released))
    old = synset("old", best=False)  # configs written before step_units existed: 0.1.0's exact units
    store.save_synset(p, old, DATA, SPEC, LAYOUT, prov(old))
    units = {s["name"]: s["image_grad_units"] for s in store.summarize(p)["synsets"]}
    assert units == {"new": "released", "old": "exact"}


def test_summarize_says_whether_labels_were_learned_and_images_averaged(tmp_path: Path) -> None:
    p = tmp_path / "s.h5"
    levers = dataclasses.replace(synset("levers", best=False), config={"ipc": 2, "learn_labels": True, "ema": 0.99})
    store.save_synset(p, levers, DATA, SPEC, LAYOUT, prov(levers))
    odd = dataclasses.replace(synset("odd", best=False), config={"ipc": 2, "learn_labels": "yes", "ema": float("nan")})
    store.save_synset(p, odd, DATA, SPEC, LAYOUT, prov(odd))
    old = synset("old", best=False)  # configs written before the levers existed: off
    store.save_synset(p, old, DATA, SPEC, LAYOUT, prov(old))
    seen = {s["name"]: (s["learned_labels"], s["ema"]) for s in store.summarize(p)["synsets"]}
    assert seen == {"levers": (True, 0.99), "odd": (False, 0.0), "old": (False, 0.0)}
