"""A distillation's settings: DistillConfig, presets, what a buffer implies, and the rules of resume.

Presets fill a DistillConfig, options override, the artifact stores it (`config`). Without a
preset, the buffer's dataset, preprocessing and waypoint count and mctool/distill/autoconfig.py's
rules give the defaults. A resumed run keeps the stored settings except the resume-safe ones.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mctool import presets, store
from mctool.augment import DEFAULT_STRATEGY
from mctool.errors import UsageError
from mctool.matching import MODES
from mctool.secondorder import POLICIES
from mctool.settings import (Check, above, at_least, between, first_problem, legacy_values, one_of, option_name,
                             preset_keys, required_keys, resume_safe, setting)

DEFAULT_EVAL_SHARE = 0.1  # runs without a preset keep their best images; evaluations take at most this share
AUTO_SELECT_MIN_ITERATIONS = 20  # shorter runs keep their final images unless --eval-every asks

# --micro-batch: "auto" or a whole number of images (0 = whole steps).
_MICRO_BATCH = Check(lambda v: v == "auto" or v.isdigit(), "auto or a whole number >= 0")


@dataclass(frozen=True)
class DistillConfig:
    """Every setting of a distillation run (presets fill it, options override, the artifact stores it)."""

    dataset: str | None = setting(None, "The dataset the preset is for.", option=False, preset=True, required=True)
    ipc: int = setting(10, "Images per class.", preset=True, column=True, required=True, check=at_least(1))
    syn_steps: int = setting(20, "Inner SGD steps on the synthetic set (N).", preset=True, column=True,
                             required=True, check=at_least(1))
    expert_epochs: float = setting(3.0, "Target = start + expert_epochs (M), clamped to K.", preset=True,
                                   column=True, required=True, check=above(0))
    max_start_epoch: float = setting(25.0, "Start ~ U(0, max_start_epoch).", preset=True, column=True,
                                     required=True, check=at_least(0))
    lr_img: float = setting(1000.0, "Image learning rate (SGD, momentum 0.5), in the units of --step-units "
                            "(default: the released code's, as Table A's values were tuned).", preset=True,
                            column=True, required=True, check=above(0, "a number > 0"))
    lr_lr: float = setting(1e-5, "Learning rate of the learnable step size alpha.", preset=True, column=True,
                           required=True, check=at_least(0, "a number >= 0"))
    lr_init: float = setting(0.01, "Initial value of alpha.", preset=True, column=True, required=True,
                             check=above(0, "a number > 0 (the initial step size)"))
    iterations: int = setting(5000, "Distillation iterations.", preset=True, column=True, resume_safe=True,
                              check=at_least(0))
    batch_syn: int = setting(0, "Synthetic mini-batch per inner step (0 = all).", preset=True,
                             check=at_least(0, ">= 0 (0 = all images)"))
    zca: bool = setting(True, "Expected preprocessing of the buffer (checked).", flags=("--zca/--no-zca",),
                        preset=True, column=True)
    interior: int = setting(2, "Interior waypoints expected in the buffer (default: the preset's, else the "
                            "buffer's); a buffer with another count is used as it is, with a note.", preset=True,
                            check=at_least(0))
    depth: int = setting(0, "ConvNet depth the settings were made for (0 = any); a buffer whose experts have "
                         "another depth is used as it is, with a note.", preset=True, resume_safe=True,
                         check=at_least(0, ">= 0 (0 = any)"))
    method: str = setting("mct", "mct (convexified, default) or mtt (raw trajectories, unrolled).",
                          check=one_of("mct", "mtt"))
    grad: str = setting("constant", "constant (MCT's two-pass, default), adjoint (exact, flat memory) or "
                        "unrolled (exact).", check=one_of(*MODES, words=f"one of {', '.join(MODES)}"))
    step_units: str = setting("released", "Image-step units: released (the authors' released code: half the "
                              "two-pass formula's gradient for --method mct; Table A's lr_img) or exact (the "
                              "formulas as stated).", legacy="exact", check=one_of("released", "exact"))
    discrete: bool = setting(False, "Integer start epochs (ablation) instead of continuous.",
                             flags=("--discrete/--continuous",))
    pix_init: str = setting("real", "Initial images: real (random real images per class) or noise.",
                            flags=("--init",), check=one_of("real", "noise"))
    soft_labels: bool = setting(False, "Labels from the expert's predictions.",
                                flags=("--soft-labels/--hard-labels",))
    augment: str = setting(DEFAULT_STRATEGY, "DSA ops joined by '_', or none.")
    micro_batch: str = setting("auto", "Compute each inner step in chunks of N images: the same result up to float "
                               "rounding, peak memory set by N instead of the number of images. auto (default): "
                               "whole steps when they fit the device's free memory, else the largest N that fits; 0: "
                               "whole steps. Refused for networks that mix samples (BatchNorm).", resume_safe=True,
                               legacy="0", metavar="N|auto", check=_MICRO_BATCH)
    second_order: str = setting("auto", "The ConvNet's second-order step: fastgrad (hand-written sweep), autograd "
                                "(double backward), or auto: on CUDA the faster of the two, measured on the first "
                                "step; on the CPU fastgrad (measured faster there, bench/README.md, and "
                                "deterministic, so --seed repeats bit for bit).", resume_safe=True, legacy="auto",
                                check=one_of(*POLICIES, words=f"one of {', '.join(POLICIES)}"))
    momentum_img: float = setting(0.5, "Momentum of the image optimizer (SGD).", option=False,
                                  check=between(0, 1, top_open=True))
    momentum_lr: float = setting(0.5, "Momentum of the step size's optimizer (SGD).", option=False,
                                 check=between(0, 1, top_open=True))
    checkpoint_every: int = setting(100, "Save a resumable checkpoint every N iterations.", resume_safe=True,
                                    check=at_least(1))
    checkpoint_minutes: float = setting(0.0, "Also save one every M minutes (0 = only every N iterations).",
                                        resume_safe=True, legacy=0.0, check=at_least(0, ">= 0 (0 = off)"))
    eval_every: int = setting(0, "Evaluate every N iterations and at the end, keeping the best images (0 = "
                              "never).", resume_safe=True, check=at_least(0, ">= 0 (0 = never)"))
    eval_share: float = setting(0.0, "Without --eval-every: keep the best images on the validation split, the starting "
                                "ones (iteration 0) included, evaluating at the start, at the end and as often as "
                                "keeps the evaluations within this share of the run's time (measured; runs of 20 "
                                "iterations or more). 0 = off (the final images). Default 0.1 without a preset and in "
                                "the preset --tune writes, 0 with a preset.", preset=True, resume_safe=True,
                                legacy=0.0, check=between(0, 1, "in [0, 1) (0 = off)", top_open=True))
    eval_runs: int = setting(1, "Networks per periodic evaluation.", resume_safe=True, check=at_least(1))
    eval_epochs: int = setting(300, "Epochs per periodic evaluation.", resume_safe=True, check=at_least(1))
    select_on: str = setting("validation", "Where periodic evaluations score the images: validation (held out "
                             "of the training set) or test (the authors' protocol; every output says so).",
                             legacy="validation", check=one_of("validation", "test"))
    val_size: int = setting(0, "Training images held out for --select-on validation, the same share of every "
                            "class (0 = 10 % of the training split, at most 5000).", legacy=0,
                            check=at_least(0, ">= 0 (0 = automatic)"))
    seed: int = setting(0, "Run seed (0 … 2**63-1).", check=between(0, 2**63 - 1, "in 0 … 2**63-1"))
    preset: str = ""

    @property
    def selecting(self) -> bool:
        """Whether the run holds out a validation split to keep its best images on (periodic
        evaluations, the starting images included). With --eval-share alone the evaluations are
        made from AUTO_SELECT_MIN_ITERATIONS iterations on; the split does not depend on the run's
        length, so a resume with more iterations continues the same run."""
        return self.eval_every > 0 or self.eval_share > 0

    @property
    def image_grad_scale(self) -> float:
        """The factor between the gradient `match` returns and the image step's gradient."""
        return 0.5 if self.method == "mct" and self.step_units == "released" else 1.0

    def problem(self) -> tuple[str, str] | None:
        """The first setting that cannot run, as (key, "must be …, got …"): each setting's check is
        declared with it (`check=`); NaN fails every numeric check."""
        found = first_problem(self)
        return None if found is None else (found.key, found.message("must be {words}, got {value!r}"))

    def validate(self) -> None:
        """Reject settings that cannot run, with one line naming the option."""
        found = self.problem()
        if found is not None:
            key, why = found
            raise UsageError(f"{option_name(DistillConfig, key)} {why}")


def check_synset_name(name: str) -> None:
    """A synset name becomes an HDF5 group name under /synsets: no paths, no empty names."""
    if not name or "/" in name or name in (".", "..") or store.clean_text(name) != name:
        raise UsageError(f"--name {store.clean_text(repr(name))}: a synset name may not be empty, '.' or '..', "
                         "or contain '/' or control characters")


def synset_name(cfg: DistillConfig) -> str:
    """Default synset name: the preset's name, else method-ipcN."""
    return cfg.preset or f"{cfg.method}-ipc{cfg.ipc}"


# --------------------------------------------------------------------------- settings


def preset_schema() -> presets.Schema:
    """What a distillation preset may and must hold: the settings marked so."""
    return presets.Schema(preset_keys(DistillConfig), tuple(required_keys(DistillConfig)))


def load_preset(name_or_path: str | Path) -> presets.Preset:
    """A distillation preset by shipped name or .toml path."""
    return presets.load_preset(name_or_path, preset_schema())


def list_presets() -> list[presets.Preset]:
    """Every shipped distillation preset."""
    return presets.list_presets(preset_schema())


def _fields() -> set[str]:
    return {f.name for f in dataclasses.fields(DistillConfig)}


def resolve_config(preset: str | None, overrides: dict[str, Any], buffer: store.Buffer | None = None,
                   stored: dict[str, Any] | None = None) -> DistillConfig:
    """The run's settings.

    A new run: built-in defaults <- what the buffer implies (dataset, preprocessing, waypoint
    count, when no preset says otherwise) <- the preset's values (none: eval_share
    DEFAULT_EVAL_SHARE, the best images kept) <- `overrides` that are not None.
    A resumed run (`stored`: the synset's config): the stored settings (with the values older
    releases implied for keys they did not store) <- `overrides`, which may differ only in the
    settings a resume may change."""
    values: dict[str, Any] = {}
    p = load_preset(preset) if preset else None
    if stored is not None:
        values.update({k: v for k, v in stored.items() if k in _fields()})
        for key, legacy in legacy_values(DistillConfig).items():
            values.setdefault(key, legacy)
    else:
        if buffer is not None:
            values.update(buffer_defaults(buffer, preset_given=p is not None, ipc=overrides.get("ipc")))
        if p is not None:
            values.update({k: v for k, v in p.values.items() if k in _fields()})
            values["preset"] = p.name
        else:
            # Never worse than the start, by default: a run whose settings nobody tuned keeps its
            # best images on the validation split, the starting ones included.
            values["eval_share"] = DEFAULT_EVAL_SHARE
    given = {k: v for k, v in overrides.items() if v is not None and k in _fields()}
    if stored is not None:
        _check_resume_changes(values, given, p)
    values.update(given)
    cfg = DistillConfig(**values)
    found = cfg.problem()
    if p is not None and stored is None and found is not None and found[0] not in given and found[0] in p.values:
        raise UsageError(f"{p.path}: {found[0]} {found[1]}")  # the preset's value, not an option's
    cfg.validate()
    return cfg


def _check_resume_changes(stored: dict[str, Any], given: dict[str, Any], preset: Any) -> None:
    safe = resume_safe(DistillConfig)
    asked = dict(given)
    if preset is not None:
        asked = {**{k: v for k, v in preset.values.items() if k in _fields()}, **asked}
    diff = [k for k, v in asked.items() if k not in safe and json.loads(json.dumps(v)) != stored.get(k)]
    if diff:
        raise UsageError("cannot resume with different settings: "
                         + ", ".join(f"{k}={stored.get(k)!r} (now {asked[k]!r})" for k in diff[:4])
                         + " — drop them (a resume keeps the run's settings) or start another --name")


def buffer_defaults(buffer: store.Buffer, preset_given: bool, ipc: int | None = None) -> dict[str, Any]:
    """Settings implied by the buffer: its dataset, and — when no preset says otherwise — its
    preprocessing, waypoint count and the settings mctool/distill/autoconfig.py's rules derive from the
    dataset and the experts for `ipc` (default: the built-in ipc)."""
    from mctool.distill import autoconfig

    values: dict[str, Any] = {"dataset": buffer.data.name}
    if not preset_given:
        values["zca"] = buffer.data.zca
        if buffer.convex_state == "complete":
            values["interior"] = len(buffer.convex.meta.positions) - 2
        values.update(autoconfig.suggest(autoconfig.facts(buffer), ipc or DistillConfig.ipc).values)
    return values


def buffer_note(buffer: store.Buffer, cfg: DistillConfig, given: set[str]) -> str:
    """The note a run without a preset logs: which settings the buffer's rules chose, and why."""
    from mctool.distill import autoconfig

    choice = autoconfig.suggest(autoconfig.facts(buffer), cfg.ipc)
    return autoconfig.describe(choice, dataclasses.asdict(cfg), given)


def check_buffer_matches(cfg: DistillConfig, buffer: store.Buffer) -> None:
    """A preset for another dataset, or another preprocessing, cannot use this buffer."""
    meta = buffer.data
    if cfg.dataset and cfg.dataset != meta.name:
        raise UsageError(f"{store.shown(buffer.path)}: holds experts for '{meta.name}' but the preset is for "
                         f"'{cfg.dataset}'; drop --preset to use settings derived from the buffer, pass --preset "
                         "with a preset file whose dataset is this one, or tune your own with `mctool distill --tune`")
    if cfg.zca != meta.zca:
        raise UsageError(f"{store.shown(buffer.path)}: experts were trained {'with' if meta.zca else 'without'} ZCA "
                         f"but the settings ask {'for' if cfg.zca else 'against'} it (--zca/--no-zca)")


def missing_buffer_hint(buffer: Path, dataset: str | None, default_buffer: bool) -> str:
    """What to run first when there is no buffer, sized for this machine (CPU: a small buffer)."""
    ds = dataset or "DATASET"
    other = " (or pass --buffer FILE)" if default_buffer else ""
    size = "--n 100" if torch.cuda.is_available() else "--n 2 --epochs 10 --width 32"
    where = "" if torch.cuda.is_available() else " (sized for a CPU; the paper's buffers are --n 100 on GPUs)"
    return (f"{store.shown(buffer)}: no such file — make experts first: `mctool experts {ds} {size} -o "
            f"{store.shown(buffer)}`{where} then `mctool convexify {store.shown(buffer)}`{other}")
