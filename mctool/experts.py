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
from mctool.data.augment import DSA
from mctool.configs.experts import MAX_SEED, ExpertsConfig, check_seed  # noqa: F401 (re-exported)
from mctool.core.errors import UsageError
from mctool.models.functional import FlatNet
from mctool.models import ModelSpec, build_model, default_depth, layer_sizes, layout_of
from mctool.data.prepared import Prepared
from mctool.core.progress import SILENT, Muted, Reporter, stop_if_asked
from mctool.training.train import Schedule, accuracy, train
from mctool.convexify.trajectory import StreamingConvexifier

_RESUME_HINT = "finished experts are kept: run the same command again to resume"


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
    return ModelSpec(arch="ConvNet", depth=cfg.depth or default_depth(m.height, m.width), width=cfg.width, norm=cfg.norm,
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


def resolved_depth(cfg: ExpertsConfig, height: int, width: int, held: dict[str, Any] | None) -> int:
    """--depth; else the depth of the experts the buffer already holds (`held`: its stored config),
    so that a buffer keeps its architecture when the default changes (6–11 px images had depth 3
    before 0.2); else the default for the image size."""
    if cfg.depth:
        return cfg.depth
    stored = (held or {}).get("depth")
    if isinstance(stored, int) and not isinstance(stored, bool) and stored > 0:
        return stored
    return default_depth(height, width)


def _held_config(out: Path) -> dict[str, Any] | None:
    """The stored settings of the finished experts in `out`, if it is a buffer that holds any."""
    if not out.exists():
        return None
    with store.open_buffer(out) as buf:
        info = buf.require_experts()
        return info.config if info.done.any() else None


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
    from mctool.core import distributed as dist

    cfg.validate()
    m = prepared.meta
    held = _held_config(out) if dist.is_main() and not cfg.depth else None
    cfg = dataclasses.replace(cfg, dataset=m.name, depth=dist.broadcast(resolved_depth(cfg, m.height, m.width, held)))
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
    from mctool.data.datasets import SHAPES, canonical_name

    cfg = dataclasses.replace(cfg, dataset=canonical_name(cfg.dataset))
    shape = SHAPES.get(cfg.dataset)
    if shape is not None:
        c, h, w = shape
        layout_of(ModelSpec(depth=cfg.depth or default_depth(h, w), width=cfg.width, norm=cfg.norm, channels=c,
                            im_size=(h, w)))
    if out.exists():
        with store.open_buffer(out) as buf:
            info = buf.require_experts()
            if info.trajectories_in is not None:
                raise UsageError(f"{store.shown(out)}: a compact file of `mctool convexify -o`; add experts to the "
                                 f"buffer it was made from ({store.shown(info.trajectories_in)}) and convexify again")
            if info.done.any():
                depth = resolved_depth(cfg, buf.data.height, buf.data.width, info.config)
                check_compatible(out, info.config, dataclasses.replace(cfg, depth=depth))
    return cfg


def run(cfg: ExpertsConfig, out: Path, data_dir: Path | None = None, device: str = "auto", download: bool = True,
        resume: bool = False, reporter: Reporter = SILENT) -> ExpertsResult | None:
    """`mctool experts`: check the settings, join torchrun's process group, prepare the data
    (downloading it if asked), train and store the experts. Under torchrun only rank 0 returns
    the result (the others None)."""
    from mctool.core import distributed as dist
    from mctool.data.datasets import dataset_present, default_data_dir, load_dataset
    from mctool.core.device import resolve_device
    from mctool.data.prepared import prepare

    cfg.validate()  # before any download, cache or file
    if resume and not out.exists():
        raise UsageError(f"--resume: {store.shown(out)} does not exist (drop --resume to start a new buffer)")
    if dist.writes_output():  # rank 0 may already hold `out` for its run while another rank gets here
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
    if not dataset_present(cfg.dataset, data_dir):
        if not download:
            load_dataset(cfg.dataset, data_dir)  # raises: not found, and where to put the files
        reporter.log(f"{cfg.dataset}: not in {data_dir or default_data_dir()}; downloading it")
    reporter.log(f"loading {cfg.dataset}" + (" and fitting ZCA (cached after the first time)" if cfg.zca else ""))
    prepared = prepare(cfg.dataset, data_dir, cfg.zca, cfg.zca_eps, dev,
                       download=download and dist.world_size() == 1)
    with store.holding(out) if dist.is_main() else contextlib.nullcontext():  # no other write meanwhile
        result = run_prepared(cfg, out, prepared, reporter)
    main = dist.is_main()
    dist.shutdown()
    return result if main else None
