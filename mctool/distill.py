"""MCT distillation: learn synthetic images by matching convexified expert trajectories.

Per iteration (method.md §6): draw the next expert (shuffled passes without replacement),
sample a real start c ~ U(0, max_start_epoch), target min(c + expert_epochs, K), rebuild
θ_start and θ_target with ConvexTrajectory.at, run `syn_steps` SGD steps of the functional
ConvNet on DSA-augmented synthetic mini-batches with the learnable step size α, and update
the images and α from the matching loss (gradient mode: mctool.matching). `--method mtt`
matches raw trajectories at integer epochs with the exact unrolled gradient (MTT).

Step units: the released MCT code applies half the image gradient its formula states (a
tuple multiplied by 2, method.md §6.6), and Table A's `lr_img` was tuned with that. With
`step_units = "released"` (the default) every `--grad` mode of `--method mct` takes image
steps in those units — `constant` then applies exactly the released code's update — so
switching `--grad` changes the direction and exactness of the gradient, never the meaning of
`--lr-img`. `"exact"` applies the gradients as the formulas state them (what mctool 0.1 did);
`--method mtt` always uses MTT's exact gradient, which its released code applies as is.

With `--eval-every N`, the images are evaluated every N iterations and at the end, scored on
a validation split held out of the training set (never the test split, unless
`--select-on test` reproduces the authors' protocol), and the best ones are kept beside the
final ones.

All randomness comes from CPU torch.Generators whose states are checkpointed, so a resumed
run continues exactly where an uninterrupted one would be.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mctool import distributed as dist
from mctool import store
from mctool.augment import DEFAULT_STRATEGY, DSA, AugParams, StepAugment
from mctool.errors import Interrupted, TrainingDiverged, UsageError
from mctool.functional import FlatNet
from mctool.matching import MODES, MatchResult, match
from mctool.microbatch import chunked_forward, sample_coupling
from mctool.secondorder import POLICIES
from mctool.models import ModelSpec, build_model
from mctool import presets
from mctool.prepared import Prepared, auto_val_size, sample_per_class, split_validation
from mctool.progress import SIGNAL_NAMES, SILENT, Muted, Reporter
from mctool.settings import legacy_values, option_name, preset_keys, required_keys, resume_safe, setting
from mctool.trajectory import ConvexTrajectory

# Divergence (docs/method.md, "Robustness"): an update whose loss, gradient, images or α is
# non-finite or beyond these bounds is not applied; too many such iterations end the run.
MAX_BAD_IN_A_ROW = 10
MAX_BAD_FRACTION = 0.25
IMAGE_BOUND = 1e3  # |pixel| in the whitened/normalised space; real images stay within ~±10
ALPHA_BOUND = 1e3  # α may grow to this multiple of lr_init

_RESUME_HINT = "add --resume to the same command to continue"


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
    count, when no preset says otherwise) <- the preset's values <- `overrides` that are not None.
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
    preprocessing, waypoint count and the settings mctool/autoconfig.py's rules derive from the
    dataset and the experts for `ipc` (default: the built-in ipc)."""
    from mctool import autoconfig

    values: dict[str, Any] = {"dataset": buffer.data.name}
    if not preset_given:
        values["zca"] = buffer.data.zca
        if buffer.convex_state == "complete":
            values["interior"] = len(buffer.convex.meta.positions) - 2
        values.update(autoconfig.suggest(autoconfig.facts(buffer), ipc or DistillConfig.ipc).values)
    return values


def buffer_note(buffer: store.Buffer, cfg: DistillConfig, given: set[str]) -> str:
    """The note a run without a preset logs: which settings the buffer's rules chose, and why."""
    from mctool import autoconfig

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


# --------------------------------------------------------------------------- experts


@dataclass
class Expert:
    """One expert's path: convexified (MCT) or raw snapshots read on demand (MTT)."""

    index: int
    K: int
    convex: ConvexTrajectory | None = None
    raw: Callable[[int], torch.Tensor] | None = None

    def at(self, c: float) -> torch.Tensor:
        """Flat parameters at position c (an integer epoch for raw trajectories)."""
        if self.convex is not None:
            return self.convex.at(c)
        assert self.raw is not None
        return self.raw(int(c))


class ExpertSource:
    """Reads experts from an open buffer: waypoints + β (/convex) or raw trajectories (/experts)."""

    def __init__(self, buffer: store.Buffer, method: str, device: torch.device) -> None:
        self.buffer, self.method, self.device = buffer, method, device
        if method == "mct":
            self.positions = list(buffer.convex.meta.positions)
            self.indices = buffer.convex_experts()
            self.K = self.positions[-1]
        else:
            info = buffer.require_experts()
            if not info.has_trajectories:
                raise UsageError(f"{store.shown(buffer.path)}: --method mtt needs full trajectories; this buffer "
                                 "holds only convexified ones")
            self.indices = buffer.done_experts()
            self.K = info.epochs

    def load(self, e: int) -> Expert:
        """Expert `e` (an index into the buffer's rows), on the device."""
        if self.method == "mct":
            w, b = self.buffer.convex_expert(e)
            traj = ConvexTrajectory(w, b, self.positions, self.buffer.layer_sizes).to(self.device)
            return Expert(e, self.K, convex=traj)
        return Expert(e, self.K, raw=lambda k: self.buffer.snapshot(e, k).to(self.device))


# --------------------------------------------------------------------------- state


@dataclass
class State:
    """Everything a checkpoint holds: resuming from it continues the run bit for bit on CPU."""

    images: torch.Tensor
    labels: torch.Tensor
    alpha: float
    images_velocity: torch.Tensor
    alpha_velocity: float
    iteration: int
    generators: list[torch.Tensor]  # one CPU generator state per rank
    queues: list[list[int]]  # per rank: experts left in the current shuffled pass
    losses: list[float] = field(default_factory=list)
    skipped: int = 0
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    best: store.BestImages | None = None
    run: dict[str, Any] = field(default_factory=dict)  # choices a resume repeats (micro-batch)

    def to(self, device: torch.device) -> "State":
        """The same state with its tensors on `device` (generator states stay on the CPU)."""
        best = self.best
        if best is not None:
            best = dataclasses.replace(best, images=best.images.to(device), labels=best.labels.to(device))
        return dataclasses.replace(self, images=self.images.to(device), labels=self.labels.to(device),
                                   images_velocity=self.images_velocity.to(device), best=best)


def _rank_seed(seed: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, 0x5EED, rank]).generate_state(1, np.uint32)[0])


def initial_state(cfg: DistillConfig, prepared: Prepared, generator: torch.Generator,
                  pool: torch.Tensor | None = None) -> State:
    """Images from random real images of each class drawn from the training indices `pool`
    (default: all) or noise, hard class-major labels, α = lr_init."""
    m = prepared.meta
    n = cfg.ipc * m.num_classes
    labels = torch.arange(m.num_classes).repeat_interleave(cfg.ipc)
    device = prepared.train_x.device
    if cfg.pix_init == "noise":
        images = torch.randn(n, m.channels, m.height, m.width, generator=generator)
    else:
        y = prepared.train_y if pool is None else prepared.train_y[pool.to(device)]
        picks = sample_per_class(y, m.num_classes, cfg.ipc, generator)
        if pool is not None:
            picks = pool.cpu()[picks]
        images = prepared.train_x[picks.to(device)]
    images = images.to(device)
    return State(images=images, labels=labels.to(device), alpha=cfg.lr_init,
                 images_velocity=torch.zeros_like(images), alpha_velocity=0.0, iteration=0,
                 generators=[], queues=[])


class Distiller:
    """Runs the loop; `step()` does one iteration on this rank's share of the work."""

    def __init__(self, cfg: DistillConfig, spec: ModelSpec, source: ExpertSource, prepared: Prepared,
                 state: State, generator: torch.Generator) -> None:
        self.cfg, self.source, self.prepared, self.state = cfg, source, prepared, state
        self.generator = generator
        self.device = prepared.train_x.device
        self.net = FlatNet(build_model(spec, seed=0).to(self.device))
        self.dsa = DSA(cfg.augment, flip=prepared.meta.flip) if cfg.augment != "none" else None
        self.queue: list[int] = []
        self.mode = "unrolled" if cfg.method == "mtt" else cfg.grad
        self.micro_batch: int | None = None  # set by `choose_micro_batch`
        self.second_order = second_order_policy(cfg, self.device)
        if cfg.max_start_epoch >= source.K:
            raise UsageError(
                f"--max-start-epoch {cfg.max_start_epoch:g} must be below the experts' K = {source.K}: pass "
                f"--max-start-epoch {max(source.K - 1, 0)} or less, or train experts with --epochs "
                f"{int(cfg.max_start_epoch) + 1} or more"
            )
        if cfg.method == "mtt" and (cfg.expert_epochs != int(cfg.expert_epochs)):
            raise UsageError("--method mtt matches integer epochs: --expert-epochs must be a whole number")

    def next_expert(self) -> int:
        """Experts without replacement, in shuffled passes."""
        if not self.queue:
            order = torch.randperm(len(self.source.indices), generator=self.generator).tolist()
            self.queue = [int(self.source.indices[i]) for i in order]
        return self.queue.pop()

    def sample_positions(self) -> tuple[float, float]:
        """Start c ~ U(0, max_start_epoch) (integer with --discrete or MTT); target clamped to K."""
        cfg = self.cfg
        if cfg.discrete or cfg.method == "mtt":
            start = float(torch.randint(0, max(1, int(cfg.max_start_epoch)), (1,), generator=self.generator))
        else:
            start = float(torch.rand((), generator=self.generator, dtype=torch.float64)) * cfg.max_start_epoch
        return start, min(start + cfg.expert_epochs, float(self.source.K))

    def batches(self) -> list[torch.Tensor]:
        """Index batches for the inner steps: consecutive chunks of fresh permutations."""
        n = self.state.images.shape[0]
        size = self.cfg.batch_syn or n
        out: list[torch.Tensor] = []
        chunks: list[torch.Tensor] = []
        for _ in range(self.cfg.syn_steps):
            if not chunks:
                chunks = list(torch.randperm(n, generator=self.generator).split(size))
            out.append(chunks.pop().to(self.device))
        return out

    def augmentation(self, batches: list[torch.Tensor]) -> StepAugment | None:
        """Pre-sampled DSA params per inner step, so both passes (and every micro-batch) see the
        same augmentation."""
        if self.dsa is None:
            return None
        _, _, h, w = self.state.images.shape
        params: list[AugParams] = [self.dsa.sample(int(b.numel()), h, w, self.generator).to(self.device)
                                   for b in batches]
        return StepAugment(self.dsa, params)

    def soft_labels(self, expert: Expert) -> torch.Tensor:
        """The expert's predictions at max_start_epoch on the current images (method.md §6.5)."""
        with torch.no_grad():
            theta = expert.at(min(self.cfg.max_start_epoch, float(expert.K)))
            return F.softmax(chunked_forward(self.net, theta, self.state.images, self.micro_batch), dim=1)

    def step(self) -> MatchResult | None:
        """One iteration's loss and gradients on this rank (None for a degenerate draw)."""
        expert = self.source.load(self.next_expert())
        start, target = self.sample_positions()
        theta_s, theta_t = expert.at(start), expert.at(target)
        labels = self.soft_labels(expert) if self.cfg.soft_labels else self.state.labels
        if self.cfg.soft_labels:
            self.state.labels = labels
        batches = self.batches()
        augment = self.augmentation(batches)
        if torch.equal(theta_s, theta_t):  # an expert that did not move: nothing to match
            return None
        return match(self.net, self.state.images, labels, theta_s, theta_t, self.state.alpha, batches, augment,
                     self.mode, fast_path=self.second_order, micro_batch=self.micro_batch)

    def apply_update(self, grad_images: torch.Tensor, grad_alpha: float) -> bool:
        """SGD with momentum on the images (in the configured step units) and on α; α is kept
        positive (never below half its value). Returns False — and changes nothing — when the
        step would leave the bounds (non-finite, images beyond ±IMAGE_BOUND, α beyond
        ALPHA_BOUND × lr_init)."""
        s, cfg = self.state, self.cfg
        velocity = s.images_velocity * cfg.momentum_img + grad_images * cfg.image_grad_scale
        images = s.images - cfg.lr_img * velocity
        alpha_velocity = cfg.momentum_lr * s.alpha_velocity + grad_alpha
        alpha = s.alpha - cfg.lr_lr * alpha_velocity
        if not alpha > 0.5 * s.alpha:  # also catches NaN
            # A step that would halve α or flip its sign overshoots: damp it and reset momentum.
            alpha, alpha_velocity = 0.5 * s.alpha, 0.0
        bound = float(images.abs().max()) if images.numel() else 0.0
        if not (math.isfinite(bound) and bound <= IMAGE_BOUND and alpha <= ALPHA_BOUND * cfg.lr_init):
            return False
        s.images, s.images_velocity, s.alpha, s.alpha_velocity = images, velocity, alpha, alpha_velocity
        return True


def second_order_policy(cfg: DistillConfig, device: torch.device) -> str:
    """The second-order implementation policy for this device (see the `second_order` setting)."""
    if cfg.second_order == "auto" and device.type == "cpu":
        return "fastgrad"  # falls back to autograd for networks the sweep does not handle
    return cfg.second_order


def workload(cfg: DistillConfig, buffer: store.Buffer, data_bytes: int) -> Any:
    """The memory model's description of one iteration of this run."""
    from mctool.memory import Workload

    n = cfg.ipc * buffer.data.num_classes
    vectors = len(buffer.convex.meta.positions) if cfg.method == "mct" else buffer.require_experts().epochs + 1
    return Workload(n_images=n, batch=cfg.batch_syn or n, syn_steps=cfg.syn_steps,
                    num_classes=buffer.data.num_classes, soft_labels=cfg.soft_labels, expert_vectors=vectors,
                    data_bytes=data_bytes)


def choose_micro_batch(d: "Distiller", cfg: DistillConfig, buffer: store.Buffer, stored: dict[str, Any],
                       reporter: Reporter) -> int | None:
    """The images per chunk of every inner step (None: whole steps), from `--micro-batch`; a
    resumed `auto` run keeps the value its start chose (results must continue bit for bit)."""
    from mctool.memory import auto_micro_batch, profile_network

    n = d.state.images.shape[0]
    batch = cfg.batch_syn or n
    if cfg.micro_batch == "auto":
        if "micro_batch" in stored:
            size = int(stored["micro_batch"]) or None
        else:
            profile = profile_network(d.net.module, tuple(d.state.images.shape[1:]))
            choice = auto_micro_batch(profile, workload(cfg, buffer, 0), d.mode, d.device, resident_loaded=True,
                                      impl="fastgrad" if d.second_order == "fastgrad" else "auto")
            size = choice.micro_batch if choice.micro_batch < batch else None
            if size is not None or not choice.fits:
                reporter.log(f"micro-batch: {choice.why}")
    else:
        size = int(cfg.micro_batch) or None
    if size is not None and size >= batch:
        size = None
    if size is not None:
        why = sample_coupling(d.net.module)
        if why is not None:
            raise UsageError(f"--micro-batch {cfg.micro_batch}: the network mixes samples ({why}), so an inner step "
                             "is not the sum of its chunks; use --micro-batch 0")
    return size


# --------------------------------------------------------------------------- checkpoints & output


def _synset(name: str, cfg: DistillConfig, state: State, final: bool, source: dict[str, Any],
            reference: dict[str, Any] | None) -> store.Synset:
    checkpoint = store.Checkpoint(images_velocity=state.images_velocity, alpha_velocity=state.alpha_velocity,
                                  generators=state.generators, queues=state.queues, run=state.run)
    return store.Synset(name=name, images=state.images, labels=state.labels, lr=state.alpha, ipc=cfg.ipc,
                        method=cfg.method, grad=cfg.grad, preset=cfg.preset, iterations=state.iteration,
                        complete=final, skipped=state.skipped, config=dataclasses.asdict(cfg),
                        evaluations=state.evaluations, experts_reference=reference, loss=state.losses,
                        source=source, checkpoint=checkpoint, best=state.best)


def _state_from(syn: store.Synset) -> State:
    assert syn.checkpoint is not None
    c = syn.checkpoint
    return State(images=syn.images, labels=syn.labels, alpha=syn.lr, images_velocity=c.images_velocity,
                 alpha_velocity=c.alpha_velocity, iteration=syn.iterations, generators=c.generators, queues=c.queues,
                 losses=list(syn.loss), skipped=syn.skipped, evaluations=list(syn.evaluations), best=syn.best,
                 run=dict(c.run))


@dataclass
class DistillResult:
    """What `mctool distill` did."""

    file: str
    synset: str
    iterations: int
    alpha: float
    loss_first: float | None
    loss_last_mean: float | None
    skipped_iterations: int
    evaluations: list[dict[str, Any]]
    seconds: float
    config: dict[str, Any]
    png: str | None = None
    best: dict[str, Any] | None = None  # iteration, lr, selected_on, score of the best images
    png_best: str | None = None
    notes: list[str] = field(default_factory=list)


class _Run:
    """One distillation's loop, checkpoints and periodic evaluations (rank-aware)."""

    def __init__(self, distiller: Distiller, cfg: DistillConfig, buffer: store.Buffer, out: Path, name: str,
                 reporter: Reporter, selection: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        self.d, self.cfg, self.buffer, self.out, self.name = distiller, cfg, buffer, out, name
        self.reporter, self.selection = reporter, selection
        self.source = buffer.source()
        ref = buffer.reference()
        self.reference = dataclasses.asdict(ref) if ref is not None else None

    def checkpoint(self, final: bool) -> None:
        state = self.d.state
        gens = dist.gather(self.d.generator.get_state())
        queues = dist.gather(list(self.d.queue))
        if gens is not None and queues is not None:
            state.generators, state.queues = gens, queues
        if dist.is_main():
            syn = _synset(self.name, self.cfg, state, final, self.source, self.reference)
            prov = store.provenance(dataclasses.asdict(self.cfg), self.cfg.seed, self.source)
            size = 3 * state.images.numel() * 4 + 8 * len(state.losses)
            store.ensure_free_space(self.out, size, f"saving {self.name}")
            store.save_synset(self.out, syn, self.buffer.data, self.buffer.spec, self.buffer.layout, prov, size)

    def evaluate(self) -> None:
        """Score the current images on the selection split; keep them if they are the best so far."""
        from mctool.evaluate import EvaluateConfig, evaluate_set

        state, cfg = self.d.state, self.cfg
        assert self.selection is not None
        ecfg = EvaluateConfig(runs=cfg.eval_runs, epochs=cfg.eval_epochs, seed=cfg.seed, augment=cfg.augment)
        ev = evaluate_set(state.images, state.labels, state.alpha, self.d.prepared, self.buffer.spec, ecfg,
                          "synset", self.reporter, score_on=self.selection, split=cfg.select_on,
                          stop_hint=f"checkpoint saved at iteration {state.iteration}; {_RESUME_HINT}")[0]
        ev.iteration = state.iteration
        state.evaluations.append(ev.to_dict())
        best = state.best
        better = best is None or ev.mean > float(best.score.get("mean", -1.0))
        self.reporter.log(f"iteration {state.iteration}: {ev.model} {cfg.select_on} accuracy {ev.mean:.4f}"
                          + (" (best so far)" if better else ""))
        if better:
            state.best = store.BestImages(images=state.images.clone(), labels=state.labels.clone(), lr=state.alpha,
                                          iteration=state.iteration, selected_on=cfg.select_on, score=ev.to_dict())

    def loop(self) -> float:
        """Run the remaining iterations; returns the seconds taken."""
        d, cfg, reporter = self.d, self.cfg, self.reporter
        state, device = d.state, d.device
        reporter.task("distill", f"distill {self.name}", total=cfg.iterations)
        reporter.update("distill", advance=state.iteration)
        started = last_save = time.perf_counter()
        first_iteration, bad_in_a_row, bad_here = state.iteration, 0, 0
        evaluating = cfg.eval_every > 0 and dist.is_main()
        try:
            while state.iteration < cfg.iterations:
                signum = reporter.should_stop()
                if dist.any_flag(bool(signum), device):
                    raise Interrupted(f"interrupted ({SIGNAL_NAMES.get(signum, 'by another process')}); checkpoint "
                                      f"saved at iteration {state.iteration}; {_RESUME_HINT}", signum or 15)
                if evaluating and state.iteration > first_iteration and state.iteration % cfg.eval_every == 0:
                    self.evaluate()
                if not self._iteration():
                    state.skipped += 1
                    bad_in_a_row, bad_here = bad_in_a_row + 1, bad_here + 1
                    if bad_in_a_row >= MAX_BAD_IN_A_ROW:
                        self._diverged(f"{MAX_BAD_IN_A_ROW} iterations in a row")
                else:
                    bad_in_a_row = 0
                state.iteration += 1
                due_time = cfg.checkpoint_minutes > 0 and time.perf_counter() - last_save >= 60 * cfg.checkpoint_minutes
                if state.iteration < cfg.iterations and (state.iteration % cfg.checkpoint_every == 0 or
                                                         dist.any_flag(due_time, device)):
                    self.checkpoint(final=False)
                    last_save = time.perf_counter()
        except (KeyboardInterrupt, Interrupted):
            reporter.done("distill")
            self.checkpoint(final=False)  # the state is whole: updates are applied all at once
            raise
        reporter.done("distill")
        ran = state.iteration - first_iteration
        if bad_here >= 2 and bad_here > MAX_BAD_FRACTION * ran:
            self._diverged(f"{bad_here} of {ran} iterations")
        if evaluating and ran > 0:
            self.evaluate()
        self.checkpoint(final=True)
        return time.perf_counter() - started

    def _iteration(self) -> bool:
        """One update; False when it was not applied (non-finite or out of bounds)."""
        d, state, device = self.d, self.d.state, self.d.device
        result = d.step()
        ok = result is not None and math.isfinite(result.loss) and math.isfinite(result.grad_alpha) \
            and bool(torch.isfinite(result.grad_images).all())
        if dist.any_flag(not ok, device):
            return False  # skipped on every rank: the images and α keep their last good values
        assert result is not None
        grad_images = dist.all_mean_(result.grad_images)
        ga = dist.all_mean_(torch.tensor([result.grad_alpha, result.loss], dtype=torch.float64, device=device))
        applied = d.apply_update(grad_images, float(ga[0]))
        if not applied:
            return False
        state.losses.append(float(ga[1]))
        recent = state.losses[-20:]
        self.reporter.update("distill", advance=1, loss=sum(recent) / len(recent), alpha=state.alpha)
        return True

    def _diverged(self, how: str) -> None:
        state = self.d.state
        self.checkpoint(final=False)
        raise TrainingDiverged(
            f"the distillation diverged: {how} gave a non-finite loss or gradient, or images beyond "
            f"±{IMAGE_BOUND:g} / a step size beyond {ALPHA_BOUND:g}× lr_init (last good state saved in "
            f"{store.shown(self.out)} at iteration {state.iteration}); try a smaller --lr-img or --lr-lr")


def _selection(cfg: DistillConfig, prepared: Prepared) -> tuple[tuple[torch.Tensor, torch.Tensor] | None,
                                                                 torch.Tensor | None]:
    """(the split periodic evaluations score on, the training indices distillation may use)."""
    if cfg.eval_every == 0:
        return None, None
    if cfg.select_on == "test":
        return (prepared.test_x, prepared.test_y), None
    size = cfg.val_size or auto_val_size(prepared.train_y.numel())
    keep, held = split_validation(prepared.train_y, prepared.meta.num_classes, size, cfg.seed)
    if held.numel() == 0:
        raise UsageError("--select-on validation needs a validation split, but the training split is too small; "
                         "use --val-size or --select-on test")
    held = held.to(prepared.train_x.device)
    return (prepared.train_x[held], prepared.train_y[held]), keep


def run_prepared(cfg: DistillConfig, buffer: store.Buffer, out: Path, prepared: Prepared, name: str | None = None,
                 resume: bool = False, reporter: Reporter = SILENT) -> DistillResult:
    """Distill (or resume) synset `name` of `out` from an open buffer and prepared data."""
    cfg.validate()
    check_buffer_matches(cfg, buffer)
    name = name or synset_name(cfg)
    check_synset_name(name)
    device = prepared.train_x.device
    notes: list[str] = []
    source = ExpertSource(buffer, cfg.method, device)
    if cfg.method == "mct" and len(source.positions) - 2 != cfg.interior:
        notes.append(f"note: the settings expect {cfg.interior} interior waypoint(s) but {store.shown(buffer.path)} "
                     f"has {len(source.positions) - 2} (positions {','.join(map(str, source.positions))}); using the "
                     "buffer's")
        reporter.log(notes[-1])
    if cfg.depth and buffer.spec.depth != cfg.depth:
        notes.append(f"note: the settings were made for depth-{cfg.depth} experts but {store.shown(buffer.path)} holds "
                     f"depth-{buffer.spec.depth} ones; using them as they are")
        reporter.log(notes[-1])
    selection, pool = _selection(cfg, prepared)
    if cfg.select_on != "test":
        prepared = dataclasses.replace(prepared, test_x=prepared.test_x[:0], test_y=prepared.test_y[:0])
    world, me = dist.world_size(), dist.rank()
    if resume:
        # Broadcast from the CPU: a pickled CUDA tensor unpickles onto rank 0's GPU on every rank.
        state = _load_state(out, name) if dist.is_main() else None
        state = dist.broadcast(state).to(device)
        if len(state.generators) != world:
            raise UsageError(f"{store.shown(out)}: the checkpoint was written by {len(state.generators)} process(es); "
                             f"resume with the same number (now {world})")
        if state.iteration >= cfg.iterations:
            raise UsageError(f"{store.shown(out)}: synset '{name}' is already at iteration {state.iteration}; "
                             f"raise --iterations above {state.iteration} to continue it")
        generator = torch.Generator().manual_seed(0)
        generator.set_state(state.generators[me])
    else:
        if out.exists() and dist.is_main():
            with store.open_synsets(out) as sf:
                if name in sf.names:
                    raise UsageError(f"{store.shown(out)}: already holds synset '{name}'; use --resume to continue "
                                     "it, --name for another, or another -o FILE")
        state = initial_state(cfg, prepared, torch.Generator().manual_seed(cfg.seed), pool)
        generator = torch.Generator().manual_seed(_rank_seed(cfg.seed, me))
        state.queues = [[] for _ in range(world)]
    distiller = Distiller(cfg, buffer.spec, source, prepared, state, generator)
    distiller.queue = (store.check_queue(out, name, state.queues[me], source.indices, buffer.path)
                       if state.queues else [])
    distiller.micro_batch = choose_micro_batch(distiller, cfg, buffer, state.run, reporter)
    state.run = {**state.run, "micro_batch": distiller.micro_batch or 0}
    run = _Run(distiller, cfg, buffer, out, name, reporter, selection)
    seconds = run.loop()
    best = None
    if state.best is not None:
        best = {"iteration": state.best.iteration, "lr": state.best.lr, "selected_on": state.best.selected_on,
                "score": state.best.score}
    recent = state.losses[-20:]
    return DistillResult(file=str(out), synset=name, iterations=state.iteration, alpha=state.alpha,
                         loss_first=state.losses[0] if state.losses else None,
                         loss_last_mean=sum(recent) / len(recent) if recent else None,
                         skipped_iterations=state.skipped, evaluations=state.evaluations, seconds=seconds,
                         config=dataclasses.asdict(cfg), best=best, notes=notes)


def _load_state(out: Path, name: str) -> State:
    with store.open_synsets(out) as sf:
        return _state_from(sf.read(sf.pick(name), checkpoint=True))


def stored_config(out: Path, name: str) -> dict[str, Any]:
    """The settings synset `name` of `out` was started with (for --resume)."""
    if not out.exists():
        raise UsageError(f"--resume: {store.shown(out)} does not exist (drop --resume to start a new run)")
    with store.open_synsets(out) as sf:
        return sf.read(sf.pick(name), values=False).config


@dataclass
class DryRunRow:
    """One gradient mode's estimated peak memory, whole steps and as `--micro-batch auto` would run."""

    mode: str
    whole_bytes: int
    whole_fits: bool | None  # None: free memory unknown
    micro_batch: int | None  # auto's choice (None: whole steps)
    chunked_bytes: int
    fits: bool
    why: str
    selected: bool  # the mode this run would use


@dataclass
class DryRunReport:
    """What `mctool distill --dry-run` prints: nothing is run or written."""

    buffer: str
    device: str
    free_bytes: int | None
    budget_fraction: float
    images: int
    batch: int
    syn_steps: int
    second_order: str
    rows: list[DryRunRow]
    notes: list[str]


def dry_run(preset: str | None, overrides: dict[str, Any], buffer: Path, device: str = "auto") -> DryRunReport:
    """Estimated peak memory of one iteration per gradient mode on this device, and the micro-batch
    `auto` would choose; reads only the buffer's metadata (no data, no experts' values)."""
    from mctool import memory
    from mctool.data import SHAPES, SPLIT_SIZES
    from mctool.device import resolve_device
    from mctool.models import build_model

    resolve_config(preset, overrides)
    if not buffer.exists():
        raise UsageError(missing_buffer_hint(buffer, None, False))
    dev = resolve_device(device)
    notes = []
    with store.open_buffer(buffer) as buf:
        cfg = resolve_config(preset, overrides, buf)
        check_buffer_matches(cfg, buf)
        split = SPLIT_SIZES.get(buf.data.name)
        if split is None:
            notes.append(f"the size of '{buf.data.name}' is not known before loading it: its train/test tensors on "
                         "the device are not counted")
            data = 0
        else:
            data = memory.split_bytes(*split, SHAPES[buf.data.name])
        work = workload(cfg, buf, data)
        with torch.device("meta"):
            module = build_model(buf.spec)
        profile = memory.profile_network(module, buf.data.image_shape)
    policy = second_order_policy(cfg, dev)
    impl = "fastgrad" if policy == "fastgrad" else "auto"
    selected = "unrolled" if cfg.method == "mtt" else cfg.grad
    rows = []
    for r in memory.dry_run(profile, work, dev, impl=impl):
        budget = r.auto.budget_bytes
        rows.append(DryRunRow(mode=r.mode, whole_bytes=r.whole.total_bytes,
                              whole_fits=None if budget is None else r.whole.total_bytes <= budget,
                              micro_batch=r.auto.micro_batch if r.auto.micro_batch < work.batch else None,
                              chunked_bytes=r.auto.estimate.total_bytes, fits=r.auto.fits, why=r.auto.why,
                              selected=r.mode == selected))
    if not memory.CALIBRATED.get(dev.type, False):
        notes.append(f"the memory model's {dev.type} factors are the CPU's until bench/memory.py has run on "
                     f"{dev.type}: estimates are rougher")
    free = memory.free_bytes(dev)
    return DryRunReport(buffer=str(buffer), device=str(dev), free_bytes=free,
                        budget_fraction=memory.DEFAULT_SAFETY.get(dev.type, 0.6), images=work.n_images,
                        batch=work.batch, syn_steps=cfg.syn_steps, second_order=policy, rows=rows, notes=notes)


def missing_buffer_hint(buffer: Path, dataset: str | None, default_buffer: bool) -> str:
    """What to run first when there is no buffer, sized for this machine (CPU: a small buffer)."""
    ds = dataset or "DATASET"
    other = " (or pass --buffer FILE)" if default_buffer else ""
    size = "--n 100" if torch.cuda.is_available() else "--n 2 --epochs 10 --width 32"
    where = "" if torch.cuda.is_available() else " (sized for a CPU; the paper's buffers are --n 100 on GPUs)"
    return (f"{store.shown(buffer)}: no such file — make experts first: `mctool experts {ds} {size} -o "
            f"{store.shown(buffer)}`{where} then `mctool convexify {store.shown(buffer)}`{other}")


def run(preset: str | None, overrides: dict[str, Any], buffer: Path, out: Path, name: str | None = None,
        resume: bool = False, data_dir: Path | None = None, device: str = "auto", default_buffer: bool = False,
        reporter: Reporter = SILENT) -> DistillResult | None:
    """`mctool distill`: settings from the preset, the buffer and the options; the data; the
    loop (under torchrun, one trajectory per process per iteration); the pictures. Under
    torchrun only rank 0 returns the result (the others None)."""
    from mctool.device import resolve_device
    from mctool.plots import best_title, synset_grid, synset_png_path
    from mctool.prepared import prepare_like

    if name is not None:
        check_synset_name(name)
    probe = resolve_config(preset, overrides)  # bad settings fail before any file is opened
    stored = stored_config(out, name or synset_name(probe)) if resume else None
    if not buffer.exists():
        raise UsageError(missing_buffer_hint(buffer, probe.dataset, default_buffer))
    store.check_writable(out)
    with store.open_buffer(buffer) as buf:
        cfg = resolve_config(preset, overrides, buf, stored)
        check_buffer_matches(cfg, buf)
        if cfg.method == "mct":
            buf.convex_experts()  # a buffer without /convex fails here, before the data is prepared
        dev = resolve_device(device)
        dist.init_from_env(dev)
        if not dist.is_main():
            reporter = Muted(reporter)
        note = None
        if preset is None and stored is None:
            note = buffer_note(buf, cfg, {k for k, v in overrides.items() if v is not None})
            reporter.log(note)
        prepared = prepare_like(buf.data, data_dir, dev, reporter)
        # The writer (rank 0) holds `out` for the whole run: another mctool's write (evaluate storing
        # scores) is refused with one line instead of being erased by the next checkpoint.
        with store.holding(out) if dist.is_main() else contextlib.nullcontext():
            result = run_prepared(cfg, buf, out, prepared, name=name or synset_name(cfg), resume=resume,
                                  reporter=reporter)
        if note is not None:
            result.notes.insert(0, note)
        main = dist.is_main()
        dist.shutdown()
    if main:
        with store.open_synsets(out) as sf:
            syn = sf.read(result.synset)
        png = synset_png_path(out, result.synset)
        result.png = str(synset_grid(syn.images, prepared.prep, cfg.ipc, png))
        if syn.best is not None:
            result.png_best = str(synset_grid(syn.best.images, prepared.prep, cfg.ipc,
                                              png.with_name(f"{png.stem}-best.png"), best_title(syn.best)))
    return result if main else None
