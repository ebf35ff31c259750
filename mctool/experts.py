"""Train expert networks on real data and record their parameter trajectories."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mctool import store
from mctool.augment import DEFAULT_STRATEGY, DSA
from mctool.errors import UsageError
from mctool.functional import FlatNet
from mctool.models import ModelSpec, build_model, default_depth, layer_sizes, layout_of
from mctool.prepared import Prepared
from mctool.progress import SILENT, Muted, Reporter, stop_if_asked
from mctool.settings import setting
from mctool.train import Schedule, accuracy, train
from mctool.trajectory import STRATEGIES, StreamingConvexifier, parse_positions, uniform_positions

MAX_SEED = 2**63 - 1
_RESUME_HINT = "finished experts are kept: run the same command again to resume"


def check_seed(seed: int, option: str = "--seed") -> None:
    """Seeds feed numpy's SeedSequence and torch.manual_seed: 0 … 2**63 − 1."""
    if not 0 <= seed <= MAX_SEED:
        raise UsageError(f"{option} must be in 0 … {MAX_SEED} (2**63 − 1), got {seed}")


@dataclass(frozen=True)
class ExpertsConfig:
    """Options of `mctool experts`; all but num_experts must match to append to a buffer."""

    dataset: str = setting("", "cifar10, cifar100, tinyimagenet, fashion-mnist, mnist or folder:PATH.", option=False)
    num_experts: int = setting(1, "Number of experts the buffer should hold (appends to an existing one). Under "
                               "torchrun write --num-experts (torchrun takes --n for itself).",
                               flags=("--n", "-n", "--num-experts"))
    epochs: int = setting(50, "Epochs per expert (K); K+1 snapshots are kept.")
    lr: float = setting(0.01, "SGD learning rate.")
    momentum: float = setting(0.0, "SGD momentum.")
    weight_decay: float = setting(0.0, "SGD weight decay.")
    batch_size: int = setting(256, "Training batch size.")
    width: int = setting(128, "ConvNet width (channels).")
    depth: int = setting(0, "ConvNet depth (0: 3 up to 64 px — the MCT authors' Tiny ImageNet setting; MTT used "
                         "--depth 4 there — and 5 above).")
    norm: str = "instancenorm"
    zca: bool = setting(True, "ZCA whitening (Table A) or mean/std normalisation.", flags=("--zca/--no-zca",))
    zca_eps: float = setting(0.1, "ZCA epsilon (kornia's ZCAWhitening eps; the reference's 0.1).")
    augment: str = setting(DEFAULT_STRATEGY, "DSA ops joined by '_', or 'none'.")
    seed: int = setting(0, "Run seed (0 … 2**63-1); expert i uses a seed spawned from (seed, i).")
    # --convexify: waypoints and beta computed while training, no full trajectory stored.
    convexify: bool = setting(False, "Stream: compute waypoints + beta while training and never store the full "
                              "trajectory (positions must be known up front: --interior/--positions).")
    interior: int | None = setting(None, "With --convexify: interior waypoints, uniformly placed (default 2).")
    positions: str | None = setting(None, "With --convexify: explicit positions, e.g. 0,17,34,50.")
    beta: str | None = setting(None, "With --convexify: mct (default), uniform, decreasing or projected.")
    smooth: bool = setting(False, "With --convexify: the authors' code's waypoint smoothing.")

    def validate(self) -> None:
        """Refuse settings that cannot train (one line, exit 2); needs no data, so callers check
        before any download or file. The depth is checked when the model is built."""
        Schedule(epochs=self.epochs, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
                 batch_size=self.batch_size)
        checks = [("--n", self.num_experts >= 1, ">= 1"), ("--epochs", self.epochs >= 1, ">= 1"),
                  ("--width", self.width >= 1, ">= 1"), ("--depth", self.depth >= 0, ">= 1 (0 = by image size)"),
                  ("--zca-eps", self.zca_eps > 0 and self.zca_eps == self.zca_eps, "> 0")]
        for option, ok, requirement in checks:
            if not ok:
                raise UsageError(f"{option} must be {requirement}, got {getattr(self, option[2:].replace('-', '_'), '')}")
        check_seed(self.seed)
        if self.augment != "none":
            DSA(self.augment)
        if not self.convexify and (self.interior is not None or self.positions is not None or self.beta is not None
                                   or self.smooth):
            raise UsageError("--interior, --positions, --beta and --smooth only apply with --convexify "
                             "(or run `mctool convexify` on the buffer afterwards)")
        if self.convexify:
            self.stream_positions()

    @property
    def stream_strategy(self) -> str:
        """The β strategy of a streaming buffer."""
        return self.beta or "mct"

    def stream_positions(self) -> tuple[int, ...] | None:
        """Waypoint positions of a streaming (`--convexify`) buffer, else None."""
        if not self.convexify:
            return None
        if self.stream_strategy not in STRATEGIES:
            raise UsageError(f"unknown --beta '{self.stream_strategy}'; choose from {', '.join(STRATEGIES)}")
        if self.interior is not None and self.interior < 0:
            raise UsageError(f"--interior must be >= 0, got {self.interior}")
        if self.positions:
            return tuple(parse_positions(self.positions, self.epochs))
        return tuple(uniform_positions(self.epochs, 2 if self.interior is None else self.interior))

    def compat(self) -> dict[str, Any]:
        """Everything that must agree between runs appending to the same buffer (the keys stored
        in /experts' config since the first release)."""
        positions = self.stream_positions()
        return {
            "dataset": self.dataset, "epochs": self.epochs, "lr": self.lr, "momentum": self.momentum,
            "weight_decay": self.weight_decay, "batch_size": self.batch_size, "width": self.width,
            "depth": self.depth, "norm": self.norm, "zca": self.zca, "zca_eps": self.zca_eps,
            "augment": self.augment, "seed": self.seed,
            "stream_positions": list(positions) if positions else None,
            "stream_strategy": self.stream_strategy, "stream_smooth": self.smooth,
        }


@dataclass(frozen=True)
class TrainedExpert:
    """One expert trained by this run (a row of the result table)."""

    expert: int
    seed: int
    seconds: float
    test_accuracy_first: float
    test_accuracy_last: float


@dataclass(frozen=True)
class ExpertsResult:
    """What `mctool experts` did."""

    file: str
    trained: list[TrainedExpert]
    already_done: int
    experts: int


def model_spec(cfg: ExpertsConfig, prepared: Prepared) -> ModelSpec:
    """The expert architecture on this dataset's image shape."""
    m = prepared.meta
    return ModelSpec(arch="ConvNet", depth=cfg.depth or default_depth(m.height), width=cfg.width, norm=cfg.norm,
                     channels=m.channels, num_classes=m.num_classes, im_size=(m.height, m.width))


def expert_seed(seed: int, index: int) -> int:
    """The seed of expert `index`, spawned from the run seed; independent of how many run or where."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint32)[0])


@dataclass
class ExpertRun:
    """One trained expert: its row in the buffer."""

    index: int
    seed: int
    test_accuracy: list[float]
    train_loss: list[float]
    trajectory: torch.Tensor | None = None  # [K+1, P] (None when streaming)
    waypoints: torch.Tensor | None = None
    beta: torch.Tensor | None = None
    seconds: float = 0.0


def train_expert(cfg: ExpertsConfig, spec: ModelSpec, prepared: Prepared, index: int,
                 reporter: Reporter = SILENT) -> ExpertRun:
    """Train expert `index` and record θ_0 (before any step) and θ after every epoch."""
    seed = expert_seed(cfg.seed, index)
    device = prepared.train_x.device
    model = build_model(spec, seed=seed).to(device)
    flat = FlatNet(model)
    generator = torch.Generator().manual_seed(seed)
    dsa = DSA(cfg.augment, flip=prepared.meta.flip) if cfg.augment != "none" else None
    positions = cfg.stream_positions()
    snapshots: list[torch.Tensor] = []
    stream = (StreamingConvexifier(flat.sizes, list(positions), cfg.stream_strategy, cfg.smooth)
              if positions is not None else None)

    def record() -> None:
        # flatten() copies: snapshots must never alias the live weights (the reference's CPU bug).
        snap = flat.flatten(model).to("cpu")
        if stream is not None:
            stream.push(snap)
        else:
            snapshots.append(snap)

    test_acc = [accuracy(model, prepared.test_x, prepared.test_y)]
    record()
    n_train = prepared.train_x.shape[0]
    batches_per_epoch = -(-n_train // cfg.batch_size)
    reporter.task("expert", f"expert {index}", total=cfg.epochs * batches_per_epoch)
    started = time.perf_counter()
    last = [started]

    def on_epoch(epoch: int, loss: float) -> None:
        record()
        test_acc.append(accuracy(model, prepared.test_x, prepared.test_y))
        now = time.perf_counter()
        reporter.update("expert", epoch=f"{epoch}/{cfg.epochs}", loss=loss, acc=test_acc[-1],
                        img_s=round(n_train / (now - last[0])))
        last[0] = now

    def on_batch() -> None:
        reporter.update("expert", advance=1)
        stop_if_asked(reporter, _RESUME_HINT)

    schedule = Schedule(epochs=cfg.epochs, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                        batch_size=cfg.batch_size)
    losses = train(model, prepared.train_x, prepared.train_y, schedule, dsa, generator, on_epoch, on_batch=on_batch)
    reporter.done("expert")
    result = ExpertRun(index=index, seed=seed, test_accuracy=test_acc, train_loss=[float("nan"), *losses],
                       seconds=time.perf_counter() - started)
    if stream is not None:
        result.waypoints, result.beta = stream.result()
    else:
        result.trajectory = torch.stack(snapshots)
    return result


# --------------------------------------------------------------------------- the buffer file


def _row_layout(cfg: ExpertsConfig, spec: ModelSpec) -> store.RowLayout:
    layout = layout_of(spec)
    positions = cfg.stream_positions()
    return store.RowLayout(epochs=cfg.epochs, num_params=sum(layer_sizes(layout)), num_layers=len(layout),
                           trajectories=positions is None, num_waypoints=None if positions is None else len(positions))


def _experts_attrs(cfg: ExpertsConfig, prepared: Prepared) -> dict[str, Any]:
    attrs = {"epochs": cfg.epochs, "lr": cfg.lr, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay,
             "batch_size": cfg.batch_size, "augmentation": cfg.augment, "seed": cfg.seed}
    attrs.update(store.provenance(cfg.compat(), cfg.seed, {"dataset_fingerprint": prepared.meta.train_fingerprint}))
    return attrs


def _create(out: Path, cfg: ExpertsConfig, prepared: Prepared, spec: ModelSpec) -> None:
    """A new, empty buffer with rows allocated for cfg.num_experts experts."""
    rows = _row_layout(cfg, spec)
    store.ensure_free_space(out, rows.row_bytes() * cfg.num_experts, f"{cfg.num_experts} expert(s) in {out.name}")
    positions = cfg.stream_positions()
    streaming = None
    if positions is not None:
        meta = store.ConvexMeta(tuple(positions), cfg.stream_strategy, cfg.smooth)
        streaming = (meta, store.provenance({"positions": list(positions), "strategy": cfg.stream_strategy,
                                             "smooth": cfg.smooth, "streaming": True}, cfg.seed))
    store.create_buffer(out, prepared.meta, spec, layout_of(spec), cfg.num_experts, rows,
                        _experts_attrs(cfg, prepared), streaming)


def check_compatible(out: Path, stored: dict[str, Any], cfg: ExpertsConfig) -> None:
    """Refuse to append experts trained with different settings."""
    mine = json.loads(json.dumps(cfg.compat()))
    diff = [k for k in sorted(set(stored) | set(mine)) if stored.get(k) != mine.get(k)]
    if diff:
        shown = ", ".join(f"{k}={stored.get(k)!r} (now {mine.get(k)!r})" for k in diff[:4])
        raise UsageError(f"{store.shown(out)}: holds experts made with other settings: {shown}; "
                         "use the same options or another -o FILE")


def _open_existing(out: Path, cfg: ExpertsConfig, reporter: Reporter) -> tuple[list[int], bool]:
    """Check an existing buffer can take these experts (growing its rows if needed): the
    experts already done, and whether an in-place /convex will not cover the new ones."""
    with store.open_buffer(out) as buf:
        info = buf.require_experts()
        check_compatible(out, info.config, cfg)
        done = [int(e) for e in info.done_indices]
        convex_stale = cfg.stream_positions() is None and buf.convex_state != "absent"
        ready = store.rows_ready(buf.file, cfg.num_experts)
    if not ready:
        size = out.stat().st_size
        store.ensure_free_space(out, size, f"growing {out.name} to {cfg.num_experts} expert rows")
        reporter.log(f"{store.shown(out)}: allocating rows for {cfg.num_experts} experts (the file is rewritten once)")
        store.regrow(out, cfg.num_experts)
    return done, convex_stale


def _holds_no_experts_with_other_settings(out: Path, cfg: ExpertsConfig) -> bool:
    """A buffer whose run failed before finishing any expert may be replaced by a new setting
    (e.g. the smaller --lr a divergence message suggests)."""
    with store.open_buffer(out) as buf:
        info = buf.experts
        if info is None or info.done.any():
            return False
        try:
            check_compatible(out, info.config, cfg)
        except UsageError:
            return True
    return False


def run_prepared(cfg: ExpertsConfig, out: Path, prepared: Prepared, reporter: Reporter = SILENT) -> ExpertsResult:
    """Train experts 0..n-1 that `out` does not yet hold; resume or append when settings match.

    Under torchrun each rank trains the experts of one round (by index, so the result does
    not depend on the number of processes) and rank 0, the only writer, stores them.
    """
    from mctool import distributed as dist

    cfg.validate()
    cfg = dataclasses.replace(cfg, dataset=prepared.meta.name, depth=cfg.depth or default_depth(prepared.meta.height))
    spec = model_spec(cfg, prepared)
    layout_of(spec)  # a depth too large for the images fails here, before the file exists
    done_before: list[int] = []
    convex_stale = False
    if dist.is_main():
        if out.exists() and _holds_no_experts_with_other_settings(out, cfg):
            reporter.log(f"{store.shown(out)} holds no finished expert and was made with other settings: "
                         "starting it afresh")
            _create(out, cfg, prepared, spec)  # replaces it atomically: never a moment without a file
        if not out.exists():
            _create(out, cfg, prepared, spec)
        else:
            done_before, convex_stale = _open_existing(out, cfg, reporter)
    done_before = dist.broadcast(done_before)
    todo = [e for e in range(cfg.num_experts) if e not in set(done_before)]
    if done_before and todo:
        reporter.log(f"resuming {store.shown(out)}: {len(done_before)} expert(s) already done, {len(todo)} to train")
    world, me = dist.world_size(), dist.rank()
    trained: list[TrainedExpert] = []
    row_bytes = _row_layout(cfg, spec).row_bytes()
    for start in range(0, len(todo), world):
        if dist.is_main():  # before training: a full disk is found now, not after the expert's minutes
            store.ensure_free_space(out, row_bytes * min(world, len(todo) - start), "the next expert row(s)",
                                   metadata=False)
        mine = todo[start + me] if start + me < len(todo) else None
        result = train_expert(cfg, spec, prepared, mine, reporter) if mine is not None else None
        results = dist.gather(result)
        if results is None:
            continue
        with store.append(out) as f:
            rows = store.ExpertRows(f)
            for res in results:
                if res is None:
                    continue
                rows.finish(res.index, res.seed, res.test_accuracy, res.train_loss, res.trajectory, res.waypoints,
                            res.beta)
                trained.append(TrainedExpert(expert=res.index, seed=res.seed, seconds=round(res.seconds, 2),
                                             test_accuracy_first=res.test_accuracy[0],
                                             test_accuracy_last=res.test_accuracy[-1]))
                reporter.log(f"expert {res.index}: test accuracy {res.test_accuracy[0]:.3f} -> "
                             f"{res.test_accuracy[-1]:.3f} in {res.seconds:.1f} s")
    if dist.is_main() and trained and convex_stale:
        reporter.log(f"{store.shown(out)}: /convex does not cover the new experts — run `mctool convexify "
                     f"{store.shown(out)}` again")
    return ExpertsResult(file=str(out), trained=trained, already_done=len(done_before), experts=cfg.num_experts)


def _precheck(cfg: ExpertsConfig, out: Path) -> ExpertsConfig:
    """What can be refused before the data is loaded: an unknown dataset, a depth the images
    cannot take, a buffer made with other settings (or not a buffer at all)."""
    from mctool.data import SHAPES, canonical_name

    cfg = dataclasses.replace(cfg, dataset=canonical_name(cfg.dataset))
    shape = SHAPES.get(cfg.dataset)
    if shape is not None:
        c, h, w = shape
        layout_of(ModelSpec(depth=cfg.depth or default_depth(h), width=cfg.width, norm=cfg.norm, channels=c,
                            im_size=(h, w)))
    if out.exists():
        with store.open_buffer(out) as buf:
            info = buf.require_experts()
            if info.trajectories_in is not None:
                raise UsageError(f"{store.shown(out)}: a compact file of `mctool convexify -o`; add experts to the "
                                 f"buffer it was made from ({store.shown(info.trajectories_in)}) and convexify again")
            if info.done.any():
                resolved = dataclasses.replace(cfg, depth=cfg.depth or default_depth(buf.data.height))
                check_compatible(out, info.config, resolved)
    return cfg


def run(cfg: ExpertsConfig, out: Path, data_dir: Path | None = None, device: str = "auto", download: bool = True,
        resume: bool = False, reporter: Reporter = SILENT) -> ExpertsResult | None:
    """`mctool experts`: check the settings, join torchrun's process group, prepare the data
    (downloading it if asked), train and store the experts. Under torchrun only rank 0 returns
    the result (the others None)."""
    from mctool import distributed as dist
    from mctool.data import load_dataset
    from mctool.device import resolve_device
    from mctool.prepared import prepare

    cfg.validate()  # before any download, cache or file
    if resume and not out.exists():
        raise UsageError(f"--resume: {store.shown(out)} does not exist (drop --resume to start a new buffer)")
    store.check_writable(out)
    cfg = _precheck(cfg, out)
    dev = resolve_device(device)
    dist.init_from_env(dev)
    if not dist.is_main():
        reporter = Muted(reporter)
    if download and dist.world_size() > 1:
        # Rank 0 downloads (if needed) while the others wait, instead of all racing for the files.
        if dist.is_main():
            load_dataset(cfg.dataset, data_dir, download=True)
        dist.barrier()
    reporter.log(f"loading {cfg.dataset}" + (" and fitting ZCA (cached after the first time)" if cfg.zca else ""))
    prepared = prepare(cfg.dataset, data_dir, cfg.zca, cfg.zca_eps, dev,
                       download=download and dist.world_size() == 1)
    with store.holding(out) if dist.is_main() else contextlib.nullcontext():  # no other write meanwhile
        result = run_prepared(cfg, out, prepared, reporter)
    main = dist.is_main()
    dist.shutdown()
    return result if main else None
