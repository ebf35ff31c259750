"""The settings of `mctool distill` and its presets; no torch, so that `--help`, option errors
and an unknown preset are answered before torch is imported."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from mctool import presets
from mctool.configs.choices import DEFAULT_STRATEGY, MODES, POLICIES
from mctool.errors import UsageError
from mctool.settings import option_name, preset_keys, required_keys, setting


@dataclass(frozen=True)
class DistillConfig:
    """Every setting of a distillation run (presets fill it, options override, the artifact stores it)."""

    dataset: str | None = setting(None, "The dataset the preset is for.", option=False, preset=True, required=True)
    ipc: int = setting(10, "Images per class.", preset=True, column=True, required=True)
    syn_steps: int = setting(20, "Inner SGD steps on the synthetic set (N).", preset=True, column=True,
                             required=True)
    expert_epochs: float = setting(3.0, "Target = start + expert_epochs (M), clamped to K.", preset=True,
                                   column=True, required=True)
    max_start_epoch: float = setting(25.0, "Start ~ U(0, max_start_epoch).", preset=True, column=True,
                                     required=True)
    lr_img: float = setting(1000.0, "Image learning rate (SGD, momentum 0.5), in the units of --step-units "
                            "(default: the released code's, as Table A's values were tuned).", preset=True,
                            column=True, required=True)
    lr_lr: float = setting(1e-5, "Learning rate of the learnable step size alpha.", preset=True, column=True,
                           required=True)
    lr_init: float = setting(0.01, "Initial value of alpha.", preset=True, column=True, required=True)
    iterations: int = setting(5000, "Distillation iterations.", preset=True, column=True, resume_safe=True)
    batch_syn: int = setting(0, "Synthetic mini-batch per inner step (0 = all).", preset=True)
    zca: bool = setting(True, "Expected preprocessing of the buffer (checked).", flags=("--zca/--no-zca",),
                        preset=True, column=True)
    interior: int = setting(2, "Interior waypoints expected in the buffer (default: the preset's, else the "
                            "buffer's); a buffer with another count is used as it is, with a note.", preset=True)
    depth: int = setting(0, "ConvNet depth the settings were made for (0 = any); a buffer whose experts have "
                         "another depth is used as it is, with a note.", preset=True, resume_safe=True)
    method: str = setting("mct", "mct (convexified, default) or mtt (raw trajectories, unrolled).")
    grad: str = setting("constant", "constant (MCT's two-pass, default), adjoint (exact, flat memory) or "
                        "unrolled (exact).")
    step_units: str = setting("released", "Image-step units: released (the authors' released code: half the "
                              "two-pass formula's gradient for --method mct; Table A's lr_img) or exact (the "
                              "formulas as stated).", legacy="exact")
    discrete: bool = setting(False, "Integer start epochs (ablation) instead of continuous.",
                             flags=("--discrete/--continuous",))
    pix_init: str = setting("real", "Initial images: real (random real images per class) or noise.",
                            flags=("--init",))
    soft_labels: bool = setting(False, "Labels from the expert's predictions.",
                                flags=("--soft-labels/--hard-labels",))
    learn_labels: bool = setting(False, "Learned soft labels (DATM): label logits initialised from the buffer's first "
                                 "expert on the initial images (real ones it misclassifies replaced by ones it gets "
                                 "right), learned with the images through the matching loss; the synset stores their "
                                 "softmax. Off: MCT as published. Not with --soft-labels.",
                                 flags=("--learn-labels/--no-learn-labels",), preset=True, legacy=False)
    lr_label: float = setting(2.0, "Learning rate of the learned label logits (SGD with --momentum-label).",
                              preset=True, legacy=2.0)
    momentum_label: float = setting(0.9, "Momentum of the learned label logits.", preset=True, legacy=0.9)
    augment: str = setting(DEFAULT_STRATEGY, "DSA ops joined by '_', or none.")
    micro_batch: str = setting("auto", "Compute each inner step in chunks of N images: the same result up to float "
                               "rounding, peak memory set by N instead of the number of images. auto (default): "
                               "whole steps when they fit the device's free memory, else the largest N that fits; 0: "
                               "whole steps. Refused for networks that mix samples (BatchNorm).", resume_safe=True,
                               legacy="0", metavar="N|auto")
    second_order: str = setting("auto", "The ConvNet's second-order step: fastgrad (hand-written sweep), autograd "
                                "(double backward), or auto: on CUDA the faster of the two, measured on the first "
                                "step; on the CPU fastgrad (measured faster there, bench/README.md, and "
                                "deterministic, so --seed repeats bit for bit).", resume_safe=True, legacy="auto")
    momentum_img: float = 0.5
    momentum_lr: float = 0.5
    checkpoint_every: int = setting(100, "Save a resumable checkpoint every N iterations.", resume_safe=True)
    checkpoint_minutes: float = setting(0.0, "Also save one every M minutes (0 = only every N iterations).",
                                        resume_safe=True, legacy=0.0)
    eval_every: int = setting(0, "Evaluate every N iterations and at the end, keeping the best images (0 = "
                              "never).", resume_safe=True)
    eval_runs: int = setting(1, "Networks per periodic evaluation.", resume_safe=True)
    eval_epochs: int = setting(300, "Epochs per periodic evaluation.", resume_safe=True)
    select_on: str = setting("validation", "Where periodic evaluations score the images: validation (held out "
                             "of the training set) or test (the authors' protocol; every output says so).",
                             legacy="validation")
    val_size: int = setting(0, "Training images held out for --select-on validation, the same share of every "
                            "class (0 = 10 % of the training split, at most 5000).", legacy=0)
    seed: int = setting(0, "Run seed (0 … 2**63-1).")
    preset: str = ""

    @property
    def image_grad_scale(self) -> float:
        """The factor between the gradient `match` returns and the image step's gradient."""
        return 0.5 if self.method == "mct" and self.step_units == "released" else 1.0

    def problem(self) -> tuple[str, str] | None:
        """The first setting that cannot run, as (key, "must be …, got …"); NaN fails every check."""
        finite = math.isfinite
        checks = [
            ("ipc", self.ipc >= 1, ">= 1"),
            ("syn_steps", self.syn_steps >= 1, ">= 1"),
            ("expert_epochs", finite(self.expert_epochs) and self.expert_epochs > 0, "> 0"),
            ("max_start_epoch", finite(self.max_start_epoch) and self.max_start_epoch >= 0, ">= 0"),
            ("lr_img", finite(self.lr_img) and self.lr_img > 0, "a number > 0"),
            ("lr_lr", finite(self.lr_lr) and self.lr_lr >= 0, "a number >= 0"),
            ("lr_init", finite(self.lr_init) and self.lr_init > 0, "a number > 0 (the initial step size)"),
            ("momentum_img", 0 <= self.momentum_img < 1, "in [0, 1)"),
            ("momentum_lr", 0 <= self.momentum_lr < 1, "in [0, 1)"),
            ("lr_label", finite(self.lr_label) and self.lr_label >= 0, "a number >= 0"),
            ("momentum_label", 0 <= self.momentum_label < 1, "in [0, 1)"),
            ("learn_labels", not (self.learn_labels and self.soft_labels),
             "off when --soft-labels is on (MCT's per-iteration expert labels would replace the learned ones)"),
            ("iterations", self.iterations >= 0, ">= 0"),
            ("batch_syn", self.batch_syn >= 0, ">= 0 (0 = all images)"),
            ("interior", self.interior >= 0, ">= 0"),
            ("depth", self.depth >= 0, ">= 0 (0 = any)"),
            ("method", self.method in ("mct", "mtt"), "mct or mtt"),
            ("grad", self.grad in MODES, f"one of {', '.join(MODES)}"),
            ("step_units", self.step_units in ("released", "exact"), "released or exact"),
            ("pix_init", self.pix_init in ("real", "noise"), "real or noise"),
            ("micro_batch", self.micro_batch == "auto" or (self.micro_batch.isdigit()), "auto or a whole number >= 0"),
            ("second_order", self.second_order in POLICIES, f"one of {', '.join(POLICIES)}"),
            ("checkpoint_every", self.checkpoint_every >= 1, ">= 1"),
            ("checkpoint_minutes", finite(self.checkpoint_minutes) and self.checkpoint_minutes >= 0,
             ">= 0 (0 = off)"),
            ("eval_every", self.eval_every >= 0, ">= 0 (0 = never)"),
            ("eval_runs", self.eval_runs >= 1, ">= 1"),
            ("eval_epochs", self.eval_epochs >= 1, ">= 1"),
            ("select_on", self.select_on in ("validation", "test"), "validation or test"),
            ("val_size", self.val_size >= 0, ">= 0 (0 = automatic)"),
            ("seed", 0 <= self.seed <= 2**63 - 1, "in 0 … 2**63-1"),
        ]
        for key, ok, requirement in checks:
            if not ok:
                return key, f"must be {requirement}, got {getattr(self, key)!r}"
        return None

    def validate(self) -> None:
        """Reject settings that cannot run, with one line naming the option."""
        found = self.problem()
        if found is not None:
            key, why = found
            raise UsageError(f"{option_name(DistillConfig, key)} {why}")


def preset_schema() -> presets.Schema:
    """What a distillation preset may and must hold: the settings marked so."""
    return presets.Schema(preset_keys(DistillConfig), tuple(required_keys(DistillConfig)))


def load_preset(name_or_path: str | Path) -> presets.Preset:
    """A distillation preset by shipped name or .toml path."""
    return presets.load_preset(name_or_path, preset_schema())


def list_presets() -> list[presets.Preset]:
    """Every shipped distillation preset."""
    return presets.list_presets(preset_schema())
