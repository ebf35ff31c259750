"""Train expert networks on real data and record their parameter trajectories."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mctool import artifact
from mctool.augment import DEFAULT_STRATEGY, DSA
from mctool.errors import UsageError
from mctool.functional import FlatNet
from mctool.nets import ModelSpec, build_model, default_depth, param_layout
from mctool.prepared import Prepared
from mctool.progress import SILENT, Reporter
from mctool.train import Schedule, accuracy, train
from mctool.trajectory import StreamingConvexifier


@dataclass(frozen=True)
class ExpertsConfig:
    """Options of `mctool experts`; all but num_experts must match to append to a buffer."""

    dataset: str
    num_experts: int = 1
    epochs: int = 50
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 256
    width: int = 128
    depth: int = 3
    norm: str = "instancenorm"
    zca: bool = True
    zca_eps: float = 0.1
    augment: str = DEFAULT_STRATEGY
    seed: int = 0
    # --convexify: waypoints and beta computed while training, no full trajectory stored.
    stream_positions: tuple[int, ...] | None = None
    stream_strategy: str = "mct"
    stream_smooth: bool = False

    def validate(self) -> None:
        """Refuse settings that cannot train (one line, exit 2); needs no data, so callers check
        before any download or file. The depth is checked when the model is built."""
        Schedule(epochs=self.epochs, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
                 batch_size=self.batch_size)
        if self.augment != "none":
            DSA(self.augment)

    def compat(self) -> dict[str, Any]:
        """Everything that must agree between runs appending to the same buffer."""
        d = dataclasses.asdict(self)
        d.pop("num_experts")
        d["stream_positions"] = list(self.stream_positions) if self.stream_positions else None
        return d


def model_spec(cfg: ExpertsConfig, prepared: Prepared) -> ModelSpec:
    """The expert architecture on this dataset's image shape."""
    m = prepared.meta
    return ModelSpec(arch="ConvNet", depth=cfg.depth or default_depth(m.height), width=cfg.width, norm=cfg.norm,
                     channels=m.channels, num_classes=m.num_classes, im_size=(m.height, m.width))


def expert_seed(seed: int, index: int) -> int:
    """The seed of expert `index`, spawned from the run seed; independent of how many run or where."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint32)[0])


@dataclass
class ExpertResult:
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
                 reporter: Reporter = SILENT) -> ExpertResult:
    """Train expert `index` and record θ_0 (before any step) and θ after every epoch."""
    seed = expert_seed(cfg.seed, index)
    device = prepared.train_x.device
    model = build_model(spec, seed=seed).to(device)
    flat = FlatNet(model)
    generator = torch.Generator().manual_seed(seed)
    dsa = DSA(cfg.augment, flip=prepared.meta.flip) if cfg.augment != "none" else None
    streaming = cfg.stream_positions is not None
    snapshots: list[torch.Tensor] = []
    stream = (StreamingConvexifier([int(np.prod(s)) for _, s in param_layout(model)], list(cfg.stream_positions),
                                   cfg.stream_strategy, cfg.stream_smooth) if streaming else None)

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

    schedule = Schedule(epochs=cfg.epochs, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                        batch_size=cfg.batch_size)
    losses = train(model, prepared.train_x, prepared.train_y, schedule, dsa, generator, on_epoch,
                   on_batch=lambda: reporter.update("expert", advance=1))
    reporter.done("expert")
    result = ExpertResult(index=index, seed=seed, test_accuracy=test_acc, train_loss=[float("nan"), *losses],
                          seconds=time.perf_counter() - started)
    if stream is not None:
        result.waypoints, result.beta = stream.result()
    else:
        result.trajectory = torch.stack(snapshots)
    return result


# --------------------------------------------------------------------------- the buffer file


def _experts_attrs(cfg: ExpertsConfig) -> dict[str, Any]:
    return {"epochs": cfg.epochs, "lr": cfg.lr, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay,
            "batch_size": cfg.batch_size, "augmentation": cfg.augment, "seed": cfg.seed}


def create_buffer(out: Path, cfg: ExpertsConfig, prepared: Prepared, spec: ModelSpec) -> None:
    """Write a new, empty buffer (metadata and zero-row datasets) atomically."""
    layout = param_layout(build_model(spec, seed=0))
    with artifact.atomic_write(out, copy_existing=False) as f:
        prepared.meta.write(f)
        artifact.write_model(f, spec, layout)
        g = f.require_group("experts")
        g.attrs.update(_experts_attrs(cfg))
        g.attrs.update(artifact.provenance(cfg.compat(), cfg.seed, {"dataset_fingerprint": prepared.meta.train_fingerprint}))
        positions = cfg.stream_positions
        artifact.ExpertRows(f, 0, cfg.epochs, sum(artifact.layer_sizes(layout)), len(layout),
                            trajectories=positions is None, num_waypoints=None if positions is None else len(positions))
        if positions is not None:
            artifact.write_convex_attrs(
                f["convex"], artifact.ConvexMeta(tuple(positions), cfg.stream_strategy, cfg.stream_smooth),
                artifact.provenance({"positions": list(positions), "strategy": cfg.stream_strategy,
                                     "smooth": cfg.stream_smooth, "streaming": True}, cfg.seed),
            )


def check_compatible(out: Path, f: Any, cfg: ExpertsConfig) -> None:
    """Refuse to append experts trained with different settings."""
    stored = artifact.json_attr(f["experts"], "config", {})
    mine = json.loads(json.dumps(cfg.compat()))
    diff = [k for k in sorted(set(stored) | set(mine)) if stored.get(k) != mine.get(k)]
    if diff:
        shown = ", ".join(f"{k}={stored.get(k)!r} (now {mine.get(k)!r})" for k in diff[:4])
        raise UsageError(f"{out}: holds experts made with other settings: {shown}; "
                         "use the same options or another -o FILE")


def _holds_no_experts_with_other_settings(out: Path, cfg: ExpertsConfig) -> bool:
    """A buffer whose run failed before finishing any expert may be replaced by a new setting
    (e.g. the smaller --lr a divergence message suggests)."""
    with artifact.open_artifact(out) as f:
        if "experts" not in f or "done" not in f["experts"] or f["experts/done"][()].any():
            return False
        try:
            check_compatible(out, f, cfg)
        except UsageError:
            return True
    return False


def open_rows(f: Any, cfg: ExpertsConfig, num_experts: int) -> artifact.ExpertRows:
    """The row writer of an existing buffer, grown to `num_experts` rows."""
    spec, layout = artifact.read_model(f.filename, f)
    positions = cfg.stream_positions
    return artifact.ExpertRows(f, num_experts, cfg.epochs, sum(artifact.layer_sizes(layout)), len(layout),
                               trajectories=positions is None,
                               num_waypoints=None if positions is None else len(positions))


def store(rows: artifact.ExpertRows, result: ExpertResult) -> None:
    """Write one finished expert's row, then mark it done."""
    if result.trajectory is not None:
        rows.f["experts/trajectories"][result.index] = result.trajectory.numpy()
    rows.finish(result.index, result.seed, result.test_accuracy, result.train_loss, result.waypoints, result.beta)


def _row_bytes(result: ExpertResult) -> int:
    """Bytes one expert's row adds to the buffer."""
    tensors = [t for t in (result.trajectory, result.waypoints, result.beta) if t is not None]
    return sum(t.numel() * 4 for t in tensors) + 8 * len(result.test_accuracy) + 64


def run(cfg: ExpertsConfig, out: Path, prepared: Prepared, reporter: Reporter = SILENT) -> dict[str, Any]:
    """Train experts 0..n-1 that `out` does not yet hold; resume or append when settings match.

    Under torchrun each rank trains the experts of one round (by index, so the result does
    not depend on the number of processes) and rank 0, the only writer, stores them.
    """
    from mctool import distributed as dist

    cfg.validate()
    spec = model_spec(cfg, prepared)
    build_model(spec)  # a depth too large for the images fails here, before the file exists
    done_before: list[int] = []
    convex_stale = False
    if dist.is_main():
        if out.exists() and _holds_no_experts_with_other_settings(out, cfg):
            reporter.log(f"{out} holds no finished expert and was made with other settings: starting it afresh")
            out.unlink()
        if not out.exists():
            artifact.ensure_free_space(out, 0, f"creating {out.name}")
            create_buffer(out, cfg, prepared, spec)
        with artifact.open_artifact(out, "r+") as f:
            artifact.require_group(out, f, "experts")
            check_compatible(out, f, cfg)
            rows = open_rows(f, cfg, cfg.num_experts)
            done_before = [int(e) for e in np.flatnonzero(rows.done())]
            convex_stale = cfg.stream_positions is None and "convex" in f
    done_before = dist.broadcast(done_before)
    todo = [e for e in range(cfg.num_experts) if e not in set(done_before)]
    if done_before and todo:
        reporter.log(f"resuming {out}: {len(done_before)} expert(s) already done, {len(todo)} to train")
    world, me = dist.world_size(), dist.rank()
    trained: list[dict[str, Any]] = []
    for start in range(0, len(todo), world):
        mine = todo[start + me] if start + me < len(todo) else None
        result = train_expert(cfg, spec, prepared, mine, reporter) if mine is not None else None
        results = dist.gather(result)
        if results is None:
            continue
        row_bytes = sum(_row_bytes(r) for r in results if r is not None)
        artifact.ensure_free_space(out, row_bytes, f"storing {len(results)} expert row(s)")
        with artifact.open_artifact(out, "r+") as f:
            rows = open_rows(f, cfg, cfg.num_experts)
            for res in results:
                if res is None:
                    continue
                store(rows, res)
                trained.append({"expert": res.index, "seed": res.seed, "seconds": round(res.seconds, 2),
                                "test_accuracy_first": res.test_accuracy[0],
                                "test_accuracy_last": res.test_accuracy[-1]})
                reporter.log(f"expert {res.index}: test accuracy {res.test_accuracy[0]:.3f} -> "
                             f"{res.test_accuracy[-1]:.3f} in {res.seconds:.1f} s")
    if dist.is_main() and trained and convex_stale:
        reporter.log(f"{out}: /convex does not cover the new experts — run `mctool convexify {out}` again")
    return {"file": str(out), "trained": trained, "already_done": len(done_before),
            "experts": cfg.num_experts}
