"""Importing MTT-family buffers: exact trajectories, checks that name the place, resume, compressed pairs."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from mctool import store
from mctool.convexify.runner import ConvexifyConfig, convexify_file
from mctool.core.errors import UsageError
from mctool.interop.buffers import (
    BufferLayoutError, StatedModel, describe_numbers, folder_hints, infer_convnet, scan_replay_folder,
)
from mctool.interop.importer import (
    ImportConfig, import_compressed, import_replay, plan_compressed, plan_replay, resolve_source,
)
from mctool.interop.torchfile import TorchFileError
from mctool.models import ModelSpec, build_model, param_layout
from mctool.data.prepared import prepare
from mctool.core.progress import Reporter
from mctool.convexify.trajectory import convexify
from tests.conftest import cli
from tests.interop_fixtures import (
    flat, make_experts, tiny_spec, write_authors_pair, write_replay_buffer,
)

TINY_DISTILL = ["--ipc", "1", "--syn-steps", "2", "--expert-epochs", "1", "--max-start-epoch", "2", "--lr-img", "100",
                "--lr-lr", "1e-5", "--lr-init", "0.01", "--iterations", "2", "--quiet"]


class Log(Reporter):
    """Collects log lines; optionally interrupts after `stop_after` imported experts."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.lines: list[str] = []
        self.updates = 0
        self.stop_after = stop_after

    def log(self, message: str) -> None:
        self.lines.append(message)

    def update(self, key: str, advance: int = 0, **fields) -> None:
        self.updates += advance
        if self.stop_after is not None and self.updates >= self.stop_after:
            raise KeyboardInterrupt


@pytest.fixture(scope="module")
def prepared_zca(data_dir: Path):
    return prepare("mnist", data_dir, True, 0.1, torch.device("cpu"))


@pytest.fixture(scope="module")
def prepared_plain(data_dir: Path):
    return prepare("mnist", data_dir, False, 0.1, torch.device("cpu"))


def trained_experts(buffer: Path) -> tuple[list, np.ndarray, ModelSpec]:
    """The experts of the `mctool experts` fixture buffer as tensor lists (the scripts' layout)."""
    with store.open_artifact(buffer) as f:
        spec, layout = store.read_model(buffer, f)
        traj = f["experts/trajectories"][()]
        acc = f["experts/test_accuracy"][()][:, -1]
    sizes = [int(np.prod(s)) for _, s in layout]
    experts = []
    for e in range(traj.shape[0]):
        snaps = []
        for k in range(traj.shape[1]):
            parts = torch.from_numpy(traj[e, k].copy()).split(sizes)
            snaps.append([p.reshape(s).clone() for p, (_, s) in zip(parts, layout)])
        experts.append(snaps)
    return experts, acc, spec


def run_import(folder: Path, out: Path, prepared, reporter: Reporter | None = None, **cfg_kw):
    cfg = ImportConfig(**{"dataset": "mnist", "zca": prepared.meta.zca, **cfg_kw})
    source = resolve_source(folder, cfg)
    plan = plan_replay(folder, cfg, source, prepared.meta)
    return import_replay(plan, out, cfg, prepared, reporter or Log())


def test_three_files_import_bit_for_bit_then_convexify_and_distill(tmp_path: Path, buffer: Path, data_dir: Path,
                                                                    prepared_zca) -> None:
    trained, trained_acc, spec = trained_experts(buffer)
    extra = make_experts(spec, 3, 4, seed=7)
    experts = trained + extra
    folder = tmp_path / "buffers"
    write_replay_buffer(folder, 0, experts[:2])
    write_replay_buffer(folder, 1, experts[2:4])
    write_replay_buffer(folder, 2, experts[4:])
    out = tmp_path / "imported.h5"
    log = Log()
    result = run_import(folder, out, prepared_zca, log)
    assert result.experts == 5 and result.imported == 5 and result.epochs == 4 and result.gaps == []
    with h5py.File(out) as f:
        traj = f["experts/trajectories"][()]
        assert traj.shape == (5, 5, sum(int(np.prod(s)) for _, s in param_layout(build_model(spec))))
        for e, expert in enumerate(experts):
            assert np.array_equal(traj[e], flat(expert).numpy()), e  # bit for bit
        acc = f["experts/test_accuracy"][()]
        # The same weights on the same test split with the same preprocessing: the accuracy
        # `mctool experts` measured, exactly — so the recorded preprocessing is the experts' own.
        assert np.array_equal(acc[:2, -1], trained_acc)
        assert np.isnan(acc[:, :-1]).all() and np.isnan(f["experts/train_loss"][()]).all()
        assert f["experts/done"][()].all() and (f["experts/seeds"][()] == -1).all()
        assert f["dataset"].attrs["train_fingerprint"] == prepared_zca.meta.train_fingerprint
        assert bool(f["dataset"].attrs["zca"])
        assert f["experts"].attrs["imported_from"] == "mtt-replay-buffer"
    with store.open_artifact(out) as f:
        got_spec, _ = store.read_model(out, f)
    assert got_spec == spec
    assert any("100.00%" in line or "final test accuracy" in line for line in log.lines)

    convexified = convexify_file(out, ConvexifyConfig(interior=1))
    assert convexified.experts == 5
    small = tmp_path / "small.h5"
    assert convexify_file(out, ConvexifyConfig(interior=1), small).ratio > 1
    syn = tmp_path / "syn.h5"
    r = cli("distill", "--buffer", small, "-o", syn, "--data-dir", data_dir, *TINY_DISTILL)
    assert r.exit_code == 0, r.output
    r = cli("distill", "--buffer", out, "-o", tmp_path / "mtt.h5", "--method", "mtt", "--data-dir", data_dir,
            *TINY_DISTILL)
    assert r.exit_code == 0, r.output


def test_gaps_are_imported_in_order_and_reported(tmp_path: Path, prepared_plain) -> None:
    experts = make_experts(tiny_spec(), 4, 3, seed=1)
    folder = tmp_path / "gappy"
    for number, chunk in ((0, experts[:1]), (2, experts[1:3]), (5, experts[3:])):
        write_replay_buffer(folder, number, chunk)
    log = Log()
    result = run_import(folder, tmp_path / "o.h5", prepared_plain, log, accuracy="none")
    assert result.gaps == [1, 3, 4] and result.experts == 4
    assert any("missing 1, 3-4" in line for line in log.lines)
    with h5py.File(tmp_path / "o.h5") as f:
        for e in range(4):
            assert np.array_equal(f["experts/trajectories"][e], flat(experts[e]).numpy())
    assert describe_numbers([7, 1, 2, 3, 9]) == "1-3, 7, 9"


def test_a_wrong_shape_names_file_expert_snapshot_and_tensor(tmp_path: Path, prepared_plain) -> None:
    experts = make_experts(tiny_spec(), 4, 4, seed=2)
    experts[3][3][4] = torch.zeros(8, 8, 5, 5)  # expert 1 of file 1, snapshot 3: a 5x5 kernel, not 3x3
    folder = tmp_path / "bad"
    write_replay_buffer(folder, 0, experts[:2])
    write_replay_buffer(folder, 1, experts[2:])
    with pytest.raises(BufferLayoutError) as err:
        run_import(folder, tmp_path / "o.h5", prepared_plain)
    msg = str(err.value)
    assert "\n" not in msg
    assert "replay_buffer_1.pt: expert 1, snapshot 3, tensor 4 (features.4.weight)" in msg
    assert "shape [8, 8, 5, 5], expected [8, 8, 3, 3]" in msg
    assert not (tmp_path / "o.h5").exists()  # refused before anything was written


def test_snapshots_aliasing_the_live_weights_are_refused(tmp_path: Path, prepared_plain) -> None:
    """buffer.py on a CPU saves K+1 references to the same tensors (method.md §4)."""
    params = [p.detach() for p in build_model(tiny_spec()).parameters()]
    folder = tmp_path / "cpu"
    write_replay_buffer(folder, 0, [[params for _ in range(5)]])
    with pytest.raises(BufferLayoutError) as err:
        run_import(folder, tmp_path / "o.h5", prepared_plain)
    assert "alias" in str(err.value) and "snapshot 1" in str(err.value)


def test_damaged_and_malicious_files_stop_with_one_line(tmp_path: Path, prepared_plain) -> None:
    experts = make_experts(tiny_spec(), 3, 2, seed=4)
    folder = tmp_path / "dmg"
    write_replay_buffer(folder, 0, experts[:2])
    bad = write_replay_buffer(folder, 1, experts[2:])
    good = bad.read_bytes()
    bad.write_bytes(good[: len(good) // 3])
    with pytest.raises(TorchFileError) as err:
        run_import(folder, tmp_path / "o.h5", prepared_plain)
    assert str(bad) in str(err.value) and "truncated" in str(err.value)

    sentinel = tmp_path / "ran"

    class RunsCode:
        def __reduce__(self):
            return (exec, (f"open({str(sentinel)!r}, 'w').close()",))

    torch.save([[[RunsCode()]]], bad)
    with pytest.raises(TorchFileError) as err:
        run_import(folder, tmp_path / "o.h5", prepared_plain)
    assert "refused" in str(err.value) and str(bad) in str(err.value)
    assert not sentinel.exists()


def test_interrupted_import_resumes_and_refuses_other_files(tmp_path: Path, prepared_plain) -> None:
    experts = make_experts(tiny_spec(), 5, 3, seed=5)
    folder = tmp_path / "res"
    write_replay_buffer(folder, 0, experts[:3])
    write_replay_buffer(folder, 1, experts[3:])
    out = tmp_path / "o.h5"
    with pytest.raises(KeyboardInterrupt):
        run_import(folder, out, prepared_plain, Log(stop_after=2), accuracy="none")
    with h5py.File(out) as f:
        assert f["experts/done"][()].tolist()[:3] == [True, True, False]
    log = Log()
    result = run_import(folder, out, prepared_plain, log, accuracy="none")
    assert result.already_done == 2 and result.imported == 3
    assert any("resuming" in line for line in log.lines)
    with h5py.File(out) as f:
        assert f["experts/done"][()].all()
        for e in range(5):
            assert np.array_equal(f["experts/trajectories"][e], flat(experts[e]).numpy())
    # Another set of files, or other settings, into the same output: refused.
    write_replay_buffer(folder, 2, experts[:1])
    with pytest.raises(UsageError, match="other files"):
        run_import(folder, out, prepared_plain, accuracy="none")
    (folder / "replay_buffer_2.pt").unlink()
    with pytest.raises(UsageError, match="other settings"):
        run_import(folder, out, prepared_plain, accuracy="none", norm="groupnorm")
    # An output that is not an import is never touched.
    other = tmp_path / "other.h5"
    other.write_bytes(b"not hdf5")
    with pytest.raises(UsageError, match="not an mctool buffer"):
        run_import(folder, other, prepared_plain)


def test_what_the_files_do_not_say_must_be_stated(tmp_path: Path) -> None:
    folder = tmp_path / "x"
    write_replay_buffer(folder, 0, make_experts(tiny_spec(), 1, 2))
    with pytest.raises(UsageError, match="--dataset"):
        resolve_source(folder, ImportConfig(zca=True))
    with pytest.raises(UsageError, match="--zca or --no-zca"):
        resolve_source(folder, ImportConfig(dataset="mnist"))
    with pytest.raises(UsageError, match="accuracy"):
        resolve_source(folder, ImportConfig(dataset="mnist", zca=False, accuracy="some"))
    # The scripts' folder naming fills in what it can.
    scripts = tmp_path / "buffers" / "CIFAR10_NO_ZCA" / "ConvNetD4"
    write_replay_buffer(scripts, 0, make_experts(tiny_spec(), 1, 2))
    src = resolve_source(scripts, ImportConfig())
    assert (src.dataset, src.zca, src.model) == ("cifar10", False, "ConvNetD4")
    assert folder_hints(tmp_path / "CIFAR100" / "ConvNet") .zca is True
    assert folder_hints(tmp_path / "Tiny" / "ConvNet").zca is None  # MTT never appends _NO_ZCA for Tiny
    assert folder_hints(tmp_path / "Tiny_NO_ZCA" / "ConvNet").zca is False
    assert folder_hints(tmp_path / "somewhere") == folder_hints(tmp_path / "else")
    assert folder_hints(tmp_path / "CIFAR10" / "ConvNet_run2") == folder_hints(tmp_path / "else")
    with pytest.raises(UsageError, match="pass that folder"):
        scan_replay_folder(tmp_path / "buffers")


@pytest.mark.parametrize("spec", [
    ModelSpec(depth=3, width=16, channels=3, num_classes=10, im_size=(32, 32)),
    ModelSpec(depth=4, width=8, channels=3, num_classes=200, im_size=(64, 64)),
    ModelSpec(depth=3, width=8, channels=3, num_classes=100, im_size=(64, 64)),  # MCT's Tiny: depth 3 on 64 px
    ModelSpec(depth=3, width=8, channels=1, num_classes=10, im_size=(28, 28)),
    ModelSpec(depth=2, width=8, norm="none", channels=3, num_classes=10, im_size=(32, 32)),
    ModelSpec(depth=2, width=8, norm="layernorm", channels=3, num_classes=10, im_size=(32, 32)),
    ModelSpec(depth=2, width=8, pool="none", channels=3, num_classes=10, im_size=(16, 16)),
])
def test_convnet_inferred_from_shapes(spec: ModelSpec) -> None:
    shapes = [s for _, s in param_layout(build_model(spec))]
    got, notes = infer_convnet(shapes, spec.channels, spec.im_size, spec.num_classes)
    assert got == spec
    assert bool(notes) == (spec.norm == "instancenorm")


def test_inference_refuses_what_does_not_fit() -> None:
    spec = ModelSpec(depth=3, width=8, channels=3, num_classes=10, im_size=(32, 32))
    shapes = [s for _, s in param_layout(build_model(spec))]
    with pytest.raises(BufferLayoutError, match="depth 3, not the depth 4"):
        infer_convnet(shapes, 3, (32, 32), 10, StatedModel(depth=4))
    with pytest.raises(BufferLayoutError, match="100 classes"):
        infer_convnet(shapes, 3, (32, 32), 100)
    with pytest.raises(BufferLayoutError, match="another image size"):
        infer_convnet(shapes, 3, (64, 64), 10)
    with pytest.raises(BufferLayoutError, match="input channels"):
        infer_convnet(shapes, 1, (32, 32), 10)
    with pytest.raises(BufferLayoutError, match="not layernorm"):
        infer_convnet(shapes, 3, (32, 32), 10, StatedModel(norm="layernorm"))
    with pytest.raises(UsageError, match="only the ConvNet family"):
        infer_convnet(shapes, 3, (32, 32), 10, StatedModel(model="ResNet18"))
    got, notes = infer_convnet(shapes, 3, (32, 32), 10, StatedModel(model="ConvNetBN"))
    assert got.norm == "batchnorm" and not notes


@pytest.mark.parametrize("ip,positions", [(3, [0, 2, 4]), (2, [0, 4]), (4, [0, 1, 2, 3, 4])])
def test_compressed_pairs_equal_mctools_own_convexify(tmp_path: Path, prepared_zca, data_dir: Path, ip: int,
                                                      positions: list[int]) -> None:
    spec = tiny_spec()
    experts = make_experts(spec, 3, 4, seed=11)
    folder = tmp_path / f"ip{ip}"
    write_authors_pair(folder, 0, experts[:2], ip)
    write_authors_pair(folder, 1, experts[2:], ip)
    cfg = ImportConfig(dataset="mnist", zca=True, accuracy="none")
    plan = plan_compressed(folder, cfg, resolve_source(folder, cfg), prepared_zca.meta)
    out = tmp_path / "c.h5"
    log = Log()
    result = import_compressed(plan, out, cfg, prepared_zca, log)
    assert result.positions == positions and result.smoothing == ("authors-code" if ip >= 3 else "none")
    if ip == 4:  # K = 4, ip 4: five waypoints, not four — the authors' reader would ignore the tail
        assert any("only the first 3 segment(s)" in line for line in log.lines)
    sizes = [int(np.prod(s)) for _, s in param_layout(build_model(spec))]
    with h5py.File(out) as f:
        meta = store.read_convex_meta(out, f)
        assert list(meta.positions) == positions and meta.smooth == (ip >= 3) and meta.strategy == "mct"
        assert "trajectories" not in f["experts"]
        for e, expert in enumerate(experts):
            waypoints, beta = convexify(flat(expert), sizes, positions, "mct", smooth=ip >= 3)
            stored = torch.from_numpy(f["convex/waypoints"][e])
            if all(b - a > 1 for a, b in zip(positions, positions[1:])):
                assert torch.equal(stored, waypoints)  # each smoothed point is one float32 mean: exact
            else:
                # Adjacent waypoints chain the smoothing: the authors round the first mean to float32
                # before the second, mctool keeps it in float64 — one float32 rounding apart.
                torch.testing.assert_close(stored, waypoints, rtol=1.2e-7, atol=1e-7)
                assert torch.equal(stored[0], waypoints[0])  # θ_0 is never smoothed
            # β: the authors store s in float32 and we add the segment index, mctool adds before
            # rounding: at most one float32 ulp of values below 4 apart.
            torch.testing.assert_close(torch.from_numpy(f["convex/beta"][e]), beta, rtol=0, atol=4.8e-7)
    r = cli("distill", "--buffer", out, "-o", tmp_path / "syn.h5", "--data-dir", data_dir, *TINY_DISTILL)
    assert r.exit_code == 0, r.output


def test_compressed_pairs_must_be_complete_and_one_kind(tmp_path: Path) -> None:
    experts = make_experts(tiny_spec(), 2, 4, seed=3)
    folder = tmp_path / "pairs"
    write_authors_pair(folder, 0, experts, 3)
    write_authors_pair(folder, 0, experts, 2)
    with pytest.raises(UsageError, match="several kinds"):
        plan_compressed(folder, ImportConfig(dataset="mnist", zca=True), resolve_source(
            folder, ImportConfig(dataset="mnist", zca=True)), None)  # type: ignore[arg-type]
    (folder / "step_buffer_ip3_0.pt").unlink()
    cfg = ImportConfig(dataset="mnist", zca=True, variant="ip3")
    with pytest.raises(UsageError, match="no partner step_buffer_ip3_0.pt"):
        plan_compressed(folder, cfg, resolve_source(folder, cfg), None)  # type: ignore[arg-type]


def test_import_reads_one_snapshot_at_a_time(tmp_path: Path, prepared_plain, monkeypatch) -> None:
    """Streaming: each step reads one snapshot's bytes from the file, never the whole file."""
    from mctool.interop import importer

    experts = make_experts(tiny_spec(width=16), 3, 4, seed=12)
    folder = tmp_path / "stream"
    path = write_replay_buffer(folder, 0, experts)
    per_step: list[int] = []
    real = importer.flat_snapshot

    def spy(tf, leaves, e, k, names=None):
        before = tf.bytes_read
        out = real(tf, leaves, e, k, names)
        per_step.append(tf.bytes_read - before)
        return out

    monkeypatch.setattr(importer, "flat_snapshot", spy)
    run_import(folder, tmp_path / "o.h5", prepared_plain, accuracy="none")
    snapshot_bytes = flat(experts[0]).shape[1] * 4
    assert len(per_step) == 3 * 5
    # One snapshot's tensors plus their zip member headers (14 members, < 256 bytes each).
    assert max(per_step) <= snapshot_bytes + 14 * 256 < path.stat().st_size / 10


@pytest.mark.parametrize("variant,strategy", [("uni", "uniform"), ("dec", "decreasing")])
def test_ablation_pairs_keep_the_authors_fractions(tmp_path: Path, prepared_plain, variant: str,
                                                   strategy: str) -> None:
    """method.md §5.4: uniform β(k) = k/K kept as stored; decreasing β(k) = Σ_{j≤k} (K+1−j)/S starts at
    β(0) = 0.4 (K = 3), so its first waypoint becomes the point the authors start from,
    lerp(θ_0, θ_K, 0.4), and β' = (β − 0.4) / 0.6 (tests/test_interop_compressed_variants.py checks
    θ̂ against the authors' reconstruction)."""
    experts = make_experts(tiny_spec(), 2, 3, seed=13)
    K, L = 3, len(experts[0][0])
    S = sum(range(1, K + 2))
    if variant == "uni":
        fractions = [k / K for k in range(K + 1)]
    else:
        fractions = [sum(K + 1 - j for j in range(k + 1)) / S for k in range(K + 1)]
    folder = tmp_path / variant
    folder.mkdir()
    torch.save([[e[0], e[K]] for e in experts], folder / f"waypoint_buffer_{variant}_0.pt")
    torch.save([[[torch.tensor(f, dtype=torch.float32)] * L for f in fractions] for _ in experts],
               folder / f"step_buffer_{variant}_0.pt")
    cfg = ImportConfig(dataset="mnist", zca=False, accuracy="none")
    plan = plan_compressed(folder, cfg, resolve_source(folder, cfg), prepared_plain.meta)
    import_compressed(plan, tmp_path / "a.h5", cfg, prepared_plain)
    first, last = flat(experts[1])[0], flat(experts[1])[K]
    with h5py.File(tmp_path / "a.h5") as f:
        meta = store.read_convex_meta(tmp_path / "a.h5", f)
        assert meta.strategy == strategy and not meta.smooth and list(meta.positions) == [0, K]
        beta = f["convex/beta"][1]
        waypoints = f["convex/waypoints"][1]
    if variant == "uni":
        assert np.array_equal(beta, np.tile(np.float32(fractions)[:, None], (1, L)))
        assert np.array_equal(waypoints, torch.stack([first, last]).numpy())
    else:
        b0 = float(np.float32(fractions[0]))
        want = [(float(np.float32(x)) - b0) / (1 - b0) for x in fractions]
        np.testing.assert_allclose(beta, np.tile(np.float64(want)[:, None], (1, L)), rtol=0, atol=1e-7)
        start = torch.lerp(first.double(), last.double(), b0).float()
        assert np.array_equal(waypoints, torch.stack([start, last]).numpy())
