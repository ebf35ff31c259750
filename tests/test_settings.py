"""Each setting's check is declared with it (mctool/core/settings.py): validation iterates over the
settings, NaN fails every numeric check, and the messages are the one-liners they were."""

from __future__ import annotations

import dataclasses
import math

import pytest

from mctool.configs.convexify import ConvexifyConfig
from mctool.configs.evaluate import EvaluateConfig
from mctool.configs.experts import ExpertsConfig
from mctool.distill import DistillConfig
from mctool.distill.tune import TuneConfig
from mctool.core.errors import UsageError
from mctool.interop.importer import ImportConfig
from mctool.core.settings import above, at_least, between, first_problem, one_of, settings

# The requirement every checked DistillConfig setting states (what `problem()` said before the
# checks moved into the declarations).
DISTILL_WORDS = {
    "ipc": ">= 1", "syn_steps": ">= 1", "expert_epochs": "> 0", "max_start_epoch": ">= 0", "lr_img": "a number > 0",
    "lr_lr": "a number >= 0", "lr_init": "a number > 0 (the initial step size)", "momentum_img": "in [0, 1)",
    "momentum_lr": "in [0, 1)", "iterations": ">= 0", "batch_syn": ">= 0 (0 = all images)", "interior": ">= 0",
    "depth": ">= 0 (0 = any)", "checkpoint_every": ">= 1", "checkpoint_minutes": ">= 0 (0 = off)",
    "eval_every": ">= 0 (0 = never)", "eval_share": "in [0, 1) (0 = off)", "eval_runs": ">= 1", "eval_epochs": ">= 1", "val_size": ">= 0 (0 = automatic)",
    "seed": "in 0 … 2**63-1", "method": "mct or mtt", "grad": "one of constant, adjoint, unrolled",
    "step_units": "released or exact", "pix_init": "one of real, correct, noise", "micro_batch": "auto or a whole number >= 0",
    "second_order": "one of auto, fastgrad, autograd", "select_on": "validation or test",
    "min_start_epoch": ">= 0", "start_upper_init": ">= 0 (0 = off)", "start_upper_iterations": ">= 0",
    "ema": "in [0, 1) (0 = off)", "lr_backoff": "in [0, 1) (0 = off)", "select_margin": "in [0, 10]", "init_draws": "in 1 … 64", "lr_label": "a number >= 0", "momentum_label": "in [0, 1)",
    "augment": "a DSA strategy"}
NUMERIC = [k for k in DISTILL_WORDS if isinstance(getattr(DistillConfig(), k), (int, float))]


def test_every_checked_setting_declares_its_check() -> None:
    assert len(NUMERIC) == 30
    checked = {s.name for s in settings(DistillConfig) if s.info.check is not None}
    assert checked == set(DISTILL_WORDS)
    assert DistillConfig().problem() is None


@pytest.mark.parametrize("key", NUMERIC)
def test_nan_fails_every_numeric_check(key: str) -> None:
    cfg = dataclasses.replace(DistillConfig(), **{key: math.nan})
    assert cfg.problem() == (key, f"must be {DISTILL_WORDS[key]}, got nan")
    with pytest.raises(UsageError) as e:
        cfg.validate()
    option = "--" + key.replace("_", "-")
    assert str(e.value) == f"{option} must be {DISTILL_WORDS[key]}, got nan"


@pytest.mark.parametrize("key,bad", [("ipc", 0), ("lr_img", -1.0), ("momentum_img", 1.0), ("seed", 2**63),
                                     ("seed", -1), ("method", "x"), ("grad", "exact"), ("micro_batch", "-1"),
                                     ("second_order", "x"), ("select_on", "train"), ("pix_init", "zeros")])
def test_a_bad_value_gives_the_one_liner(key: str, bad: object) -> None:
    cfg = dataclasses.replace(DistillConfig(), **{key: bad})
    assert cfg.problem() == (key, f"must be {DISTILL_WORDS[key]}, got {bad!r}")


def test_a_bad_augment_names_the_unknown_op() -> None:
    cfg = dataclasses.replace(DistillConfig(), augment="crop_foo")
    assert cfg.problem() == ("augment", "must be a DSA strategy: unknown augmentation op 'foo' in strategy "
                                        "'crop_foo'; known ops: color, crop, cutout, flip, scale, rotate (joined by "
                                        "'_'), or 'none'")
    assert dataclasses.replace(DistillConfig(), augment="none").problem() is None


def test_wrong_types_fail_instead_of_raising() -> None:
    assert first_problem(dataclasses.replace(DistillConfig(), micro_batch=3)).key == "micro_batch"  # type: ignore[union-attr]
    assert first_problem(dataclasses.replace(DistillConfig(), ipc="ten")).key == "ipc"  # type: ignore[union-attr]
    assert first_problem(dataclasses.replace(DistillConfig(), ipc=True)).key == "ipc"  # type: ignore[union-attr]


def test_the_vocabulary() -> None:
    assert (at_least(1).words, above(0).words, between(0, 1, top_open=True).words) == (">= 1", "> 0", "in [0, 1)")
    assert (one_of("a", "b").words, one_of("a", "b", "c").words) == ("a or b", "one of a, b, c")
    for check in (at_least(0), above(-1), between(-1, 1)):
        assert check.ok(0) and not check.ok(math.nan) and not check.ok(math.inf)
    assert between(0, 1).ok(1) and not between(0, 1, top_open=True).ok(1)


@pytest.mark.parametrize("kw,message", [
    ({"minutes": math.nan}, "--tune-minutes must be > 0"), ({"minutes": 0.0}, "--tune-minutes must be > 0"),
    ({"iterations": -1}, "--tune-iterations must be >= 0 (0 = fitted to the budget)"),
    ({"eval_runs": 0}, "--tune-runs must be >= 1"), ({"eval_epochs": 1}, "--tune-epochs must be >= 2"),
    ({"val_size": -1}, "--val-size must be >= 0")])
def test_tune_config_messages(kw: dict, message: str) -> None:
    with pytest.raises(UsageError) as e:
        TuneConfig(**kw).validate()
    assert str(e.value) == message
    TuneConfig().validate()


@pytest.mark.parametrize("kw,message", [
    ({"accuracy": "x"}, "unknown accuracy mode 'x'; choose from none, first, last"),
    ({"depth": 0}, "--depth must be at least 1, got 0"), ({"width": -2}, "--width must be at least 1, got -2"),
    ({"epochs": 0}, "--epochs must be at least 1, got 0"), ({"zca_eps": 0.0}, "--zca-eps must be positive, got 0.0"),
    ({"zca_eps": math.nan}, "--zca-eps must be positive, got nan")])
def test_import_config_messages(kw: dict, message: str) -> None:
    with pytest.raises(UsageError) as e:
        ImportConfig(**kw).validate()
    assert str(e.value) == message
    ImportConfig().validate()
    ImportConfig(depth=None, width=None, epochs=None).validate()  # not stated: not checked


# The one-liners `experts`, `convexify` and `evaluate` gave before their checks moved into the
# declarations: per checked setting, a bad value and the message it gets.
SEED_BAD = (2**63, f"--seed must be in 0 … {2**63 - 1} (2**63 − 1), got {2**63}")
BAD = {
    ExpertsConfig: {
        "num_experts": (0, "--n must be >= 1, got 0"), "epochs": (0, "--epochs must be >= 1, got 0"),
        "lr": (0.0, "--lr must be a finite number > 0, got 0.0"), "momentum": (1.0, "--momentum must be in [0, 1), got 1.0"),
        "weight_decay": (-1.0, "--weight-decay must be a finite number >= 0, got -1.0"),
        "batch_size": (0, "--batch-size must be >= 1, got 0"), "width": (0, "--width must be >= 1, got 0"),
        "depth": (-1, "--depth must be >= 1 (0 = by image size), got -1"), "zca_eps": (0.0, "--zca-eps must be > 0, got 0.0"),
        "augment": ("crop_foo", "unknown augmentation op 'foo' in strategy 'crop_foo'; known ops: color, crop, cutout, "
                                "flip, scale, rotate (joined by '_'), or 'none'"),
        "seed": SEED_BAD, "interior": (-1, "--interior must be >= 0, got -1"),
        "beta": ("nope", "unknown --beta 'nope'; choose from mct, uniform, decreasing, projected")},
    ConvexifyConfig: {
        "interior": (-1, "--interior must be >= 0, got -1"),
        "strategy": ("nope", "unknown --beta 'nope'; choose from mct, uniform, decreasing, projected")},
    EvaluateConfig: {
        "models": ((), "--models names no model"), "runs": (0, "--runs must be >= 1, got 0"),
        "epochs": (-1, "--epochs must be >= 0, got -1"), "lr": (0.0, "--lr must be a finite number > 0, got 0.0"),
        "seed": SEED_BAD, "baseline_labels": ("soft", "--baseline-labels must be auto, hard or expert, got 'soft'"),
        "baseline_draws": ("two", "--baseline-draws must be per-run or one, got 'two'"),
        "labels": ("soft", "--labels must be auto or hard, got 'soft'")},
}
CASES = [(cls, key) for cls, table in BAD.items() for key in table]
NUMERIC_CASES = [(cls, key) for cls, key in CASES if isinstance(BAD[cls][key][0], (int, float))]


@pytest.mark.parametrize("cls", list(BAD), ids=lambda c: c.__name__)
def test_these_configs_declare_every_check(cls: type) -> None:
    assert {s.name for s in settings(cls) if s.info.check is not None} == set(BAD[cls])
    cls().validate()


@pytest.mark.parametrize("cls,key", CASES, ids=[f"{c.__name__}.{k}" for c, k in CASES])
def test_a_bad_value_fails_its_declared_check(cls: type, key: str) -> None:
    bad, message = BAD[cls][key]
    cfg = dataclasses.replace(cls(), **{key: bad})
    found = first_problem(cfg)
    assert found is not None and found.key == key  # the declaration refuses it, no list apart
    with pytest.raises(UsageError) as e:
        cfg.validate()
    assert str(e.value) == message


@pytest.mark.parametrize("cls,key", NUMERIC_CASES, ids=[f"{c.__name__}.{k}" for c, k in NUMERIC_CASES])
def test_nan_fails_these_numeric_checks(cls: type, key: str) -> None:
    cfg = dataclasses.replace(cls(), **{key: math.nan})
    with pytest.raises(UsageError, match=r", got nan$"):
        cfg.validate()
    assert first_problem(cfg).key == key  # type: ignore[union-attr]


def test_the_experts_relations_between_settings() -> None:
    with pytest.raises(UsageError, match="only apply with --convexify"):
        ExpertsConfig(positions="0,2,4").validate()
    with pytest.raises(UsageError, match="it ends at 5, not K=4"):
        ExpertsConfig(convexify=True, epochs=4, positions="0,2,5").validate()
    ExpertsConfig(convexify=True, epochs=4, positions="0,2,4", beta="uniform").validate()
    assert EvaluateConfig(lr=None).validate() is None  # not stated: not checked
