"""MCT distillation: learn synthetic images by matching convexified expert trajectories.

Per iteration (method.md §6): draw the next expert (shuffled passes without replacement),
sample a real start c ~ U(0, max_start_epoch), target min(c + expert_epochs, K), rebuild
θ_start and θ_target with ConvexTrajectory.at, run `syn_steps` SGD steps of the functional
ConvNet on DSA-augmented synthetic mini-batches with the learnable step size α, and update
the images and α from the matching loss (gradient mode: mctool.matching). `--method mtt`
matches raw trajectories at integer epochs with the exact unrolled gradient (MTT).

All randomness comes from CPU torch.Generators whose states are checkpointed, so a resumed
run continues exactly where an uninterrupted one would be.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from mctool import artifact
from mctool import distributed as dist
from mctool.augment import DEFAULT_STRATEGY, DSA, AugParams
from mctool.errors import MctoolError, TrainingDiverged, UsageError
from mctool.functional import FlatNet
from mctool.matching import MODES, match
from mctool.nets import ModelSpec, build_model
from mctool.prepared import Prepared, sample_per_class
from mctool.progress import SILENT, Reporter
from mctool.trajectory import ConvexTrajectory

# Consecutive non-finite iterations after which the run stops (the last good state is saved).
MAX_BAD_ITERATIONS = 10


@dataclass(frozen=True)
class DistillConfig:
    """Every setting of a distillation run (presets fill it, options override, the artifact stores it)."""

    dataset: str | None = None
    ipc: int = 10
    syn_steps: int = 20
    expert_epochs: float = 3.0
    max_start_epoch: float = 25.0
    lr_img: float = 1000.0
    lr_lr: float = 1e-5
    lr_init: float = 0.01
    iterations: int = 5000
    batch_syn: int = 0  # 0: all images in every inner step
    zca: bool = True
    interior: int = 2
    method: str = "mct"
    grad: str = "constant"
    discrete: bool = False
    pix_init: str = "real"
    soft_labels: bool = False
    augment: str = DEFAULT_STRATEGY
    momentum_img: float = 0.5
    momentum_lr: float = 0.5
    checkpoint_every: int = 100
    eval_every: int = 0
    eval_runs: int = 1
    eval_epochs: int = 300
    seed: int = 0
    preset: str = ""

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
            ("method", self.method in ("mct", "mtt"), "mct or mtt"),
            ("grad", self.grad in MODES, f"one of {', '.join(MODES)}"),
            ("pix_init", self.pix_init in ("real", "noise"), "real or noise"),
            ("checkpoint_every", self.checkpoint_every >= 1, ">= 1"),
            ("eval_every", self.eval_every >= 0, ">= 0 (0 = never)"),
            ("eval_runs", self.eval_runs >= 1, ">= 1"),
            ("eval_epochs", self.eval_epochs >= 1, ">= 1"),
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
            raise UsageError(f"--{OPTION_NAMES.get(key, key.replace('_', '-'))} {why}")


# Settings whose option is not the key in kebab case.
OPTION_NAMES = {"pix_init": "init"}


def check_synset_name(name: str) -> None:
    """A synset name becomes an HDF5 group name under /synsets: no paths, no empty names."""
    if not name or "/" in name or name in (".", ".."):
        raise UsageError(f"--name {name!r}: a synset name may not be empty, '.' or '..', or contain '/'")


def config_from_preset(preset: str | None, overrides: dict[str, Any]) -> DistillConfig:
    """DistillConfig from its defaults <- the preset's values <- `overrides` that are not None."""
    from mctool.presets import load_preset

    values: dict[str, Any] = {}
    if preset:
        p = load_preset(preset)
        values.update({k: v for k, v in p.values.items() if k not in ("source", "description")})
        values["preset"] = p.name
    values.update({k: v for k, v in overrides.items() if v is not None})
    fields = {f.name for f in dataclasses.fields(DistillConfig)}
    cfg = DistillConfig(**{k: v for k, v in values.items() if k in fields})
    found = cfg.problem()
    if preset and found is not None and overrides.get(found[0]) is None and found[0] in p.values:
        raise UsageError(f"{p.path}: {found[0]} {found[1]}")  # the preset's value, not an option's
    return cfg


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
    """Reads experts from a buffer: waypoints + β (/convex) or raw trajectories (/experts)."""

    def __init__(self, path: Path, method: str, device: torch.device) -> None:
        self.path, self.method, self.device = path, method, device
        self.file = h5py.File(path, "r")  # validated by the caller via open_artifact
        _, layout = artifact.read_model(path, self.file)
        self.layer_sizes = artifact.layer_sizes(layout)
        if method == "mct":
            meta = artifact.read_convex(path, self.file)
            self.positions = list(meta.positions)
            self.indices = artifact.convex_experts(path, self.file)
            self.K = self.positions[-1]
        else:
            self.indices = artifact.done_experts(path, self.file)
            if "trajectories" not in self.file["experts"]:
                raise UsageError(f"{path}: --method mtt needs full trajectories; this buffer holds only "
                                 "convexified ones")
            self.K = int(self.file["experts/trajectories"].shape[1]) - 1

    def load(self, e: int) -> Expert:
        """Expert `e` (an index into the buffer's rows), on the device."""
        if self.method == "mct":
            w, b = artifact.read_convex_expert(self.file, e)
            traj = ConvexTrajectory(w, b, self.positions, self.layer_sizes).to(self.device)
            return Expert(e, self.K, convex=traj)
        rows = self.file["experts/trajectories"]
        return Expert(e, self.K, raw=lambda k: torch.from_numpy(rows[e, k]).to(self.device))

    def close(self) -> None:
        """Close the buffer file."""
        self.file.close()


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

    def to(self, device: torch.device) -> "State":
        """The same state with its tensors on `device` (generator states stay on the CPU)."""
        return dataclasses.replace(self, images=self.images.to(device), labels=self.labels.to(device),
                                   images_velocity=self.images_velocity.to(device))


def _rank_seed(seed: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, 0x5EED, rank]).generate_state(1, np.uint32)[0])


def initial_state(cfg: DistillConfig, prepared: Prepared, generator: torch.Generator) -> State:
    """Images from random real images of each class (or noise), hard class-major labels, α = lr_init."""
    m = prepared.meta
    n = cfg.ipc * m.num_classes
    labels = torch.arange(m.num_classes).repeat_interleave(cfg.ipc)
    if cfg.pix_init == "noise":
        images = torch.randn(n, m.channels, m.height, m.width, generator=generator)
    else:
        picks = sample_per_class(prepared.train_y, m.num_classes, cfg.ipc, generator)
        images = prepared.train_x[picks.to(prepared.train_x.device)]
    device = prepared.train_x.device
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

    def augmentation(self, batches: list[torch.Tensor]) -> Callable[[torch.Tensor, int], torch.Tensor] | None:
        """Pre-sampled DSA params per inner step, so both passes see the same augmentation."""
        if self.dsa is None:
            return None
        _, _, h, w = self.state.images.shape
        params: list[AugParams] = [self.dsa.sample(int(b.numel()), h, w, self.generator).to(self.device)
                                   for b in batches]
        dsa = self.dsa
        return lambda x, k: dsa.apply(x, params[k])

    def soft_labels(self, expert: Expert) -> torch.Tensor:
        """The expert's predictions at max_start_epoch on the current images (method.md §6.5)."""
        with torch.no_grad():
            theta = expert.at(min(self.cfg.max_start_epoch, float(expert.K)))
            return F.softmax(self.net(theta, self.state.images), dim=1)

    def step(self) -> tuple[float, torch.Tensor, float] | None:
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
        r = match(self.net, self.state.images, labels, theta_s, theta_t, self.state.alpha, batches, augment,
                  self.mode)
        return r.loss, r.grad_images, r.grad_alpha

    def apply_update(self, grad_images: torch.Tensor, grad_alpha: float) -> None:
        """SGD with momentum on the images and on α; α is kept positive (never below half its value)."""
        s, cfg = self.state, self.cfg
        s.images_velocity.mul_(cfg.momentum_img).add_(grad_images)
        s.images.sub_(cfg.lr_img * s.images_velocity)
        s.alpha_velocity = cfg.momentum_lr * s.alpha_velocity + grad_alpha
        proposed = s.alpha - cfg.lr_lr * s.alpha_velocity
        if not proposed > 0.5 * s.alpha:  # also catches NaN
            # A step that would halve α or flip its sign overshoots: damp it and reset momentum.
            proposed, s.alpha_velocity = 0.5 * s.alpha, 0.0
        s.alpha = proposed


class StopFlag:
    """Ctrl-C sets a flag checked between iterations, so a checkpoint is never half an update.

    A second Ctrl-C interrupts at once. Outside the main thread this does nothing.
    """

    def __init__(self) -> None:
        self.raised = False
        self._old: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        if self.raised:
            raise KeyboardInterrupt
        self.raised = True

    def __enter__(self) -> "StopFlag":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        import signal

        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


# --------------------------------------------------------------------------- checkpoints & output


def synset_name(cfg: DistillConfig) -> str:
    """Default synset name: the preset's name, else method-ipcN."""
    return cfg.preset or f"{cfg.method}-ipc{cfg.ipc}"


def save(out: Path, name: str, cfg: DistillConfig, state: State, source_info: dict[str, Any],
         buffer: Path, final: bool) -> None:
    """Write the synset and its checkpoint atomically (the previous file survives any failure)."""
    artifact.ensure_free_space(out, 3 * state.images.numel() * 4 + 8 * len(state.losses), f"saving {name}")
    with artifact.atomic_write(out, copy_existing=out.exists()) as f:
        with artifact.open_artifact(buffer) as src:
            for g in ("dataset", "model"):
                if g not in f:
                    src.copy(src[g], f, name=g)
        root = f.require_group("synsets")
        if name in root:
            del root[name]
        g = root.create_group(name)
        artifact.write_tensor(g, "images", state.images.float())
        artifact.write_tensor(g, "labels", state.labels)
        artifact.write_tensor(g, "loss", torch.tensor(state.losses, dtype=torch.float32))
        g.attrs.update(artifact.provenance(dataclasses.asdict(cfg), cfg.seed, source_info))
        g.attrs.update({"lr": state.alpha, "ipc": cfg.ipc, "method": cfg.method, "preset": cfg.preset,
                        "iterations": state.iteration, "skipped_iterations": state.skipped,
                        "complete": final, "grad": cfg.grad})
        g.attrs["evaluations"] = json.dumps(state.evaluations)
        g.attrs["experts_reference"] = json.dumps(source_info.get("experts_reference"))
        c = g.create_group("checkpoint")
        artifact.write_tensor(c, "images_velocity", state.images_velocity)
        artifact.write_tensor(c, "generators", torch.stack(state.generators))
        c.attrs["alpha_velocity"] = state.alpha_velocity
        c.attrs["queues"] = json.dumps(state.queues)
        c.attrs["world_size"] = len(state.generators)


def load_checkpoint(out: Path, name: str, cfg: DistillConfig) -> State:
    """The state saved in `out` for synset `name`, on the CPU; refuses when the settings differ."""
    with artifact.open_artifact(out) as f:
        g = artifact.pick_synset(out, f, name)
        if "checkpoint" not in g:
            raise UsageError(f"{out}: synset '{name}' has no checkpoint to resume from")
        stored = artifact.json_attr(g, "config", {})
        mine = json.loads(json.dumps(dataclasses.asdict(cfg)))
        ignore = {"iterations", "checkpoint_every", "eval_every", "eval_runs", "eval_epochs"}
        diff = [k for k in mine if k not in ignore and stored.get(k) != mine[k]]
        if diff:
            raise UsageError(f"{out}: cannot resume '{name}' with different settings: "
                             + ", ".join(f"{k}={stored.get(k)!r} (now {mine[k]!r})" for k in diff[:4]))
        c = g["checkpoint"]
        return State(
            images=torch.from_numpy(g["images"][()]), labels=torch.from_numpy(g["labels"][()]),
            alpha=float(g.attrs["lr"]), images_velocity=torch.from_numpy(c["images_velocity"][()]),
            alpha_velocity=float(c.attrs["alpha_velocity"]), iteration=int(g.attrs["iterations"]),
            generators=[torch.from_numpy(s) for s in c["generators"][()]],
            queues=json.loads(artifact.str_attr(c, "queues")),
            losses=[float(v) for v in g["loss"][()]], skipped=int(g.attrs.get("skipped_iterations", 0)),
            evaluations=artifact.json_attr(g, "evaluations", []),
        )


def experts_reference(f: h5py.File) -> dict[str, Any] | None:
    """The experts' own final test accuracy: the whole-dataset reference for evaluations."""
    if "experts/test_accuracy" not in f or "experts/done" not in f:
        return None
    idx = np.flatnonzero(f["experts/done"][()])
    if idx.size == 0:
        return None
    acc = f["experts/test_accuracy"][()][idx, -1]
    return {"mean": float(acc.mean()), "std": float(acc.std()), "experts": int(idx.size),
            "epochs": int(f["experts/test_accuracy"].shape[1]) - 1}


def check_buffer_matches(cfg: DistillConfig, meta: artifact.DatasetMeta, buffer: Path) -> None:
    """A preset for another dataset, or another preprocessing, cannot use this buffer."""
    if cfg.dataset and cfg.dataset != meta.name:
        raise UsageError(f"{buffer}: holds experts for '{meta.name}' but the preset is for '{cfg.dataset}'")
    if cfg.zca != meta.zca:
        raise UsageError(f"{buffer}: experts were trained {'with' if meta.zca else 'without'} ZCA but the "
                         f"settings ask {'for' if cfg.zca else 'against'} it (--zca/--no-zca)")


def run(cfg: DistillConfig, buffer: Path, out: Path, prepared: Prepared, name: str | None = None,
        resume: bool = False, reporter: Reporter = SILENT,
        evaluate: Callable[[State], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Distill (or resume) synset `name` into `out`; returns a summary. Saves on Ctrl-C."""
    cfg.validate()
    name = name or synset_name(cfg)
    check_synset_name(name)
    device = prepared.train_x.device
    with artifact.open_artifact(buffer) as f:
        spec, _ = artifact.read_model(buffer, f)
        source_info = artifact.fingerprint(buffer, f)
        source_info["experts_reference"] = experts_reference(f)
    source = ExpertSource(buffer, cfg.method, device)
    if cfg.method == "mct" and len(source.positions) - 2 != cfg.interior:
        reporter.log(f"note: the settings expect {cfg.interior} interior waypoint(s) but {buffer} has "
                     f"{len(source.positions) - 2} (positions {','.join(map(str, source.positions))}); "
                     "using the buffer's")
    world, me = dist.world_size(), dist.rank()
    try:
        if resume:
            # Broadcast from the CPU: a pickled CUDA tensor unpickles onto rank 0's GPU on every rank.
            state = load_checkpoint(out, name, cfg) if dist.is_main() else None
            state = dist.broadcast(state).to(device)
            if len(state.generators) != world:
                raise UsageError(f"{out}: the checkpoint was written by {len(state.generators)} process(es); "
                                 f"resume with the same number (now {world})")
            if state.iteration >= cfg.iterations:
                raise UsageError(f"{out}: synset '{name}' is already at iteration {state.iteration}; "
                                 f"raise --iterations above {state.iteration} to continue it")
            generator = torch.Generator().manual_seed(0)
            generator.set_state(state.generators[me])
        else:
            if out.exists() and dist.is_main():
                with artifact.open_artifact(out) as f:
                    if name in artifact.synset_names(f):
                        raise UsageError(f"{out}: already holds synset '{name}'; use --resume to continue it, "
                                         "--name for another, or another -o FILE")
            init_gen = torch.Generator().manual_seed(cfg.seed)
            state = initial_state(cfg, prepared, init_gen)
            generator = torch.Generator().manual_seed(_rank_seed(cfg.seed, me))
            state.queues = [[] for _ in range(world)]
        distiller = Distiller(cfg, spec, source, prepared, state, generator)
        distiller.queue = list(state.queues[me]) if state.queues else []
        return _loop(distiller, cfg, buffer, out, name, source_info, reporter, evaluate)
    finally:
        source.close()


def _collect(distiller: Distiller) -> None:
    """Gather every rank's generator state and expert queue into the (rank 0) state."""
    gens = dist.gather(distiller.generator.get_state())
    queues = dist.gather(list(distiller.queue))
    if gens is not None and queues is not None:
        distiller.state.generators, distiller.state.queues = gens, queues


def _loop(distiller: Distiller, cfg: DistillConfig, buffer: Path, out: Path, name: str,
          source_info: dict[str, Any], reporter: Reporter,
          evaluate: Callable[[State], dict[str, Any]] | None) -> dict[str, Any]:
    state = distiller.state
    device = distiller.device
    reporter.task("distill", f"distill {name}", total=cfg.iterations)
    reporter.update("distill", advance=state.iteration)
    started, first_iteration = time.perf_counter(), state.iteration
    bad_in_a_row = 0
    interrupted = False
    stop = StopFlag()

    def checkpoint(final: bool) -> None:
        _collect(distiller)
        if dist.is_main():
            save(out, name, cfg, state, source_info, buffer, final)

    try:
        with stop:
            while state.iteration < cfg.iterations and not dist.any_flag(stop.raised, device):
                if cfg.eval_every and evaluate is not None and state.iteration % cfg.eval_every == 0 \
                        and state.iteration > 0 and dist.is_main():
                    state.evaluations.append(evaluate(state))
                result = distiller.step()
                ok = result is not None and math.isfinite(result[0]) and math.isfinite(result[2]) \
                    and bool(torch.isfinite(result[1]).all())
                if dist.any_flag(not ok, device):
                    # Skip this update on every rank: the images and α stay at their last good values.
                    state.skipped += 1
                    bad_in_a_row += 1
                    if bad_in_a_row >= MAX_BAD_ITERATIONS:
                        checkpoint(final=False)
                        raise TrainingDiverged(
                            f"{MAX_BAD_ITERATIONS} iterations in a row gave a non-finite loss or gradient "
                            f"(last good state saved in {out} at iteration {state.iteration}); try a smaller --lr-img")
                    state.iteration += 1
                    continue
                bad_in_a_row = 0
                assert result is not None
                loss, grad_images, grad_alpha = result
                grad_images = dist.all_mean_(grad_images)
                ga = dist.all_mean_(torch.tensor([grad_alpha, loss], dtype=torch.float64, device=device))
                distiller.apply_update(grad_images, float(ga[0]))
                state.losses.append(float(ga[1]))
                state.iteration += 1
                recent = state.losses[-20:]
                rate = (state.iteration - first_iteration) / max(1e-9, time.perf_counter() - started)
                reporter.update("distill", advance=1, loss=sum(recent) / len(recent), alpha=state.alpha, it_s=rate)
                if state.iteration % cfg.checkpoint_every == 0 and state.iteration < cfg.iterations:
                    checkpoint(final=False)
    except KeyboardInterrupt:
        interrupted = True
    interrupted = interrupted or stop.raised
    reporter.done("distill")
    if evaluate is not None and cfg.eval_every and dist.is_main() and not interrupted:
        state.evaluations.append(evaluate(state))
    checkpoint(final=not interrupted)
    if interrupted:
        raise KeyboardInterrupt
    return {"file": str(out), "synset": name, "iterations": state.iteration, "alpha": state.alpha,
            "loss_first": state.losses[0] if state.losses else None,
            "loss_last_mean": (sum(state.losses[-20:]) / len(state.losses[-20:])) if state.losses else None,
            "skipped_iterations": state.skipped, "evaluations": state.evaluations,
            "seconds": time.perf_counter() - started}
