"""`mctool distill` end to end on tiny experts: output, resume, robustness, options."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from mctool.distill import DistillConfig, Distiller, State
from tests.helpers import assert_one_line_error, cli

TINY = ["--ipc", "2", "--syn-steps", "3", "--expert-epochs", "1.5", "--max-start-epoch", "2", "--lr-img", "100",
        "--lr-lr", "1e-5", "--lr-init", "0.01", "--quiet"]


def run_distill(buffer: Path, out: Path, data_dir: Path, *extra: str, iterations: int = 4):
    return cli("distill", "--buffer", buffer, "-o", out, "--data-dir", data_dir, "--iterations", str(iterations),
               *TINY, *extra)


def read_synset(path: Path, name: str | None = None) -> tuple[np.ndarray, dict]:
    with h5py.File(path) as f:
        g = f["synsets"][name or sorted(f["synsets"])[0]]
        return g["images"][()], dict(g.attrs)


def test_distill_writes_synset_with_provenance(tmp_path: Path, convex_buffer: Path, data_dir: Path) -> None:
    out = tmp_path / "syn.h5"
    r = run_distill(convex_buffer, out, data_dir, "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["iterations"] == 4 and doc["synset"] == "mct-ipc2"
    assert Path(doc["png"]).exists()
    images, attrs = read_synset(out)
    assert images.shape == (20, 1, 28, 28)
    cfg = json.loads(attrs["config"])
    assert cfg["ipc"] == 2 and cfg["syn_steps"] == 3 and cfg["seed"] == 0
    assert json.loads(attrs["source"])["artifact_id"]
    assert attrs["lr"] > 0 and attrs["iterations"] == 4 and attrs["complete"]
    with h5py.File(out) as f:
        labels = f["synsets/mct-ipc2/labels"][()]
        assert labels.tolist() == [c for c in range(10) for _ in range(2)]
        assert "checkpoint" in f["synsets/mct-ipc2"]
    # Same name again without --resume is refused rather than overwritten.
    assert_one_line_error(run_distill(convex_buffer, out, data_dir), 2, "--resume")


def test_resume_equals_uninterrupted(tmp_path: Path, convex_buffer: Path, data_dir: Path) -> None:
    full, part = tmp_path / "full.h5", tmp_path / "part.h5"
    assert run_distill(convex_buffer, full, data_dir, iterations=6).exit_code == 0
    assert run_distill(convex_buffer, part, data_dir, iterations=3).exit_code == 0
    r = run_distill(convex_buffer, part, data_dir, "--resume", iterations=6)
    assert r.exit_code == 0, r.output
    a, attrs_a = read_synset(full)
    b, attrs_b = read_synset(part)
    assert np.array_equal(a, b)
    assert attrs_a["lr"] == attrs_b["lr"]


def test_a_learnable_is_one_entry(tmp_path: Path, convex_buffer: Path, data_dir: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A new learnable declared only in LEARNABLES (and its checkpoint entries in the store's
    table), with a gradient from the match: updated with momentum, checkpointed, and resumed
    bit for bit, with no other code changed."""
    from mctool.distill import learnables
    from mctool.store import synsets

    shift = learnables.Learnable("shift", lr="lr_lr", momentum="momentum_lr", bound=lambda cfg: 10.0, stored=None,
                                 velocity="shift_velocity", saved="shift", scalar=True, initial=lambda cfg: 1.0)
    monkeypatch.setattr(learnables, "LEARNABLES", (*learnables.LEARNABLES, shift))
    monkeypatch.setattr(synsets, "CHECKPOINT_LEARNED", (*synsets.CHECKPOINT_LEARNED,
                                                        synsets.Learned("shift", "scalar", required=False),
                                                        synsets.Learned("shift_velocity", "scalar", required=False)))
    original = Distiller.step

    def with_shift(self: Distiller):
        r = original(self)
        return dataclasses.replace(r, grads={**r.grads, "shift": torch.tensor(1e4 * self.state.values["shift"])})

    monkeypatch.setattr(Distiller, "step", with_shift)
    full, part = tmp_path / "full.h5", tmp_path / "part.h5"
    assert run_distill(convex_buffer, full, data_dir, iterations=4).exit_code == 0
    assert run_distill(convex_buffer, part, data_dir, iterations=2).exit_code == 0
    value, velocity = 1.0, 0.0  # SGD with momentum 0.5 at lr_lr 1e-5 on the gradient 1e4 · value
    for _ in range(2):
        velocity = velocity * 0.5 + 1e4 * value
        value = value - 1e-5 * velocity
    with h5py.File(part) as f:
        assert (f["synsets/mct-ipc2/checkpoint"].attrs["shift"], f["synsets/mct-ipc2/checkpoint"].attrs["shift_velocity"]) \
            == (value, velocity)
    r = run_distill(convex_buffer, part, data_dir, "--resume", iterations=4)
    assert r.exit_code == 0, r.output
    with h5py.File(full) as a, h5py.File(part) as b:
        for key in ("shift", "shift_velocity", "alpha_velocity"):
            assert a["synsets/mct-ipc2/checkpoint"].attrs[key] == b["synsets/mct-ipc2/checkpoint"].attrs[key]
        assert np.array_equal(a["synsets/mct-ipc2/images"][()], b["synsets/mct-ipc2/images"][()])


def test_interrupt_saves_checkpoint_and_resumes_exactly(tmp_path: Path, convex_buffer: Path, data_dir: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    full, part = tmp_path / "full.h5", tmp_path / "part.h5"
    assert run_distill(convex_buffer, full, data_dir, iterations=5).exit_code == 0
    original = Distiller.step
    calls = {"n": 0}

    def interrupted_step(self: Distiller):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(Distiller, "step", interrupted_step)
    r = run_distill(convex_buffer, part, data_dir, iterations=5)
    assert r.exit_code == 130
    assert "Traceback" not in r.output
    _, attrs = read_synset(part)
    assert attrs["iterations"] == 2 and not attrs["complete"]
    monkeypatch.setattr(Distiller, "step", original)
    assert run_distill(convex_buffer, part, data_dir, "--resume", iterations=5).exit_code == 0
    assert np.array_equal(read_synset(full)[0], read_synset(part)[0])


def test_non_finite_iterations_are_skipped_then_stop(tmp_path: Path, convex_buffer: Path, data_dir: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    original = Distiller.step
    calls = {"n": 0}

    def sometimes_nan(self: Distiller):
        calls["n"] += 1
        r = original(self)
        if calls["n"] == 2:
            return dataclasses.replace(r, loss=float("nan"))
        if calls["n"] == 3:
            return dataclasses.replace(r, grads={**r.grads, "images": r.grad_images * float("inf")})
        return r

    monkeypatch.setattr(Distiller, "step", sometimes_nan)
    out = tmp_path / "nan.h5"
    r = run_distill(convex_buffer, out, data_dir, iterations=10)
    assert r.exit_code == 0, r.output  # 2 of 10 skipped: not a divergence
    images, attrs = read_synset(out)
    assert attrs["skipped_iterations"] == 2
    assert np.isfinite(images).all()

    def always_nan(self: Distiller):
        return dataclasses.replace(original(self), loss=float("nan"))

    monkeypatch.setattr(Distiller, "step", always_nan)
    out2 = tmp_path / "nan2.h5"
    r = run_distill(convex_buffer, out2, data_dir, iterations=30)
    assert_one_line_error(r, 1, "diverged")
    images, attrs = read_synset(out2)  # the last good state was saved
    assert np.isfinite(images).all() and not attrs["complete"]


def test_alpha_is_kept_positive() -> None:
    cfg = DistillConfig(lr_lr=1.0, momentum_lr=0.5)
    d = Distiller.__new__(Distiller)
    d.cfg = cfg
    d.state = State(values={"images": torch.zeros(2), "alpha": 0.01},
                    velocities={"images": torch.zeros(2), "alpha": 0.0}, labels=torch.zeros(2), iteration=0,
                    generators=[], queues=[])
    d.apply_update({"images": torch.zeros(2), "alpha": 1e3})  # would make alpha hugely negative
    assert d.state.alpha == pytest.approx(0.005) and d.state.velocities["alpha"] == 0.0
    d.apply_update({"images": torch.zeros(2), "alpha": float("nan")})
    assert d.state.alpha == pytest.approx(0.0025)
    d.apply_update({"images": torch.zeros(2), "alpha": -0.001})  # a normal step increases it
    assert d.state.alpha == pytest.approx(0.0025 + 0.001)


@pytest.mark.parametrize("mode", ["adjoint", "unrolled"])
def test_gradient_modes_and_soft_labels(tmp_path: Path, convex_buffer: Path, data_dir: Path, mode: str) -> None:
    out = tmp_path / f"{mode}.h5"
    r = run_distill(convex_buffer, out, data_dir, "--grad", mode, "--soft-labels", iterations=2)
    assert r.exit_code == 0, r.output
    with h5py.File(out) as f:
        labels = f["synsets/mct-ipc2/labels"][()]
    assert labels.shape == (20, 10) and np.allclose(labels.sum(1), 1, atol=1e-5)
    r = cli("evaluate", out, "--runs", "1", "--epochs", "2", "--data-dir", data_dir, "--quiet", "--json")
    assert r.exit_code == 0, r.output
    assert 0 <= json.loads(r.stdout)["results"][0]["mean"] <= 1


def test_mtt_baseline_needs_trajectories(tmp_path: Path, buffer: Path, convex_buffer: Path, data_dir: Path) -> None:
    r = run_distill(buffer, tmp_path / "mtt.h5", data_dir, "--method", "mtt", "--expert-epochs", "1", iterations=2)
    assert r.exit_code == 0, r.output
    _, attrs = read_synset(tmp_path / "mtt.h5")
    assert attrs["method"] == "mtt"
    assert_one_line_error(run_distill(convex_buffer, tmp_path / "x.h5", data_dir, "--method", "mtt",
                                      "--expert-epochs", "1"), 2, "trajectories")


def test_bad_inputs(tmp_path: Path, convex_buffer: Path, buffer: Path, data_dir: Path) -> None:
    assert_one_line_error(cli("distill", "--preset", "cifar10-ipc1", "--buffer", convex_buffer, "-o", tmp_path / "o.h5",
                              "--data-dir", data_dir), 2, "cifar10")
    r = cli("distill", "--buffer", tmp_path / "none.h5")
    assert_one_line_error(r, 2, "none.h5: no such file (check the buffer's path)")
    assert "mctool experts" not in r.stderr  # a named buffer is more likely a mistyped path (tests/test_messages.py)
    assert_one_line_error(run_distill(buffer, tmp_path / "o.h5", data_dir), 2, "mctool convexify")
    r = run_distill(convex_buffer, tmp_path / "o.h5", data_dir, "--max-start-epoch", "4")
    assert_one_line_error(r, 2, "K = 4")
    assert "--max-start-epoch 3 or less" in r.stderr and "--epochs 5 or more" in r.stderr
    assert_one_line_error(cli("distill", "--preset", "cifar10-ipc100"), 2, "did you mean 'cifar10-ipc10'")
    assert_one_line_error(run_distill(convex_buffer, tmp_path / "o.h5", data_dir, "--grad", "magic"), 2, "--grad")
    for bad, message in ((["--lr-img", "nan"], "--lr-img must be a number > 0"),
                         (["--lr-img", "-100"], "--lr-img must be a number > 0"),
                         (["--init", "zeros"], "--init must be one of real, correct, noise"),
                         (["--name", "a/b"], "may not"), (["--name", ".."], "may not")):
        assert_one_line_error(run_distill(convex_buffer, tmp_path / "o.h5", data_dir, *bad), 2, message)
    assert not (tmp_path / "o.h5").exists()
    preset = tmp_path / "p.toml"
    preset.write_text((Path(__file__).parents[1] / "mctool/presets/fashion-mnist-ipc1.toml").read_text()
                      .replace("iterations = ", "iterations = -5 #"))
    r = cli("distill", "--preset", preset, "--buffer", convex_buffer, "-o", tmp_path / "o.h5", "--data-dir", data_dir)
    assert_one_line_error(r, 2, "p.toml: iterations must be >= 0, got -5")
    r = cli("distill", "--preset", preset, "--iterations", "-1", "--buffer", convex_buffer, "-o", tmp_path / "o.h5")
    assert_one_line_error(r, 2, "--iterations must be >= 0, got -1")


def test_evaluate_bad_inputs(tmp_path: Path, buffer: Path, convex_buffer: Path, data_dir: Path) -> None:
    assert_one_line_error(cli("evaluate", buffer, "--data-dir", data_dir), 2, "no synthetic sets")
    out = tmp_path / "s.h5"
    assert run_distill(convex_buffer, out, data_dir, iterations=1).exit_code == 0
    assert_one_line_error(cli("evaluate", out, "--models", "ConvNet,Nope", "--data-dir", data_dir), 2, "Nope")
    assert_one_line_error(cli("evaluate", out, "--baseline", "magic", "--data-dir", data_dir), 2, "baseline")


def test_evaluate_stores_results_and_baseline(tmp_path: Path, convex_buffer: Path, data_dir: Path) -> None:
    out = tmp_path / "s.h5"
    assert run_distill(convex_buffer, out, data_dir, iterations=1).exit_code == 0
    r = cli("evaluate", out, "--runs", "2", "--epochs", "3", "--baseline", "random", "--models", "ConvNet,MLP",
            "--data-dir", data_dir, "--quiet", "--json", "--seed", "3")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    kinds = [(x["kind"], x["model"]) for x in doc["results"]]
    assert kinds == [("synset", "ConvNet"), ("synset", "MLP"), ("random-real", "ConvNet"), ("random-real", "MLP")]
    assert doc["experts_reference"]["experts"] == 2
    for x in doc["results"]:
        assert len(x["accuracies"]) == 2 and x["std"] == pytest.approx(np.std(x["accuracies"]))
    r2 = cli("evaluate", out, "--runs", "2", "--epochs", "3", "--baseline", "random", "--models", "ConvNet,MLP",
             "--data-dir", data_dir, "--quiet", "--json", "--seed", "3", "--no-save")
    assert [x["accuracies"] for x in json.loads(r2.stdout)["results"]] == [x["accuracies"] for x in doc["results"]]
    _, attrs = read_synset(out)
    assert len(json.loads(attrs["evaluations"])) == 4
    assert "evaluation" in cli("inspect", out).stdout


def test_resume_after_evaluate(tmp_path: Path, convex_buffer: Path, data_dir: Path) -> None:
    out = tmp_path / "s.h5"
    assert run_distill(convex_buffer, out, data_dir, iterations=2).exit_code == 0
    assert cli("evaluate", out, "--runs", "1", "--epochs", "1", "--data-dir", data_dir, "--quiet").exit_code == 0
    r = run_distill(convex_buffer, out, data_dir, "--resume", iterations=3)
    assert r.exit_code == 0, r.output
    assert "at iteration 2" in r.stdout  # the stored evaluation says which images it measured


@pytest.mark.parametrize("value", ["false", 1, None])
def test_a_stored_switch_that_is_not_a_boolean_is_one_line(tmp_path: Path, convex_buffer: Path, data_dir: Path,
                                                           value: object) -> None:
    """The stored settings' on/off switches are JSON booleans: the text "false" (true to Python) would
    resume another run than the one started (expert soft labels, learned labels...)."""
    out = tmp_path / "s.h5"
    assert run_distill(convex_buffer, out, data_dir, iterations=2).exit_code == 0
    with h5py.File(out, "r+") as f:
        g = f["synsets"][sorted(f["synsets"])[0]]
        g.attrs["config"] = json.dumps({**json.loads(g.attrs["config"]), "soft_labels": value})
    before = out.read_bytes()
    r = run_distill(convex_buffer, out, data_dir, "--resume", iterations=3)
    assert_one_line_error(r, 2, "'soft_labels' must be true or false")
    assert str(out) in r.stderr and out.read_bytes() == before


def test_resume_with_nothing_left_says_so(tmp_path: Path, convex_buffer: Path, data_dir: Path) -> None:
    out = tmp_path / "s.h5"
    assert run_distill(convex_buffer, out, data_dir, iterations=2).exit_code == 0
    assert_one_line_error(run_distill(convex_buffer, out, data_dir, "--resume", iterations=2), 2,
                          "already at iteration 2")


def test_state_to_moves_every_tensor_field() -> None:
    # Resume broadcasts the checkpoint from the CPU and then moves it: a tensor field left
    # behind would mix devices on a GPU rank.
    state = State(values={"images": torch.zeros(2, 1, 2, 2), "alpha": 0.01},
                  velocities={"images": torch.zeros(2, 1, 2, 2), "alpha": 0.0}, labels=torch.tensor([0, 1]),
                  iteration=3, generators=[torch.Generator().get_state()], queues=[[0, 1]])
    moved = state.to(torch.device("meta"))

    def tensors(s: State) -> list[torch.Tensor]:  # every tensor field, and every tensor in a dict field
        out = []
        for f in dataclasses.fields(State):
            value = getattr(s, f.name)
            out += [v for v in (value.values() if isinstance(value, dict) else [value]) if isinstance(v, torch.Tensor)]
        return out

    assert len(tensors(moved)) == len(tensors(state)) == 3 and all(t.device.type == "meta" for t in tensors(moved))
    assert moved.alpha == 0.01 and moved.velocities["alpha"] == 0.0
    assert moved.generators[0].device.type == "cpu" and moved.iteration == 3 and moved.queues == [[0, 1]]


def test_interior_note_only_when_the_settings_expect_another_count(tmp_path: Path, convex_buffer: Path,
                                                                   data_dir: Path) -> None:
    args = [a for a in TINY if a != "--quiet"]
    base = ["distill", "--buffer", convex_buffer, "--data-dir", data_dir, "--iterations", "1", *args]
    r = cli(*base, "-o", tmp_path / "a.h5")  # no preset, no --interior: the buffer's count (1) is expected
    assert r.exit_code == 0 and "interior waypoint" not in r.stderr, r.stderr
    r = cli(*base, "-o", tmp_path / "b.h5", "--interior", "2")
    assert r.exit_code == 0 and "expect 2 interior waypoint(s)" in r.stderr and "has 1" in r.stderr


@pytest.mark.parametrize("select_on", ["validation", "test"])
def test_periodic_selection_sees_only_its_split(tmp_path: Path, convex_buffer: Path, data_dir: Path,
                                                monkeypatch: pytest.MonkeyPatch, select_on: str) -> None:
    """--eval-every scores on images held out of the training split and the distillation holds no test
    image, unless --select-on test (the authors' protocol), which every output then names."""
    import mctool.evaluate.evaluation
    from PIL import Image

    seen: list[tuple[int, int, str]] = []
    original = mctool.evaluate.evaluation.evaluate_set

    def spy(images, labels, lr, prepared, base, cfg, *args, score_on=None, split="test", **kwargs):
        seen.append((prepared.test_x.shape[0], score_on[0].shape[0], split))
        return original(images, labels, lr, prepared, base, cfg, *args, score_on=score_on, split=split, **kwargs)

    monkeypatch.setattr(mctool.evaluate.evaluation, "evaluate_set", spy)
    out = tmp_path / "s.h5"
    r = run_distill(convex_buffer, out, data_dir, "--eval-every", "2", "--eval-runs", "1", "--eval-epochs", "1",
                    "--select-on", select_on, "--val-size", "50", "--json")
    assert r.exit_code == 0, r.output
    # The tests' data: 30 training and 10 test images per class.
    expected = (0, 50, "validation") if select_on == "validation" else (100, 100, "test")
    assert seen == [expected] * 3  # iterations 0 (the starting images), 2 and 4
    doc = json.loads(r.stdout)
    assert doc["best"]["selected_on"] == select_on
    final, best = Image.open(doc["png"]), Image.open(doc["png_best"])
    assert best.width == final.width and best.height > final.height  # the best picture has its caption band
