"""The command modules alone: options -> config -> one library call -> table or JSON.

Each test replaces the library function a command calls with a fake that records its
arguments and returns a canned typed result, so what is checked here is the CLI's own work:
parsing, the settings-derived options, rendering, --json (keys as README/docs/format.md
promise) and exit codes. The library itself is tested in test_experts/convex/distill/evaluate/
store; one end-to-end run per command stays in those files (see the list in test_cli.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import mctool.configs.distill
import mctool.convexify.runner
import mctool.demo
import mctool.distill
import mctool.evaluate.evaluation
import mctool.experts
import mctool.store
from mctool.convexify.runner import ConvexifyConfig, ConvexifyResult
from mctool.demo import DemoConfig, DemoResult
from mctool.distill import DistillResult
from mctool.core.errors import Interrupted, MctoolError, TrainingDiverged, UsageError
from mctool.evaluate.evaluation import EvaluateConfig, EvaluateResult, Evaluation, Score
from mctool.experts import ExpertsConfig, ExpertsResult, TrainedExpert
from tests.helpers import assert_one_line_error, cli


class Fake:
    """Stands in for a library function: records each call, returns `result` (or raises it)."""

    def __init__(self, result: Any) -> None:
        self.result = result
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((args, kwargs))
        if isinstance(self.result, BaseException):
            raise self.result
        return self.result

    @property
    def args(self) -> tuple[Any, ...]:
        (args, _), = self.calls
        return args

    @property
    def kwargs(self) -> dict[str, Any]:
        (_, kwargs), = self.calls
        return kwargs


def patch(monkeypatch: pytest.MonkeyPatch, module: Any, name: str, result: Any) -> Fake:
    fake = Fake(result)
    monkeypatch.setattr(module, name, fake)
    return fake


def ok(result: Any) -> Any:
    assert result.exit_code == 0, result.output
    return result


# --------------------------------------------------------------------------- experts


EXPERTS = ExpertsResult(file="b.h5", trained=[TrainedExpert(expert=1, seed=11, seconds=2.5, test_accuracy_first=0.1,
                                                            test_accuracy_last=0.75)], already_done=1, experts=2)


def test_experts_options_become_the_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = patch(monkeypatch, mctool.experts, "run", EXPERTS)
    ok(cli("experts", "mnist", "--n", "3", "--epochs", "7", "--lr", "0.2", "--momentum", "0.5", "--no-zca",
           "--convexify", "--interior", "1", "--beta", "uniform", "--seed", "9", "-o", tmp_path / "b.h5",
           "--data-dir", tmp_path, "--device", "cpu", "--no-download", "--resume", "--quiet"))
    cfg, out, data_dir, device, download, resume, reporter = fake.args
    assert cfg == ExpertsConfig(dataset="mnist", num_experts=3, epochs=7, lr=0.2, momentum=0.5, zca=False,
                                convexify=True, interior=1, beta="uniform", seed=9)
    assert (out, data_dir, device, download, resume) == (tmp_path / "b.h5", tmp_path, "cpu", False, True)
    assert reporter.quiet


@pytest.mark.parametrize("flag", ["-n", "--n", "--num-experts"])
def test_experts_defaults_and_the_n_aliases(monkeypatch: pytest.MonkeyPatch, flag: str) -> None:
    fake = patch(monkeypatch, mctool.experts, "run", EXPERTS)
    ok(cli("experts", "cifar10", flag, "4"))
    cfg, out, data_dir, device, download, resume, _ = fake.args
    assert cfg == ExpertsConfig(dataset="cifar10", num_experts=4)
    assert (out, data_dir, device, download, resume) == (Path("buffer.h5"), None, "auto", True, False)


def test_experts_table_and_json(monkeypatch: pytest.MonkeyPatch) -> None:
    patch(monkeypatch, mctool.experts, "run", EXPERTS)
    r = ok(cli("experts", "mnist", "-o", "b.h5"))
    assert "b.h5: 2/2 experts done (1 done before this run, not listed)" in r.stdout
    assert "acc θ_K" in r.stdout and "0.75" in r.stdout and "2.5" in r.stdout
    doc = json.loads(ok(cli("experts", "mnist", "-o", "b.h5", "--json")).stdout)
    assert doc == {"file": "b.h5", "already_done": 1, "experts": 2, "trained": [
        {"expert": 1, "seed": 11, "seconds": 2.5, "test_accuracy_first": 0.1, "test_accuracy_last": 0.75}]}


def test_experts_nothing_to_do_and_other_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    patch(monkeypatch, mctool.experts, "run", ExpertsResult(file="b.h5", trained=[], already_done=3, experts=2))
    r = ok(cli("experts", "mnist", "-o", "b.h5"))
    assert "already holds 3 finished expert(s) — nothing to do" in r.stdout
    patch(monkeypatch, mctool.experts, "run", None)  # a torchrun rank other than 0
    assert ok(cli("experts", "mnist", "--json")).stdout == ""


# --------------------------------------------------------------------------- convexify


CONVEX = ConvexifyResult(file="b.h5", experts=2, positions=[0, 2, 4], strategy="uniform", smooth=True,
                         bytes_per_expert_full=300, bytes_per_expert_convex=200, ratio=1.5)


def test_convexify_options_table_and_json(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = patch(monkeypatch, mctool.convexify.runner, "convexify_file", CONVEX)
    r = ok(cli("convexify", "x.h5", "-o", "y.h5", "--interior", "3", "--beta", "uniform", "--smooth"))
    buffer, cfg, out, _ = fake.args
    assert (buffer, cfg, out) == (Path("x.h5"), ConvexifyConfig(interior=3, strategy="uniform", smooth=True),
                                  Path("y.h5"))
    for text in ("b.h5: /convex", "0,2,4", "uniform", "authors' code", "1.50x"):
        assert text in r.stdout, text
    doc = json.loads(ok(cli("convexify", "--json")).stdout)
    assert fake.calls[-1][0][:3] == (Path("buffer.h5"), ConvexifyConfig(), None)
    assert doc == {"file": "b.h5", "experts": 2, "positions": [0, 2, 4], "strategy": "uniform", "smooth": True,
                   "bytes_per_expert_full": 300, "bytes_per_expert_convex": 200, "ratio": 1.5}
    ok(cli("convexify", "--positions", "0,1,4"))
    assert fake.calls[-1][0][1] == ConvexifyConfig(positions="0,1,4")


# --------------------------------------------------------------------------- distill


def distill_result(**changes: Any) -> DistillResult:
    values: dict[str, Any] = dict(
        file="s.h5", synset="mct-ipc2", iterations=4, alpha=0.0123, loss_first=2.5, loss_last_mean=1.25,
        skipped_iterations=1, seconds=3.25, config={"ipc": 2}, png="s-mct-ipc2.png", notes=[],
        evaluations=[{"kind": "synset", "model": "ConvNet", "mean": 0.5, "iteration": 3, "split": "validation"},
                     {"kind": "random-real", "model": "ConvNet", "mean": 0.4, "std": 0.01, "runs": 3,
                      "split": "test"}],
        best={"iteration": 3, "lr": 0.02, "selected_on": "validation", "score": {"mean": 0.5}},
        png_best="s-mct-ipc2-best.png")
    values.update(changes)
    return DistillResult(**values)


def test_distill_options_become_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = patch(monkeypatch, mctool.distill, "run", distill_result())
    ok(cli("distill", "--lr-img", "5", "--init", "noise"))
    preset, overrides, buffer, out, name, resume, data_dir, device = fake.args
    assert preset is None and overrides == {"lr_img": 5.0, "pix_init": "noise"}
    assert (buffer, out, name, resume, data_dir, device) == (Path("buffer.h5"), Path("synset.h5"), None, False,
                                                             None, "auto")
    assert fake.kwargs["default_buffer"] is True
    patch(monkeypatch, mctool.configs.distill, "load_preset", None)  # the CLI checks the preset before importing torch
    ok(cli("distill", "--preset", "p.toml", "--buffer", "c.h5", "-o", "o.h5", "--name", "n", "--resume", "--ipc", "3",
           "--soft-labels", "--continuous", "--no-zca", "--checkpoint-minutes", "2.5", "--method", "mtt",
           "--grad", "adjoint", "--step-units", "exact", "--select-on", "test", "--seed", "7"))
    preset, overrides, buffer, out, name, resume, *_ = fake.calls[-1][0]
    assert (preset, buffer, out, name, resume) == ("p.toml", Path("c.h5"), Path("o.h5"), "n", True)
    assert overrides == {"ipc": 3, "soft_labels": True, "discrete": False, "zca": False, "checkpoint_minutes": 2.5,
                         "method": "mtt", "grad": "adjoint", "step_units": "exact", "select_on": "test", "seed": 7}
    assert fake.calls[-1][1]["default_buffer"] is False


def test_distill_table_and_json(monkeypatch: pytest.MonkeyPatch) -> None:
    patch(monkeypatch, mctool.distill, "run", distill_result())
    r = ok(cli("distill", "-o", "s.h5"))
    assert "s.h5: distilled" in r.stdout and "mct-ipc2" in r.stdout and "0.0123" in r.stdout
    assert "evaluation of the images at iteration 3: ConvNet 50.00 (n = 1) % on the validation split" in r.stdout
    # After a resume the stored evaluations include mctool evaluate's: said so, with their spread.
    assert ("evaluation of random real images (the baseline, by mctool evaluate): ConvNet 40.00 ± 1.00 % on the "
            "test split") in r.stdout and "iteration ?" not in r.stdout
    assert "best images: iteration 3 (50.00 (n = 1) % on the validation split); s-mct-ipc2-best.png" in r.stdout
    assert "selected on test" not in r.stdout and "images: s-mct-ipc2.png" in r.stdout
    doc = json.loads(ok(cli("distill", "--json")).stdout)
    assert set(doc) == {"file", "synset", "iterations", "alpha", "loss_first", "loss_last_mean", "skipped_iterations",
                        "evaluations", "seconds", "config", "png", "best", "png_best", "notes", "selection",
                        "start"}
    assert doc["best"]["selected_on"] == "validation" and doc["iterations"] == 4


def test_distill_says_when_best_images_were_chosen_on_test_and_nan_is_null(monkeypatch: pytest.MonkeyPatch) -> None:
    best = {"iteration": 2, "lr": 0.02, "selected_on": "test", "score": {"mean": 0.25}}
    patch(monkeypatch, mctool.distill, "run", distill_result(best=best, evaluations=[], loss_last_mean=float("nan")))
    assert "selected on test, as the authors do" in ok(cli("distill")).stdout
    doc = json.loads(ok(cli("distill", "--json")).stdout)
    assert doc["loss_last_mean"] is None
    patch(monkeypatch, mctool.distill, "run", None)  # a torchrun rank other than 0
    assert ok(cli("distill", "--json")).stdout == ""


def test_list_presets_calls_no_distillation(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = patch(monkeypatch, mctool.distill, "run", distill_result())
    r = ok(cli("distill", "--list-presets"))
    assert "cifar10-ipc10" in r.stdout and "(no preset)" in r.stdout and fake.calls == []


# --------------------------------------------------------------------------- evaluate


def evaluation(kind: str, accuracies: list[float], target: str = "final", iteration: int | None = 4) -> Evaluation:
    mean = sum(accuracies) / len(accuracies)
    std = (sum((a - mean) ** 2 for a in accuracies) / len(accuracies)) ** 0.5
    return Evaluation(kind=kind, model="ConvNet", accuracies=accuracies, mean=mean, std=std, runs=len(accuracies),
                      epochs=3, lr=0.01, seeds=[1] * len(accuracies), seed=0, images=20, date="2025-01-01",
                      seconds_per_run=1.5, config={}, target=target, iteration=iteration)


def evaluate_result(one_run: bool = False) -> EvaluateResult:
    final = evaluation("synset", [0.6] if one_run else [0.55, 0.65])
    best = evaluation("synset", [0.7, 0.7], "best", 3)
    base = evaluation("random-real", [0.4, 0.4], iteration=None)
    rows = [Score("final", "ConvNet", final.mean, final.std, final.runs, 0.4, final.mean - 0.4, None, 0.9,
                  0.9 - final.mean, None, random_real_std=0.0, random_real_runs=2),
            Score("best", "ConvNet", 0.7, 0.0, 2, 0.4, 0.3, 0.0, 0.9, 0.2, 0.0, random_real_std=0.0,
                  random_real_runs=2)]
    return EvaluateResult(file="s.h5", synset="mct-ipc2", ipc=2, lr=0.01, results=[final, best, base], scores=rows,
                          experts_reference={"mean": 0.9, "std": 0.01, "experts": 2, "epochs": 4},
                          whole_data_source="the experts' final test accuracy", selected_on="validation")


def test_evaluate_options_become_the_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = patch(monkeypatch, mctool.evaluate.evaluation, "evaluate_file", evaluate_result())
    ok(cli("evaluate", "x.h5", "--runs", "1", "--epochs", "3", "--models", "ConvNet, MLP", "--lr", "0.5", "--seed",
           "9", "--baseline", "random", "--images", "best", "--whole-data", "0.9", "--no-save", "--name", "n",
           "--data-dir", tmp_path, "--device", "cpu"))
    file, cfg, name, baseline, images, save, whole_data, data_dir, device, _ = fake.args
    assert cfg == EvaluateConfig(models=("ConvNet", "MLP"), runs=1, epochs=3, lr=0.5, seed=9)
    assert (file, name, baseline, images, save, whole_data, data_dir, device) == (
        Path("x.h5"), "n", "random", "best", False, 0.9, tmp_path, "cpu")
    ok(cli("evaluate"))
    file, cfg, name, baseline, images, save, whole_data, data_dir, device, _ = fake.calls[-1][0]
    assert cfg == EvaluateConfig()
    assert (file, name, baseline, images, save, whole_data, data_dir, device) == (
        Path("synset.h5"), None, None, "auto", True, None, None, "auto")


def test_evaluate_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    patch(monkeypatch, mctool.evaluate.evaluation, "evaluate_file", evaluate_result())
    r = ok(cli("evaluate", "s.h5"))
    for text in ("synset 'mct-ipc2' (ipc 2, lr 0.01)", "synset (final, iteration 4)", "synset (best, iteration 3)",
                 "60.00 ± 5.00", "55.00 65.00", "random-real", "experts (whole dataset)",
                 "whole data from the experts' final test accuracy", "best (selected on validation)", "+20.00",
                 "30.00"):
        assert text in r.stdout, text
    # Every mean with its spread: random real and the experts too (issue 23).
    assert "40.00 ± 0.00" in r.stdout and "90.00 ± 1.00" in r.stdout
    patch(monkeypatch, mctool.evaluate.evaluation, "evaluate_file", evaluate_result(one_run=True))
    r = ok(cli("evaluate", "s.h5"))
    assert "60.00 (n = 1)" in r.stdout and "60.00 ± " not in r.stdout


def test_evaluate_json(monkeypatch: pytest.MonkeyPatch) -> None:
    patch(monkeypatch, mctool.evaluate.evaluation, "evaluate_file", evaluate_result())
    doc = json.loads(ok(cli("evaluate", "s.h5", "--json")).stdout)
    assert set(doc) == {"file", "synset", "ipc", "lr", "results", "scores", "experts_reference", "whole_data_source",
                        "selected_on"}
    # Each result carries what docs/format.md lists for a stored evaluation.
    for key in ("kind", "model", "accuracies", "mean", "std", "runs", "epochs", "lr", "seeds", "seed", "images", "date",
                "seconds_per_run", "config", "split", "target", "iteration", "labels"):
        assert key in doc["results"][0], key
    assert set(doc["scores"][0]) == {"target", "model", "mean", "std", "runs", "random_real", "gain", "gain_std",
                                     "whole_data", "hlr", "hlr_std", "note", "labels", "baseline_labels",
                                     "random_real_std", "random_real_runs"}
    assert doc["scores"][1]["hlr"] == pytest.approx(0.2) and doc["results"][2]["iteration"] is None


# --------------------------------------------------------------------------- inspect


def summary() -> dict[str, Any]:
    """A summary as store.summarize returns it (keys as docs/format.md, "mctool inspect --json")."""
    return {
        "file": "s.h5", "size_bytes": 12345, "disk_bytes": 8192, "format": "mctool", "format_version": 1,
        "mctool_version": "0.1.0", "created": "2025-01-01T00:00:00+00:00", "artifact_id": "ab" * 16,
        "dataset": {"name": "mnist", "num_classes": 10, "channels": 1, "height": 28, "width": 28, "zca": True,
                    "zca_eps": 0.1, "mean": [0.1], "std": [0.3], "class_names": [], "train_fingerprint": "f"},
        "model": {"arch": "ConvNet", "depth": 3, "width": 8, "norm": "instancenorm", "act": "relu",
                  "pool": "avgpooling", "channels": 1, "num_classes": 10, "im_size": [28, 28], "num_params": 4242,
                  "num_layers": 8, "layers": []},
        "experts": {"rows": 3, "done": 2, "epochs": 4, "lr": 0.05, "batch_size": 32, "seed": 1, "seeds": [5, 6],
                    "has_trajectories": False, "test_accuracy_first": 0.1, "test_accuracy_last": 0.8,
                    "test_accuracy_mean_curve": [0.1, 0.5, 0.6, 0.7, 0.8],
                    "per_expert": [{"index": 0, "seed": 5, "test_accuracy_first": 0.1, "test_accuracy_last": 0.8}]},
        "convex": {"complete": True, "positions": [0, 2, 4], "interior": 1, "strategy": "mct", "smoothing": "none",
                   "experts": 2, "beta_min": 0.0, "beta_max": 2.0, "stored_bytes": 999},
        "synsets": [{"name": "[bold]x", "ipc": 2, "images_shape": [20, 1, 28, 28], "labels": "hard", "lr": 0.0123,
                     "method": "mct", "preset": "", "iterations": 3, "iterations_target": 5,
                     "evaluations": [{"kind": "synset", "model": "ConvNet", "accuracies": [0.5], "mean": 0.5,
                                      "std": 0.0, "epochs": 3, "iteration": 3},
                                     {"kind": "random-real", "model": "ConvNet", "accuracies": [0.3, 0.5],
                                      "mean": 0.4, "std": 0.1, "epochs": 3, "labels": "soft"}],
                     "has_checkpoint": True, "grad": "constant", "image_grad_units": "released",
                     "best": {"iteration": 3, "lr": 0.02, "selected_on": "test", "score": {"mean": float("nan")}}}],
        "storage": {"full_bytes_per_expert": 84840, "file_bytes_per_expert": 4096.0, "file_size_per_expert": 6172.5,
                    "convex_bytes_per_expert": 51000, "ratio": 1.66},
    }


def test_inspect_renders_the_summary(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = patch(monkeypatch, mctool.store, "summarize", summary())
    r = ok(cli("inspect", "s.h5"))
    assert fake.args == (Path("s.h5"),)
    for text in ("mctool format v1, written by mctool 0.1.0", "dataset mnist: 10 classes, 1x28x28, ZCA (eps 0.1)",
                 "P = 4,242 parameters", "experts 2/3 done, K = 4 epochs", "no full trajectories stored",
                 "10.0% -> 80.0%", "waypoints at [0, 2, 4] (I = 1)", "beta range [0, 2]", "ratio 1.66x",
                 "synset '[bold]x'", "3/5 iterations (checkpoint: resumable)", "selected on the TEST split",
                 "evaluation ConvNet: 50.0% (n = 1), 3 epochs of iteration 3",
                 "evaluation ConvNet: 40.0% ± 10.0% over 2 runs, 3 epochs, random real images (baseline), soft labels"):
        assert text in r.stdout, text
    assert "iteration 3, hard labels" not in r.stdout  # a record from before --labels says nothing of them
    one_epoch = summary()
    one_epoch["experts"]["epochs"] = 1
    patch(monkeypatch, mctool.store, "summarize", one_epoch)
    assert "K = 1 epoch," in ok(cli("inspect", "s.h5")).stdout  # not "1 epochs"
    patch(monkeypatch, mctool.store, "summarize", summary())
    r = ok(cli("inspect", "s.h5"))
    assert "learned" not in r.stdout.replace("learned lr", "") and "--ema" not in r.stdout  # a summary without them
    levers = summary()
    levers["synsets"][0].update(labels="soft", learned_labels=True, ema=0.999)
    patch(monkeypatch, mctool.store, "summarize", levers)
    r = ok(cli("inspect", "s.h5"))
    for text in ("soft labels (learned, --learn-labels)", "--ema 0.999 (what is stored is the moving average)"):
        assert text in r.stdout.replace("\n    ", " ").replace("\n", ""), text


def test_inspect_json_is_the_summary(monkeypatch: pytest.MonkeyPatch) -> None:
    patch(monkeypatch, mctool.store, "summarize", summary())
    doc = json.loads(ok(cli("inspect", "s.h5", "--json")).stdout)
    want = json.loads(json.dumps(summary()).replace("NaN", "null"))
    assert doc == want and doc["synsets"][0]["best"]["score"]["mean"] is None


# --------------------------------------------------------------------------- demo


def demo_result(distilled: list[float], baseline: list[float]) -> DemoResult:
    return DemoResult(out="d", config={}, preset="fashion-mnist-ipc10", ipc=10,
                      distilled=evaluation("synset", distilled), random_real=evaluation("random-real", baseline),
                      experts_accuracy=0.85, experts_reused=1,
                      storage={"full_bytes_per_expert": 2e6, "convex_bytes_per_expert": 1e6, "ratio": 2.0},
                      distill={}, seconds={"experts": 1.0, "convexify": 2.0, "distill": 3.0, "evaluate": 4.0},
                      png="d/synset.png", files={"buffer": "d/b.h5", "convex": "d/c.h5", "synset": "d/s.h5"})


def test_demo_options_and_table(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = patch(monkeypatch, mctool.demo, "run", demo_result([0.7], [0.5]))
    r = ok(cli("demo", "--fast", "--seed", "5", "--out", tmp_path, "--data-dir", tmp_path, "--device", "cpu"))
    assert fake.args[:4] == (DemoConfig.fast(5), tmp_path, tmp_path, "cpu")
    for text in ("70.00 (n = 1)", "50.00 (n = 1)", "85.00", "2.00 MB -> 1.00 MB", "2.00x smaller", "10 s",
                 "(1 expert(s) reused from an earlier run)", "The distilled set beats random real images"):
        assert text in r.stdout, text
    ok(cli("demo"))
    assert fake.calls[-1][0][:4] == (DemoConfig(seed=0), Path("mctool-demo"), None, "auto")
    patch(monkeypatch, mctool.demo, "run", demo_result([0.4, 0.5], [0.5, 0.5]))
    r = ok(cli("demo", "--fast"))
    assert "45.00 ± 5.00" in r.stdout and "does NOT beat" in r.stdout


def test_demo_json_and_bad_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = patch(monkeypatch, mctool.demo, "run", demo_result([0.7], [0.5]))
    doc = json.loads(ok(cli("demo", "--json")).stdout)
    assert set(doc) == {"out", "config", "preset", "ipc", "distilled", "random_real", "experts_accuracy",
                        "experts_reused", "storage", "distill", "seconds", "png", "files"}
    assert doc["distilled"]["accuracies"] == [0.7]
    assert_one_line_error(cli("demo", "--seed", "-1"), 2, "--seed must be in 0")
    assert len(fake.calls) == 1


# --------------------------------------------------------------------------- failures


def _raised_during(error: BaseException, context: BaseException) -> BaseException:
    """`error` as Python leaves it when raised while `context` was being handled."""
    error.__context__ = context
    return error


@pytest.mark.parametrize("error, code, line", [
    (UsageError("bad input"), 2, "mctool: error: bad input"),
    (TrainingDiverged("loss became nan"), 1, "mctool: error: loss became nan"),
    (MctoolError("disk full"), 1, "mctool: error: disk full"),
    (Interrupted("interrupted (SIGTERM); finished experts are kept", 15), 143,
     "mctool: error: interrupted (SIGTERM); finished experts are kept"),
    (RuntimeError("a bug"), 1, "mctool: error: internal error: RuntimeError: a bug (rerun with --debug"),
    (OSError(28, "No space left on device", "b.h5"), 1, "mctool: error: disk full while writing b.h5"),
    # HDF5 (h5py 3.16, HDF5 2.0) on a real full tmpfs: the errno only in the text, a temporary's name.
    (RuntimeError("Disable slist on flush dest failure failed (file write failed: time = Mon Dec  7 18:34:19 2026\n, "
                  "filename = '/mnt/x/.b.h5.7789.l.tmp', file descriptor = 4, errno = 28, error message = 'No space "
                  "left on device', buf = 0x55d2, total write size = 40, bytes this sub-write = 40, offset = 10506)"),
     1, "mctool: error: disk full while writing; free space and run the same command again"),
    # torch.save on a full disk: an "enforce fail" raised while Python's OSError(28) was being handled.
    (_raised_during(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"),
                    OSError(28, "No space left on device")),
     1, "mctool: error: disk full while writing; free space and run the same command again"),
], ids=["usage", "diverged", "runtime", "interrupted", "bug", "enospc", "enospc-hdf5", "enospc-torch"])
def test_library_failures_become_one_line_and_an_exit_code(monkeypatch: pytest.MonkeyPatch, error: BaseException,
                                                           code: int, line: str) -> None:
    patch(monkeypatch, mctool.experts, "run", error)
    r = cli("experts", "mnist")
    assert_one_line_error(r, code, line.removeprefix("mctool: error: "))
    with pytest.raises(type(error)):
        patch(monkeypatch, mctool.experts, "run", error)
        r = cli("experts", "mnist", "--debug")
        raise r.exception


def test_bad_option_values_never_reach_the_library(monkeypatch: pytest.MonkeyPatch) -> None:
    fakes = [patch(monkeypatch, mctool.experts, "run", EXPERTS), patch(monkeypatch, mctool.distill, "run", None),
             patch(monkeypatch, mctool.evaluate.evaluation, "evaluate_file", None)]
    for args in (["experts", "mnist", "--epochs", "many"], ["distill", "--ipc", "1.5"],
                 ["evaluate", "--runs", "x"], ["experts"]):
        r = cli(*args)
        assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert all(f.calls == [] for f in fakes)
