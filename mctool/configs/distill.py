"""The settings of `mctool distill` and its presets; no torch, so that `--help`, option errors
and an unknown preset are answered before torch is imported."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mctool import presets
from mctool.configs.choices import DEFAULT_STRATEGY, MODES, POLICIES, augment_problem
from mctool.core.errors import UsageError
from mctool.core.settings import (Check, above, at_least, between, first_problem, one_of, option_name, preset_keys,
                             required_keys, setting)


DEFAULT_EVAL_SHARE = 0.1  # runs without a preset keep their best images; evaluations take at most this share
AUTO_SELECT_MIN_ITERATIONS = 20  # shorter runs keep their final images unless --eval-every asks
DEFAULT_LR_BACKOFF = 0.1  # runs without a preset cut lr_img tenfold when their images fall below the start
MAX_BACKOFFS = 3  # a run cuts lr_img at most this often (1000× with the default factor)
# Runs without a preset at ipc DRAWS_IPC[0] … DRAWS_IPC[1] choose their start among this many draws
# (--init-draws): at ipc 10 the draw decided most of a run on two small datasets, and one bad draw
# put a run 5 points below random real (bench/README.md, "Choosing the starting draw"); at ipc 1
# distillation moves the images far from their draw; from ipc 50 on the images average over more of
# the data and the four evaluations cost minutes (12 minutes on Fashion-MNIST on a 2-core CPU), unmeasured.
DEFAULT_INIT_DRAWS = 4
DRAWS_IPC = (10, 49)

# --micro-batch: "auto" or a whole number of images (0 = whole steps).
# --augment: DSA ops joined by '_', checked before any data is loaded; the message is the one DSA
# gives (it names the unknown op), after distill's "--augment must be a DSA strategy:".
_AUGMENT = Check(lambda v: augment_problem(v) is None, "a DSA strategy",
                 lambda v: f"must be a DSA strategy: {augment_problem(v)}")
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
    min_start_epoch: float = setting(0.0, "Sampling window (DATM): start epochs are drawn from this epoch up to the "
                                     "window's upper end (see --start-upper-init); 0 (default) = from the start "
                                     "of the trajectory, as MCT.", preset=True,
                                     legacy=0.0, check=at_least(0))
    start_upper_init: float = setting(0.0, "Sampling window (DATM): the upper end of the start epochs at iteration 0, "
                                      "growing linearly to --max-start-epoch over --start-upper-iterations "
                                      "iterations; 0 (default) = off: --max-start-epoch from the first iteration.",
                                      preset=True, legacy=0.0, check=at_least(0, ">= 0 (0 = off)"))
    start_upper_iterations: int = setting(0, "Iterations over which the window's upper end grows from "
                                          "--start-upper-init to --max-start-epoch (needs --start-upper-init).",
                                          preset=True, legacy=0, check=at_least(0))
    ema: float = setting(0.0, "Exponential moving average of the learned images (and of every learnable that "
                         "opts in) with this decay, e.g. 0.999: the average is what is stored, evaluated and "
                         "drawn; 0 (default) = off.", preset=True, legacy=0.0, metavar="DECAY",
                         check=between(0, 1, "in [0, 1) (0 = off)", top_open=True))
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
    pix_init: str = setting("real", "Initial images: real (random real images per class), correct (the same, with "
                            "the images the buffer's first expert misclassifies replaced by ones of their class it "
                            "gets right, where any are left: DATM's rule, as --learn-labels starts) or noise.",
                            flags=("--init",), check=one_of("real", "correct", "noise",
                                                            words="one of real, correct, noise"))
    init_draws: int = setting(1, "Starting draws to choose from (with real or correct images): draw N sets of "
                              "images per class, train --eval-runs networks × --eval-epochs on each, score them on "
                              "the training images outside every draw and the validation split, and start from "
                              "the best. At ipc 10 on small datasets the draw decides most of the result "
                              "(bench/README.md, \"Choosing the starting draw\"). Default: 4 without a preset at ipc 10 … 49 when "
                              "the run selects its images (as it does by default), else 1 = one draw, MCT as "
                              "published.", preset=True, legacy=1, metavar="N",
                              check=between(1, 64, "in 1 … 64"))
    soft_labels: bool = setting(False, "Labels from the expert's predictions.",
                                flags=("--soft-labels/--hard-labels",))
    learn_labels: bool = setting(False, "Learned soft labels (DATM): label logits initialised from the buffer's first "
                                 "expert on the initial images (real ones it misclassifies replaced by ones it gets "
                                 "right), learned with the images through the matching loss; the synset stores their "
                                 "softmax. Off: MCT as published. Not with --soft-labels.",
                                 flags=("--learn-labels/--no-learn-labels",), preset=True, legacy=False)
    lr_label: float = setting(2.0, "Learning rate of the learned label logits (SGD with --momentum-label); default 2.",
                              preset=True, legacy=2.0, check=at_least(0, "a number >= 0"))
    momentum_label: float = setting(0.9, "Momentum of the learned label logits; default 0.9.", preset=True, legacy=0.9,
                                  check=between(0, 1, top_open=True))
    augment: str = setting(DEFAULT_STRATEGY, "DSA ops joined by '_', or none.", check=_AUGMENT)
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
                                "keeps the evaluations within this share of the run's time (planned from a count of "
                                "network passes, so the same on every machine; the measured cost is reported; runs of "
                                "20 iterations or more). 0 = off (the final images). Default 0.1 without a preset and in "
                                "the preset --tune writes, 0 with a preset.", preset=True, resume_safe=True,
                                legacy=0.0, check=between(0, 1, "in [0, 1) (0 = off)", top_open=True))
    lr_backoff: float = setting(0.0, "When the run selects its images (--eval-every, --eval-share) and an evaluation "
                                "scores them below the starting images by more than the split's standard error, go on "
                                "from the best images so far with lr_img multiplied by this factor (at most "
                                f"{MAX_BACKOFFS} times): an image learning rate that makes the images worse is cut "
                                "instead of spending the rest of the run. 0 = off. Default 0.1 without a preset (0 with "
                                "--eval-share 0); 0 with a preset and under --tune (it chooses lr_img).", preset=True, legacy=0.0,
                                metavar="FACTOR", check=between(0, 1, "in [0, 1) (0 = off)", top_open=True))
    select_margin: float = setting(0.0, "When the run selects its images: later images replace the starting ones "
                                   "(iteration 0) only when they score above them by more than this many standard "
                                   "errors of the selection split, so that a run whose evaluations cannot tell its "
                                   "images from the start (a small split, one network) returns the start instead of "
                                   "the luckiest score. 0 (the default) = the highest score wins; a margin of 1 "
                                   "did no better on two small datasets (bench/README.md, \"The selection's "
                                   "margin\").", preset=True, legacy=0.0, metavar="SE",
                                   check=between(0, 10, "in [0, 10]"))
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
        """The first setting that cannot run, as (key, "must be …, got …"): each setting's own check is
        declared with it (`check=`; NaN fails every numeric check), then the relations between settings."""
        found = first_problem(self)
        if found is not None:
            return found.key, found.message("must be {words}, got {value!r}")
        relations = [  # (key, holds, requirement): what one setting must be given the others
            ("min_start_epoch", self.min_start_epoch == 0 or self.min_start_epoch < self.max_start_epoch,
             f"below --max-start-epoch ({self.max_start_epoch:g})"),
            ("start_upper_init", self.start_upper_init == 0 or self.min_start_epoch < self.start_upper_init
             <= self.max_start_epoch, f"above --min-start-epoch ({self.min_start_epoch:g}) and at most "
             f"--max-start-epoch ({self.max_start_epoch:g}), or 0 (off)"),
            ("start_upper_iterations", (self.start_upper_iterations >= 1) == (self.start_upper_init > 0),
             ">= 1 with --start-upper-init, and 0 without it"),
            ("init_draws", self.init_draws == 1 or self.pix_init != "noise",
             "1 with --init noise (there is no draw to choose)"),
            ("learn_labels", not (self.learn_labels and self.soft_labels),
             "off when --soft-labels is on (MCT's per-iteration expert labels would replace the learned ones)"),
        ]
        for key, holds, requirement in relations:
            if not holds:
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
