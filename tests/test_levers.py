"""The levers past MCT (issue 22): difficulty-aligned sampling windows and the EMA of the learnables.

Each is off by default (the run is then what it was before the lever existed), checked where
it is declared, a pure function of the iteration or of the applied updates (so resume is bit for
bit), and composes with every --grad mode, --method mtt, --discrete, micro-batching, --batch-syn
and periodic evaluation (the matrix at the end)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from mctool.distill import DistillConfig, Distiller
from mctool.distill.learnables import LEARNABLES, ema_update
from mctool.distill.loop import start_window
from tests.helpers import assert_one_line_error, cli

TINY = ["--ipc", "2", "--syn-steps", "3", "--expert-epochs", "1.5", "--max-start-epoch", "3", "--lr-img", "100",
        "--lr-lr", "1e-5", "--lr-init", "0.01", "--quiet", "--seed", "3"]
WINDOW = ["--min-start-epoch", "0.5", "--start-upper-init", "1", "--start-upper-iterations", "4"]
NAME = "mct-ipc2"


def distill(buffer: Path, out: Path, data_dir: Path, *extra: str, iterations: int = 4):
    return cli("distill", "--buffer", buffer, "-o", out, "--data-dir", data_dir, "--iterations", str(iterations),
               *TINY, *extra)


def synset(path: Path) -> dict[str, np.ndarray]:
    """Every dataset of the (only) synset, by its path under the synset's group."""
    out: dict[str, np.ndarray] = {}
    with h5py.File(path) as f:
        g = f["synsets"][sorted(f["synsets"])[0]]
        g.visititems(lambda k, v: out.__setitem__(k, v[()]) if isinstance(v, h5py.Dataset) else None)
        out["attrs:lr"] = np.array(g.attrs["lr"])
        out["attrs:alpha_velocity"] = np.array(g["checkpoint"].attrs["alpha_velocity"])
    return out


def same(a: dict[str, np.ndarray], b: dict[str, np.ndarray], skip: tuple[str, ...] = ()) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        if key not in skip:
            assert np.array_equal(a[key], b[key]), key


# --------------------------------------------------------------------------- declared checks


@pytest.mark.parametrize("values, key", [
    ({"min_start_epoch": -1.0}, "min_start_epoch"),
    ({"min_start_epoch": float("nan")}, "min_start_epoch"),
    ({"min_start_epoch": 3.0, "max_start_epoch": 3.0}, "min_start_epoch"),
    ({"start_upper_init": 4.0, "max_start_epoch": 3.0, "start_upper_iterations": 5}, "start_upper_init"),
    ({"start_upper_init": 1.0, "min_start_epoch": 1.0, "start_upper_iterations": 5}, "start_upper_init"),
    ({"start_upper_init": 1.0}, "start_upper_iterations"),
    ({"start_upper_iterations": 5}, "start_upper_iterations"),
    ({"ema": 1.0}, "ema"), ({"ema": -0.1}, "ema"), ({"ema": float("inf")}, "ema"),
])
def test_lever_settings_are_checked_where_declared(values: dict, key: str) -> None:
    found = DistillConfig(**values).problem()
    assert found is not None and found[0] == key, found


def test_defaults_and_good_values_pass() -> None:
    assert DistillConfig().problem() is None
    cfg = DistillConfig(min_start_epoch=1, start_upper_init=2, start_upper_iterations=10, max_start_epoch=3,
                        ema=0.99)
    assert cfg.problem() is None


def test_bad_lever_options_are_one_line(tmp_path: Path, convex_buffer: Path, data_dir: Path) -> None:
    out = tmp_path / "s.h5"
    assert_one_line_error(distill(convex_buffer, out, data_dir, "--min-start-epoch", "3"), 2,
                          "--min-start-epoch must be below --max-start-epoch (3)")
    assert_one_line_error(distill(convex_buffer, out, data_dir, "--start-upper-iterations", "5"), 2,
                          "--start-upper-iterations must be >= 1 with --start-upper-init")
    assert_one_line_error(distill(convex_buffer, out, data_dir, "--ema", "1"), 2, "--ema must be in [0, 1)")
    # The experts' K is 4: a window within --max-start-epoch 3 passes; --max-start-epoch past K is refused.
    assert_one_line_error(distill(convex_buffer, out, data_dir, *WINDOW, "--max-start-epoch", "4"), 2, "K = 4")
    assert not out.exists()


# --------------------------------------------------------------------------- sampling windows


def test_window_schedule_is_linear_then_flat() -> None:
    cfg = DistillConfig(min_start_epoch=0.5, start_upper_init=1.0, start_upper_iterations=4, max_start_epoch=3.0)
    assert [start_window(cfg, t) for t in (0, 1, 2, 4, 5, 1000)] == [
        (0.5, 1.0), (0.5, 1.5), (0.5, 2.0), (0.5, 3.0), (0.5, 3.0), (0.5, 3.0)]
    assert start_window(DistillConfig(max_start_epoch=3.0), 7) == (0.0, 3.0)


@pytest.mark.parametrize("kind", ["continuous", "discrete", "mtt"])
def test_sampled_starts_lie_in_the_window(tmp_path: Path, buffer: Path, convex_buffer: Path, data_dir: Path,
                                          monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    seen: list[tuple[int, float]] = []
    original = Distiller.sample_positions

    def spy(self: Distiller) -> tuple[float, float]:
        start, target = original(self)
        seen.append((self.state.iteration, start))
        return start, target

    monkeypatch.setattr(Distiller, "sample_positions", spy)
    extra = {"continuous": [], "discrete": ["--discrete"], "mtt": ["--method", "mtt", "--expert-epochs", "1"]}[kind]
    window = ["--min-start-epoch", "1", "--start-upper-init", "1.5", "--start-upper-iterations", "6"]
    r = distill(buffer if kind == "mtt" else convex_buffer, tmp_path / "s.h5", data_dir, *window, *extra,
                iterations=8)
    assert r.exit_code == 0, r.output
    assert [t for t, _ in seen] == list(range(8))
    cfg = DistillConfig(min_start_epoch=1, start_upper_init=1.5, start_upper_iterations=6, max_start_epoch=3)
    for t, start in seen:
        lo, hi = start_window(cfg, t)
        if kind == "continuous":
            assert lo <= start < hi, (t, start, hi)
        else:  # integers in [⌈lo⌉, max(⌈lo⌉ + 1, ⌊hi⌋))
            assert start == int(start) and 1 <= start < max(2, int(hi)), (t, start, hi)
    if kind == "continuous":
        assert any(s > 1.5 for t, s in seen if t >= 3)  # the window did grow


def test_windows_off_sample_as_before(tmp_path: Path, convex_buffer: Path, data_dir: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Off by default: the run equals one whose sampling is the code before the lever existed."""
    def before(self: Distiller) -> tuple[float, float]:  # mctool 0.x's sample_positions, verbatim
        cfg = self.cfg
        if cfg.discrete or cfg.method == "mtt":
            start = float(torch.randint(0, max(1, int(cfg.max_start_epoch)), (1,), generator=self.generator))
        else:
            start = float(torch.rand((), generator=self.generator, dtype=torch.float64)) * cfg.max_start_epoch
        return start, min(start + cfg.expert_epochs, float(self.source.K))

    for extra in ([], ["--discrete"]):
        new = tmp_path / f"new{len(extra)}.h5"
        assert distill(convex_buffer, new, data_dir, *extra).exit_code == 0
        with monkeypatch.context() as m:
            m.setattr(Distiller, "sample_positions", before)
            old = tmp_path / f"old{len(extra)}.h5"
            assert distill(convex_buffer, old, data_dir, *extra).exit_code == 0
        same(synset(new), synset(old))
        assert "checkpoint/images_raw" not in synset(new)


# --------------------------------------------------------------------------- EMA


def test_ema_update_rule_in_float64() -> None:
    avg, value = torch.tensor([1.0, -2.0], dtype=torch.float64), torch.tensor([3.0, 0.0], dtype=torch.float64)
    assert torch.allclose(ema_update(avg, value, 0.75), 0.75 * avg + 0.25 * value, rtol=0, atol=1e-15)
    assert ema_update(2.0, 4.0, 0.5) == 3.0


def test_every_opted_in_learnable_is_averaged() -> None:
    # The images opt in; α (a step size, not a picture) does not. A learnable opts in with its
    # ema_raw entry, which the store must declare.
    from mctool.store.synsets import CHECKPOINT_LEARNED

    opted = {e.name: e.ema_raw for e in LEARNABLES if e.ema_raw is not None}
    assert opted.get("images") == "images_raw" and "alpha" not in opted
    declared = {e.name for e in CHECKPOINT_LEARNED}
    assert set(opted.values()) <= declared


def test_ema_equals_an_independent_recomputation(tmp_path: Path, convex_buffer: Path, data_dir: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The stored images are the EMA (decay 0.6) of the raw images after each applied update,
    started at the initial images; the raw ones are in the checkpoint; the best images and the
    periodic evaluation see the average."""
    import mctool.evaluate.evaluation

    raw: list[torch.Tensor] = []
    original = Distiller.apply_update

    def spy(self: Distiller, grads):
        if not raw:
            raw.append(self.state.values["images"].clone())  # the initial images
        applied = original(self, grads)
        if applied:
            raw.append(self.state.values["images"].clone())
        return applied

    evaluated: list[torch.Tensor] = []
    evaluate_set = mctool.evaluate.evaluation.evaluate_set

    def eval_spy(images, *args, **kwargs):
        evaluated.append(images.clone())
        return evaluate_set(images, *args, **kwargs)

    monkeypatch.setattr(Distiller, "apply_update", spy)
    monkeypatch.setattr(mctool.evaluate.evaluation, "evaluate_set", eval_spy)
    out = tmp_path / "s.h5"
    r = distill(convex_buffer, out, data_dir, "--ema", "0.6", "--eval-every", "4", "--eval-runs", "1",
                "--eval-epochs", "1", "--select-on", "test", "--json", iterations=5)
    assert r.exit_code == 0, r.output
    assert len(raw) == 6  # the initial images and 5 applied updates

    def ema(upto: int) -> np.ndarray:
        avg = raw[0].double()
        for value in raw[1:upto + 1]:
            avg = 0.6 * avg + 0.4 * value.double()
        return avg.numpy()

    s = synset(out)
    np.testing.assert_allclose(s["images"], ema(5), rtol=0, atol=1e-5)
    assert np.array_equal(s["checkpoint/images_raw"], raw[-1].numpy())
    assert np.abs(s["images"] - s["checkpoint/images_raw"]).max() > 1e-3  # the average is not the raw value
    # Evaluated at iteration 0 (the starting images: the average's start), 4 (before the 5th
    # update) and at the end; the best kept is an average.
    assert len(evaluated) == 3
    for images, upto in zip(evaluated, (0, 4, 5)):
        np.testing.assert_allclose(images.numpy(), ema(upto), rtol=0, atol=1e-5)
    best_iteration = json.loads(r.stdout)["best"]["iteration"]
    np.testing.assert_allclose(s["best/images"], ema(best_iteration), rtol=0, atol=1e-5)
    with h5py.File(out) as f:
        assert json.loads(f["synsets"][NAME].attrs["config"])["ema"] == 0.6


def test_resume_without_the_raw_images_is_refused(tmp_path: Path, convex_buffer: Path, data_dir: Path) -> None:
    out = tmp_path / "s.h5"
    assert distill(convex_buffer, out, data_dir, "--ema", "0.9", iterations=2).exit_code == 0
    with h5py.File(out, "a") as f:
        del f[f"synsets/{NAME}/checkpoint/images_raw"]
    r = distill(convex_buffer, out, data_dir, "--ema", "0.9", "--resume", iterations=4)
    assert_one_line_error(r, 2, "lacks 'images_raw'")


def test_ema_cannot_change_on_resume(tmp_path: Path, convex_buffer: Path, data_dir: Path) -> None:
    out = tmp_path / "s.h5"
    assert distill(convex_buffer, out, data_dir, iterations=2).exit_code == 0
    assert_one_line_error(distill(convex_buffer, out, data_dir, "--ema", "0.9", "--resume", iterations=4), 2,
                          "cannot resume with different settings")


# --------------------------------------------------------------------------- composability


MATRIX = {
    # every --grad mode with both levers, mini-batches, micro-batches and periodic evaluation
    "constant": ["--grad", "constant", "--batch-syn", "8", "--micro-batch", "3"],
    "adjoint": ["--grad", "adjoint", "--batch-syn", "8", "--micro-batch", "3"],
    "unrolled": ["--grad", "unrolled", "--micro-batch", "7"],
    "discrete": ["--discrete", "--eval-every", "2", "--eval-runs", "1", "--eval-epochs", "1"],
    "mtt": ["--method", "mtt", "--expert-epochs", "1", "--batch-syn", "5"],
}


@pytest.mark.parametrize("case", sorted(MATRIX))
def test_levers_resume_bit_for_bit(tmp_path: Path, buffer: Path, convex_buffer: Path, data_dir: Path,
                                   case: str) -> None:
    """Windows and EMA on, with each --grad mode and the other options: stopping after 3
    iterations and resuming to 6 equals 6 uninterrupted iterations, in every stored array."""
    source = buffer if case == "mtt" else convex_buffer
    args = [*WINDOW, "--ema", "0.7", *MATRIX[case]]
    full, part = tmp_path / "full.h5", tmp_path / "part.h5"
    r = distill(source, full, data_dir, *args, iterations=6)
    assert r.exit_code == 0, r.output
    assert distill(source, part, data_dir, *args, iterations=3).exit_code == 0
    r = distill(source, part, data_dir, *args, "--resume", iterations=6)
    assert r.exit_code == 0, r.output
    a, b = synset(full), synset(part)
    same(a, b)
    assert "checkpoint/images_raw" in a and not np.array_equal(a["images"], a["checkpoint/images_raw"])
