"""The distillation loop's iteration: experts, sampled positions and batches, the match and the update.

Per iteration (method.md §6): draw the next expert (shuffled passes without replacement),
sample a real start c ~ U(0, max_start_epoch), target min(c + expert_epochs, K), rebuild
θ_start and θ_target with ConvexTrajectory.at, run `syn_steps` SGD steps of the functional
ConvNet on DSA-augmented synthetic mini-batches with the learnable step size α, and update
the images and α from the matching loss (gradient mode: mctool.matching.loss). `--method mtt`
matches raw trajectories at integer epochs with the exact unrolled gradient (MTT).

Step units: the released MCT code applies half the image gradient its formula states (a
tuple multiplied by 2, method.md §6.6), and Table A's `lr_img` was tuned with that. With
`step_units = "released"` (the default) every `--grad` mode of `--method mct` takes image
steps in those units — `constant` then applies exactly the released code's update — so
switching `--grad` changes the direction and exactness of the gradient, never the meaning of
`--lr-img`. `"exact"` applies the gradients as the formulas state them (what mctool 0.1 did);
`--method mtt` always uses MTT's exact gradient, which its released code applies as is.

All randomness comes from CPU torch.Generators whose states are checkpointed, so a resumed
run continues exactly where an uninterrupted one would be.
"""

from __future__ import annotations

import math
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from mctool import store
from mctool.data.augment import DSA, AugParams, StepAugment
from mctool.distill.config import DistillConfig
from mctool.distill.learnables import Value, averaged, ema_update, learned_in, step
from mctool.distill.sizes import check_epochs, shape_of_buffer
from mctool.distill.sizes import workload as shape_workload
from mctool.distill.state import State
from mctool.core.errors import UsageError
from mctool.models.functional import FlatNet
from mctool.matching.loss import MatchResult, match
from mctool.matching.microbatch import chunked_forward, sample_coupling
from mctool.models import ModelSpec, build_model
from mctool.data.prepared import Prepared
from mctool.core.progress import Reporter
from mctool.convexify.trajectory import ConvexTrajectory

# Divergence (docs/method.md, "Robustness"): an update whose loss, gradient or learnable is
# non-finite or beyond its bound (mctool.distill.learnables) is not applied; too many such
# iterations end the run.
MAX_BAD_IN_A_ROW = 10
MAX_BAD_FRACTION = 0.25


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
        check_epochs(cfg, source.K)
        if cfg.method == "mtt" and (cfg.expert_epochs != int(cfg.expert_epochs)):
            raise UsageError("--method mtt matches integer epochs: --expert-epochs must be a whole number")

    def next_expert(self) -> int:
        """Experts without replacement, in shuffled passes."""
        if not self.queue:
            order = torch.randperm(len(self.source.indices), generator=self.generator).tolist()
            self.queue = [int(self.source.indices[i]) for i in order]
        return self.queue.pop()

    def sample_positions(self) -> tuple[float, float]:
        """Start c ~ U(lo, hi), the sampling window at this iteration (`start_window`; by default
        U(0, max_start_epoch)), an integer in [⌈lo⌉, hi) with --discrete or MTT; target clamped to K."""
        cfg = self.cfg
        lo, hi = start_window(cfg, self.state.iteration)
        if cfg.discrete or cfg.method == "mtt":
            first = math.ceil(lo)
            start = float(torch.randint(first, max(first + 1, int(hi)), (1,), generator=self.generator))
        else:
            start = lo + float(torch.rand((), generator=self.generator, dtype=torch.float64)) * (hi - lo)
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
        logits = self.state.values.get("labels") if self.cfg.learn_labels else None
        return match(self.net, self.state.images, labels, theta_s, theta_t, self.state.alpha, batches, augment,
                     self.mode, fast_path=self.second_order, micro_batch=self.micro_batch,
                     label_logits=logits)  # type: ignore[arg-type]

    def apply_update(self, grads: dict[str, Value]) -> bool:
        """SGD with momentum on every learnable (mctool.distill.learnables: the images in the
        configured step units, α kept positive, never below half its value). Returns False — and
        changes nothing — when a step would leave its bounds (non-finite, images beyond
        ±IMAGE_BOUND, α beyond ALPHA_BOUND × lr_init)."""
        s = self.state
        stepped = {}
        for entry in learned_in(self.cfg):
            out = step(entry, self.cfg, s.values[entry.name], s.velocities[entry.name], grads[entry.name],
                       s.backoffs)
            if out is None:
                return False
            stepped[entry.name] = out
        for name, (value, velocity) in stepped.items():
            s.values[name], s.velocities[name] = value, velocity
        for entry in learned_in(self.cfg):
            if averaged(entry, self.cfg):
                s.averages[entry.name] = ema_update(s.averages[entry.name], s.values[entry.name], self.cfg.ema)
        s.sync_labels()  # learned labels: the stored probabilities follow the logits
        return True


def start_window(cfg: DistillConfig, iteration: int) -> tuple[float, float]:
    """The sampling window [lo, hi) start epochs are drawn from at `iteration` (DATM's
    difficulty-aligned windows): lo = --min-start-epoch; hi grows linearly from
    --start-upper-init at iteration 0 to --max-start-epoch at --start-upper-iterations, then stays.
    A pure function of the iteration, so a resumed run samples as an uninterrupted one.
    Defaults: [0, max_start_epoch) throughout (MCT)."""
    hi = cfg.max_start_epoch
    if cfg.start_upper_init > 0:
        grown = min(iteration / cfg.start_upper_iterations, 1.0)
        hi = cfg.start_upper_init + (cfg.max_start_epoch - cfg.start_upper_init) * grown
    return cfg.min_start_epoch, hi


def second_order_policy(cfg: DistillConfig, device: torch.device) -> str:
    """The second-order implementation policy for this device (see the `second_order` setting)."""
    if cfg.second_order == "auto" and device.type == "cpu":
        return "fastgrad"  # falls back to autograd for networks the sweep does not handle
    return cfg.second_order


def workload(cfg: DistillConfig, buffer: store.Buffer, data_bytes: int) -> Any:
    """The memory model's description of one iteration of this run (mctool.distill.sizes, which the
    checks before allocating and --dry-run use too)."""
    return shape_workload(cfg, dataclasses.replace(shape_of_buffer(cfg, buffer), data_bytes=data_bytes))


def choose_micro_batch(d: "Distiller", cfg: DistillConfig, buffer: store.Buffer, stored: dict[str, Any],
                       reporter: Reporter) -> int | None:
    """The images per chunk of every inner step (None: whole steps), from `--micro-batch`; a
    resumed `auto` run keeps the value its start chose (results must continue bit for bit)."""
    from mctool.matching.memory import auto_micro_batch, profile_network

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
