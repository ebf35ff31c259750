"""Files written by mctool 0.1.0 (tests/data/release-0.1.0, made as its README says) keep
their meaning: they open, inspect, evaluate, resume and take more experts, and what the
current release computes from them is what 0.1.0 computed. The files' floats were computed on
the CPU that made them: what this machine recomputes is compared with them within ACROSS_MACHINES
(never bit for bit); bit-for-bit checks compare only results computed here in the same test.

Every test works on copies; the fixtures are never written. The tiny MNIST the files were
made on is rebuilt by the `data_dir` fixture (make_tiny_mnist, seed 0), so its fingerprint
matches theirs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from mctool import store
from mctool.convexify.runner import ConvexifyConfig, convexify_file
from mctool.experts import ExpertsConfig, model_spec, train_expert
from tests.helpers import cli

RELEASE = Path(__file__).parent / "data" / "release-0.1.0"
FILES = ("buffer", "compact", "streamed", "synset")
# The options the README's `mctool distill` line used (the resume must repeat them).
DISTILL = ["--ipc", "2", "--syn-steps", "3", "--expert-epochs", "1.5", "--max-start-epoch", "2", "--lr-img", "100",
           "--lr-lr", "1e-5", "--lr-init", "0.01", "--quiet", "--checkpoint-every", "1", "--device", "cpu"]
EXPERTS = ["--epochs", "4", "--width", "8", "--batch-size", "32", "--lr", "0.05", "--seed", "1", "--device", "cpu"]
SEEDS = [1835504127, 1189033389]  # the experts' seeds, as 0.1.0 recorded them
# Tolerances for floats this machine computes against floats the fixtures' machine computed (an
# Intel Xeon). Another CPU model rounds the last bits differently (vector widths, BLAS kernels):
# on an AMD EPYC, 2 iterations resumed from the stored checkpoint differ from a fresh run here by
# at most 1.6e-6 (images range over ±1.6). 1e-5 is ~6x that, while a real change is far outside:
# --lr-img 100.01 instead of 100 (1e-4 relative) moves the images by 2e-3, --lr-img 101 moves the
# learned lr by 1.4e-5 relative. test_resume_tolerance_tells_round_off_from_a_real_change checks
# both sides of this line.
ACROSS_MACHINES = {"images_atol": 1e-5, "rtol": 1e-5}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The files were made with one thread; CPU float round-off depends on the count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def release(tmp_path: Path) -> Path:
    """A folder with copies of the four 0.1.0 files."""
    for name in FILES:
        shutil.copyfile(RELEASE / f"{name}.h5", tmp_path / f"{name}.h5")
    return tmp_path


def ok(result):
    assert result.exit_code == 0, result.output
    return result


def stored_synset(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        g = f["synsets/mct-ipc2"]
        return {"images": g["images"][()], "loss": g["loss"][()], "lr": float(g.attrs["lr"]),
                "iterations": int(g.attrs["iterations"]), "evaluations": json.loads(g.attrs["evaluations"])}


def test_the_fixtures_are_what_the_readme_says() -> None:
    for name in FILES:
        with h5py.File(RELEASE / f"{name}.h5", "r") as f:
            assert f.attrs["mctool_version"] == "0.1.0" and f.attrs["format_version"] == 1, name


@pytest.mark.parametrize("name", FILES)
def test_inspect_text_and_json(release: Path, name: str) -> None:
    path = release / f"{name}.h5"
    text = ok(cli("inspect", path)).stdout
    assert "written by mctool 0.1.0" in text and "dataset mnist: 10 classes, 1x28x28, ZCA (eps 0.1)" in text
    doc = json.loads(ok(cli("inspect", path, "--json")).stdout)
    assert (doc["format"], doc["format_version"], doc["mctool_version"]) == ("mctool", 1, "0.1.0")
    assert doc["model"]["num_params"] == 2586 and doc["model"]["num_layers"] == 14
    if name == "synset":
        (syn,) = doc["synsets"]
        assert (syn["name"], syn["ipc"], syn["iterations"], syn["iterations_target"]) == ("mct-ipc2", 2, 3, 3)
        assert syn["has_checkpoint"] and syn["labels"] == "hard" and syn["image_grad_units"] == "exact"
        assert [(e["kind"], e["accuracies"]) for e in syn["evaluations"]] == [("synset", [0.09, 0.08]),
                                                                              ("random-real", [0.09, 0.08])]
        assert "3/3 iterations" in text and "(constant, exact step units)" in text
        assert "evaluation ConvNet: 8.5% ± 0.5% over 2 runs, 3 epochs of iteration 3" in text
        assert doc["experts"] is None and doc["convex"] is None
        return
    assert doc["experts"]["done"] == 2 and doc["experts"]["epochs"] == 4 and doc["experts"]["seeds"] == SEEDS
    assert doc["experts"]["has_trajectories"] == (name == "buffer")
    assert doc["convex"]["positions"] == [0, 2, 4] and doc["convex"]["experts"] == 2
    assert "experts 2/2 done, K = 4 epochs, lr 0.05, seed 1" in text
    assert "waypoints at [0, 2, 4] (I = 1), beta 'mct'" in text


def test_buffers_open_with_the_same_rows(release: Path) -> None:
    """The three buffers agree: compact and streamed hold /convex rows equal to the buffer's."""
    rows = {}
    for name in ("buffer", "compact", "streamed"):
        with store.open_buffer(release / f"{name}.h5") as buf:
            assert buf.done_experts().tolist() == [0, 1] and buf.convex_experts().tolist() == [0, 1]
            assert buf.convex.meta == store.ConvexMeta((0, 2, 4), "mct", False)
            rows[name] = [buf.convex_expert(e) for e in (0, 1)]
            ref = buf.reference()
            assert ref is not None and ref.experts == 2 and ref.epochs == 4
    for e in (0, 1):
        # Both stored by the fixtures' machine in one sitting: equal bit for bit.
        assert torch.equal(rows["buffer"][e][0], rows["compact"][e][0])
        torch.testing.assert_close(rows["streamed"][e][0], rows["buffer"][e][0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(rows["streamed"][e][1], rows["buffer"][e][1], rtol=1e-6, atol=1e-7)


def test_convexify_again_gives_the_stored_convex(release: Path) -> None:
    path = release / "buffer.h5"
    with store.open_buffer(path) as buf:
        before = [buf.convex_expert(e) for e in (0, 1)]
    convexify_file(path, ConvexifyConfig(interior=1))
    with store.open_buffer(path) as buf:
        for e in (0, 1):
            w, b = buf.convex_expert(e)
            # Recomputed here from the stored trajectories, compared with what the fixtures' CPU
            # computed: equal up to another CPU model's round-off (a few float32 ulps).
            torch.testing.assert_close(w, before[e][0], rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(b, before[e][1], rtol=1e-6, atol=1e-7)


def test_evaluate_reproduces_the_stored_evaluations_and_appends(release: Path, data_dir: Path) -> None:
    path = release / "synset.h5"
    old = stored_synset(path)["evaluations"]
    r = ok(cli("evaluate", path, "--data-dir", data_dir, "--runs", "2", "--epochs", "3", "--baseline", "random",
               "--baseline-draws", "one", "--quiet", "--json", "--device", "cpu"))
    doc = json.loads(r.stdout)
    # Same protocol (one draw of random real images, as 0.1.0 made), same seeds: 0.1.0's numbers
    # again. The networks are trained here, the stored accuracies on the fixtures' CPU: another CPU
    # model's round-off can flip a test image whose logits were within ~1e-6 of a tie, so each
    # accuracy may differ by up to 2 of the 100 images.
    assert [(x["kind"], x["seeds"]) for x in doc["results"]] == [(x["kind"], x["seeds"]) for x in old]
    for new, stored in zip(doc["results"], old):
        assert new["accuracies"] == pytest.approx(stored["accuracies"], abs=0.02 + 1e-9)
    assert [x["target"] for x in doc["results"]] == ["final", "final"]  # 0.1.0 kept no best images
    assert doc["experts_reference"]["experts"] == 2
    assert doc["scores"][0]["gain"] == pytest.approx(0.0)
    stored = stored_synset(path)["evaluations"]
    assert stored[:2] == old and len(stored) == 4


def resume_and_fresh(release: Path, data_dir: Path, fresh_options: tuple[str, ...] = ()) -> tuple[dict, dict, dict]:
    """Resume the stored 3-iteration synset to 5, and run the same 5 iterations afresh here (with
    0.1.0's step units and `fresh_options`): (the stored synset, the resumed one, the fresh one)."""
    before = stored_synset(release / "synset.h5")
    common = ["--buffer", release / "compact.h5", "--data-dir", data_dir, "--iterations", "5", *DISTILL]
    doc = json.loads(ok(cli("distill", *common, "-o", release / "synset.h5", "--resume", "--json")).stdout)
    assert doc["iterations"] == 5 and doc["synset"] == "mct-ipc2"
    assert doc["config"]["step_units"] == "exact"  # what 0.1.0 did, implied for its configs
    assert doc["evaluations"] == before["evaluations"]  # the stored 0.1.0 evaluations are still listed
    # 0.1.0 kept its final images and held no validation split out: --eval-share 0, as the resumed
    # run's stored config implies (runs without a preset now select on validation by default).
    ok(cli("distill", *common, "-o", release / "fresh.h5", "--step-units", "exact", "--eval-share", "0",
           *fresh_options))
    return before, stored_synset(release / "synset.h5"), stored_synset(release / "fresh.h5")


def assert_same_run_across_machines(resumed: dict, fresh: dict) -> None:
    """The resumed run is the fresh one, up to ACROSS_MACHINES: the resume starts from floats
    another CPU computed (see ACROSS_MACHINES for why no bit-for-bit check here)."""
    tol = ACROSS_MACHINES
    np.testing.assert_allclose(resumed["images"], fresh["images"], rtol=tol["rtol"], atol=tol["images_atol"])
    assert resumed["lr"] == pytest.approx(fresh["lr"], rel=tol["rtol"])
    np.testing.assert_allclose(resumed["loss"], fresh["loss"], rtol=tol["rtol"])


def test_distill_resume_continues_from_iteration_3(release: Path, data_dir: Path) -> None:
    before, after, fresh = resume_and_fresh(release, data_dir)
    assert after["iterations"] == 5 and len(after["loss"]) == 5
    np.testing.assert_array_equal(after["loss"][:3], before["loss"])  # kept as stored, not recomputed
    assert not np.array_equal(after["images"], before["images"])
    # Uninterrupted with today's code and 0.1.0's step units: the same images (up to another CPU's
    # round-off). If this fails after a deliberate change to distillation, old checkpoints no
    # longer resume the run they were part of: say so in the release notes.
    assert_same_run_across_machines(after, fresh)
    text = ok(cli("inspect", release / "synset.h5")).stdout
    assert "5/5 iterations" in text and "of iteration 3" in text


def _as_if_from_another_cpu(path: Path, relative: float) -> None:
    """Change every float of the stored synset and its checkpoint by ±`relative` (random signs):
    what another CPU's round-off would have left there (1e-6 is ~8 float32 ulps)."""
    rng = np.random.default_rng(0)
    with h5py.File(path, "r+") as f:
        g = f["synsets/mct-ipc2"]
        for ds in (g["images"], g["checkpoint/images_velocity"], g["loss"]):
            values = ds[()]
            ds[...] = values * (1 + relative * rng.choice([-1.0, 1.0], size=values.shape))
        g.attrs["lr"] = float(g.attrs["lr"]) * (1 + relative)


@pytest.mark.parametrize("change", ["round-off", "lr-img"])
def test_resume_tolerance_tells_round_off_from_a_real_change(release: Path, data_dir: Path, change: str) -> None:
    """ACROSS_MACHINES passes a checkpoint perturbed by 1e-6 (as if written by another CPU) and
    fails a real change of the run (the fresh run with --lr-img 100.01 instead of 100)."""
    if change == "round-off":
        _as_if_from_another_cpu(release / "synset.h5", 1e-6)
        _, after, fresh = resume_and_fresh(release, data_dir)
        assert not np.array_equal(after["images"], fresh["images"])  # the perturbation did reach them
        assert_same_run_across_machines(after, fresh)
    else:
        _, after, fresh = resume_and_fresh(release, data_dir, ("--lr-img", "100.01"))
        with pytest.raises(AssertionError):
            assert_same_run_across_machines(after, fresh)


def test_experts_appends_a_third_expert(release: Path, data_dir: Path) -> None:
    path = release / "buffer.h5"
    with h5py.File(path, "r") as f:
        old = {name: ds[()] for name, ds in f["experts"].items()}
        ident = f.attrs["artifact_id"]
    r = ok(cli("experts", "mnist", "--data-dir", data_dir, "--n", "3", *EXPERTS, "-o", path, "--json"))
    doc = json.loads(r.stdout)
    assert doc["already_done"] == 2 and [t["expert"] for t in doc["trained"]] == [2]
    assert "/convex does not cover the new experts" in r.stderr
    with h5py.File(path, "r") as f:
        assert f.attrs["artifact_id"] == ident
        assert f["experts/done"][()].tolist() == [True, True, True]
        for name, rows in old.items():
            np.testing.assert_array_equal(f["experts"][name][:2], rows, err_msg=name)
        third = f["experts/trajectories"][2]
    # The new row is the expert 2 today's code trains with the buffer's settings.
    from mctool.data.prepared import prepare

    cfg = ExpertsConfig(dataset="mnist", num_experts=3, epochs=4, width=8, batch_size=32, lr=0.05, seed=1)
    prepared = prepare("mnist", data_dir, zca=True, zca_eps=0.1, device=torch.device("cpu"))
    expected = train_expert(cfg, model_spec(cfg, prepared), prepared, 2)
    assert expected.trajectory is not None
    np.testing.assert_array_equal(third, expected.trajectory.numpy())
