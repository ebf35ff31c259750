"""Import MTT-family expert buffers into one mctool buffer: streaming, checked, resumable.

Two sources:

* a folder of ``replay_buffer_{n}.pt`` (full trajectories) → /experts/trajectories, ready for
  ``mctool convexify`` and ``mctool distill --method mtt``;
* a folder of the MCT authors' ``waypoint_buffer*_{n}.pt`` + ``step_buffer*_{n}.pt`` → /convex
  rows (no trajectories), ready for ``mctool distill``.

What the files do not say is stated by the user or read from the scripts' folder names
(``<DATASET>[_NO_ZCA]/<model>/``): the dataset and whether the experts saw ZCA-whitened images.
The dataset must be on this machine: /dataset records its training-split fingerprint (which
distill and evaluate check) and the preprocessing is refitted from it exactly as mctool does
for its own experts — the same normalisation constants and ZCA fit as the scripts (method.md §1).

Memory is bounded by one snapshot for zip files (one file for legacy files): each snapshot is
read, flattened and written before the next. Rows are marked done only once complete, so an
interrupted import resumes where it stopped; a resumed import must see the same files.
"""

from __future__ import annotations

import json
import math
import time
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mctool.store import ConvexMeta, DatasetMeta
from mctool.data.augment import DEFAULT_STRATEGY
from mctool.core.errors import ArtifactError, UsageError
from mctool.core.text import count
from mctool.models.functional import FlatNet
from mctool.interop import h5out
from mctool.interop.buffers import (
    REPLAY_PATTERN, BufferLayoutError, Layout, ReplayScan, StatedModel, as_list, check_expert, check_layout, describe_numbers, experts_of,
    first_snapshot_shapes, flat_snapshot, folder_hints, infer_convnet, location, numbered_files, require_folder,
    scan_replay_folder,
)
from mctool.interop.compressed import CompressedScan, find_pairs, read_expert, scan_compressed
from mctool.interop.torchfile import memory_limit, open_torch_file
from mctool.models import ModelSpec, build_model, param_layout
from mctool.data.prepared import Prepared
from mctool.core.progress import SILENT, Reporter, stop_if_asked
from mctool.core.settings import above, at_least, first_problem, one_of, setting
from mctool.training.train import accuracy

ACCURACY_MODES = ("none", "first", "last")
_KEPT = "finished experts are kept: run the same command again to resume"
REPLAY_FORMAT = "mtt-replay-buffer"
COMPRESSED_FORMAT = "mct-compressed"


@dataclass(frozen=True)
class ImportConfig:
    """What the user states about the experts (None: from the folder name or the shapes)."""

    dataset: str | None = setting(None, "Dataset the experts learned (default: from the scripts' folder name).")
    zca: bool | None = setting(None, "Whether the experts saw ZCA-whitened images (default: from the folder name).",
                               flags=("--zca/--no-zca",))
    zca_eps: float = setting(0.1, "ZCA epsilon the scripts used.", check=above(0, "positive"))
    model: str | None = setting(None, "The scripts' model name (ConvNet, ConvNetD4, ConvNetBN, ...).")
    depth: int | None = setting(None, "ConvNet depth (checked against the files).", check=at_least(1, "at least 1"))
    width: int | None = setting(None, "ConvNet width (checked against the files).", check=at_least(1, "at least 1"))
    norm: str | None = setting(None, "The ConvNet's normalisation (default instancenorm).")
    epochs: int | None = setting(None, "Expected K: files whose experts have another are refused.",
                                 check=at_least(1, "at least 1"))
    variant: str | None = setting(None, "Compressed pairs: ip4, ip2, uni, dec or proj.")
    accuracy: str = setting("last", "Test accuracy of the final weights: of every expert (last), the first, or none.",
                            check=one_of(*ACCURACY_MODES, message="unknown accuracy mode '{value}'; choose from "
                                         + ", ".join(ACCURACY_MODES)))
    # How the experts were trained, recorded as stated (defaults: buffer.py's).
    lr: float = setting(0.01, "The experts' training learning rate, recorded as stated.")
    momentum: float = setting(0.0, "The experts' training momentum, recorded as stated.")
    weight_decay: float = setting(0.0, "The experts' weight decay, recorded as stated.")
    batch_size: int = setting(256, "The experts' training batch size, recorded as stated.")
    augment: str = setting(DEFAULT_STRATEGY, "The experts' DSA strategy, recorded as stated.")

    def validate(self) -> None:
        """Settings that can be checked without files or data (one line, exit 2); each setting's
        check is declared with it."""
        found = first_problem(self)
        if found is not None:
            raise UsageError(found.message("{option} must be {words}, got {value}"))


@dataclass(frozen=True)
class Source:
    """The dataset, preprocessing and model name the import will use, and where each came from."""

    dataset: str
    zca: bool
    model: str | None
    notes: tuple[str, ...] = ()


def resolve_source(folder: Path, cfg: ImportConfig) -> Source:
    """Dataset / ZCA / model name: the user's, else the scripts' folder naming; refuse when unknown."""
    cfg.validate()
    hints = folder_hints(folder)
    notes = []
    dataset, zca, model = cfg.dataset, cfg.zca, cfg.model
    if dataset is None and hints.dataset is not None:
        dataset = hints.dataset
        notes.append(f"dataset '{dataset}' from the scripts' folder naming")
    if zca is None and hints.zca is not None:
        zca = hints.zca
        notes.append(f"{'ZCA' if zca else 'no ZCA'} from the folder name (the scripts append _NO_ZCA without --zca)")
    if model is None and hints.model is not None:
        model = hints.model
        notes.append(f"model '{model}' from the folder name")
    if dataset is None:
        raise UsageError(f"{folder}: the files do not say which dataset the experts learned; pass --dataset")
    if zca is None:
        raise UsageError(f"{folder}: the files do not say whether the experts saw ZCA-whitened images; "
                         "pass --zca or --no-zca (the scripts' buffers for CIFAR use ZCA unless the folder "
                         "ends in _NO_ZCA)")
    return Source(dataset, zca, model, tuple(notes))


def _stated(cfg: ImportConfig, source: Source) -> StatedModel:
    return StatedModel(model=source.model, depth=cfg.depth, width=cfg.width, norm=cfg.norm)


# Copies of one flat snapshot an import holds at once (the tensors read, the flat row, the
# network the accuracy is measured with, HDF5's write buffer), for the memory check below.
_SNAPSHOT_COPIES = 4


def check_model_size(shapes: list[tuple[int, ...]], first_file: Path, rows_held: int = 1) -> int:
    """P from the declared shapes, refused (one line) when the import's working set — a few
    copies of `rows_held` flat rows — would not fit in the memory it may use. Nothing is built
    or allocated before this check."""
    P = sum(math.prod(s) for s in shapes)
    need = (_SNAPSHOT_COPIES + rows_held) * P * 4
    limit = memory_limit()
    if need > limit:
        raise UsageError(f"{first_file}: the snapshots declare {P:,} parameters ({P * 4 / 1e9:.1f} GB each); "
                         f"importing them needs about {need / 1e9:.1f} GB, more than the {limit / 1e9:.1f} GB "
                         "available to it")
    return P


def _spec(shapes: list[tuple[int, ...]], meta: DatasetMeta, stated: StatedModel,
          first_file: Path, rows_held: int = 1) -> tuple[ModelSpec, Layout, list[str]]:
    check_model_size(shapes, first_file, rows_held)
    spec, notes = infer_convnet(shapes, meta.channels, (meta.height, meta.width), meta.num_classes, stated)
    layout = param_layout(build_model(spec))
    check_layout(shapes, layout, first_file)
    return spec, layout, notes


# --------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class ReplayPlan:
    """A checked replay-buffer folder and the model its snapshots fit."""

    scan: ReplayScan
    spec: ModelSpec
    layout: Layout
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class CompressedPlan:
    """A checked folder of compressed pairs and the model they fit."""

    scan: CompressedScan
    spec: ModelSpec
    layout: Layout
    notes: tuple[str, ...] = ()


def plan_replay(folder: Path, cfg: ImportConfig, source: Source, meta: DatasetMeta) -> ReplayPlan:
    """Infer (or check) the ConvNet from the first snapshot, then check every snapshot against it."""
    require_folder(folder, "replay_buffer_{n}.pt", REPLAY_PATTERN)
    first = numbered_files(folder, REPLAY_PATTERN)[0][0].path
    spec, layout, notes = _spec(first_snapshot_shapes(first), meta, _stated(cfg, source), first)
    scan = scan_replay_folder(folder, layout)
    if cfg.epochs is not None and scan.epochs != cfg.epochs:
        raise UsageError(f"{folder}: the experts have K = {count(scan.epochs, 'epoch')} ({scan.epochs + 1} snapshots), "
                         f"not the {cfg.epochs} stated")
    return ReplayPlan(scan, spec, layout, tuple(notes))


def plan_compressed(folder: Path, cfg: ImportConfig, source: Source, meta: DatasetMeta) -> CompressedPlan:
    """Infer (or check) the ConvNet from the first waypoint, then check every pair against it."""
    variant, pairs, _ = find_pairs(folder, cfg.variant)
    with open_torch_file(pairs[0][1]) as tf:
        first = experts_of(tf)
        waypoints = as_list(first[0], "waypoints", location(tf.path, 0)) if first else []
        if not waypoints:
            raise UsageError(f"{pairs[0][1]}: holds no waypoints")
        leaves = as_list(waypoints[0], "parameter tensors", location(tf.path, 0, 0))
        for i, leaf in enumerate(leaves):
            if isinstance(leaf, (list, tuple)):
                raise BufferLayoutError(f"{location(tf.path, 0, 0, i)}: a list where a tensor belongs")
        shapes = [tuple(leaf.shape) for leaf in leaves]
    spec, layout, notes = _spec(shapes, meta, _stated(cfg, source), pairs[0][1], rows_held=len(waypoints))
    scan = scan_compressed(folder, variant, layout)
    if cfg.epochs is not None and scan.epochs != cfg.epochs:
        raise UsageError(f"{folder}: the compressed experts span K = {count(scan.epochs, 'epoch')}, not the {cfg.epochs} "
                         "stated")
    return CompressedPlan(scan, spec, layout, tuple(notes) + scan.notes)


# --------------------------------------------------------------------------- the buffer


@contextlib.contextmanager
def _removed_on_refusal(out: Path, created: bool) -> Iterator[None]:
    """A file this import created is removed when the import stops on bad input (a value found
    only when the data is read: NaN, a damaged storage): it could never be completed, and the
    command must leave nothing behind. An interruption keeps it (the rerun resumes), and a file
    an earlier run created is never removed."""
    try:
        yield
    except UsageError:
        if created:
            out.unlink(missing_ok=True)
        raise


def _training(cfg: ImportConfig) -> dict[str, Any]:
    return {"lr": cfg.lr, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay, "batch_size": cfg.batch_size,
            "augmentation": cfg.augment}


def _open_out(out: Path, new: h5out.NewBuffer, reporter: Reporter) -> list[bool]:
    """Create the buffer, or check that an existing one is this same import; the rows already done."""
    if out.exists():
        try:
            stored = h5out.stored_import(out)
        except ArtifactError as exc:
            raise UsageError(f"{out}: already exists and is not an mctool buffer ({exc}); choose another -o") from None
        if stored is None:
            raise UsageError(f"{out}: already exists and holds {h5out.contents(out)}; choose another -o")
        config, source = stored
        mine = json.loads(json.dumps(new.config))
        diff = [k for k in sorted(set(config) | set(mine)) if config.get(k) != mine.get(k)]
        if diff:
            shown = ", ".join(f"{k}={config.get(k)!r} (now {mine.get(k)!r})" for k in diff[:3])
            raise UsageError(f"{out}: an import with other settings: {shown}; use the same options or another -o")
        if source.get("files") != json.loads(json.dumps(new.source["files"])):
            raise UsageError(f"{out}: an import of other files (names, sizes or expert counts differ from "
                             f"{new.source['folder']}); use another -o")
        done = [bool(d) for d in h5out.done_rows(out)]
        reporter.log(f"resuming {out}: {sum(done)} expert(s) already imported")
        return done
    h5out.create_buffer(out, new)
    return []


def _accuracy(spec: ModelSpec, flat: torch.Tensor, prepared: Prepared) -> float:
    """Test accuracy of a network with parameters `flat` (no gradient, the data's device)."""
    device = prepared.test_x.device
    model = build_model(spec).to(device).eval()
    FlatNet(model).load_into(model, flat.to(device))
    return accuracy(model, prepared.test_x, prepared.test_y)


def _sanity(acc: float, classes: int, zca: bool, reporter: Reporter, where: str) -> None:
    reporter.log(f"{where}: final test accuracy {100 * acc:.2f}% with the stated preprocessing")
    if acc < 1.5 / classes:
        reporter.log(f"warning: that is near chance ({100 / classes:.1f}%): were the experts trained "
                     f"{'without' if zca else 'with'} ZCA, or on another dataset? (--zca/--no-zca, --dataset)")


@dataclass
class _Progress:
    reporter: Reporter
    todo: int
    started: float = field(default_factory=time.perf_counter)
    bytes: int = 0
    done: int = 0

    def step(self, name: str, e: int, nbytes: int) -> None:
        self.bytes += nbytes
        self.done += 1
        rate = self.bytes / max(time.perf_counter() - self.started, 1e-9) / 1e6
        self.reporter.update("import", advance=1, file=name, expert=e, mb_s=round(rate, 1))


def _base(config: dict[str, Any], plan: ReplayPlan | CompressedPlan, meta: DatasetMeta, fmt: str) -> dict[str, Any]:
    return {"format": fmt, "dataset": meta.name, "zca": meta.zca, "zca_eps": meta.zca_eps,
            "train_fingerprint": meta.train_fingerprint, "model": plan.spec.to_dict(), **config}


def import_replay(plan: ReplayPlan, out: Path, cfg: ImportConfig, prepared: Prepared,
                  reporter: Reporter = SILENT) -> ImportResult:
    """Stream every expert of a checked replay-buffer folder into `out` (resuming a partial import)."""
    scan, meta = plan.scan, prepared.meta
    for note in plan.notes:
        reporter.log(f"note: {note}")
    if scan.gaps:
        reporter.log(f"note: replay_buffer numbering has gaps (missing {describe_numbers(scan.gaps)}): importing the "
                     f"{len(scan.files)} files present in numeric order (the scripts' readers stop at the first gap)")
    if set(scan.dtypes) != {"torch.float32"}:
        exact = set(scan.dtypes) <= {"torch.float32", "torch.float16", "torch.bfloat16"}
        reporter.log(f"note: the snapshots are stored as {', '.join(scan.dtypes)}: converted to float32"
                     + ("" if exact else " (float64 values are rounded)"))
    for f in scan.files:
        if not f.streaming:
            reporter.log(f"note: {f.path.name} is in the legacy (pre-1.6) torch format: read whole "
                         f"({f.bytes / 1e6:.0f} MB in memory)")
    config = _base({"epochs": scan.epochs}, plan, meta, REPLAY_FORMAT)
    source = {"format": REPLAY_FORMAT, "folder": str(scan.folder.resolve()), "files": scan.listing(),
              "gaps": list(scan.gaps)}
    new = h5out.NewBuffer(meta, plan.spec, plan.layout, scan.epochs, scan.num_experts, _training(cfg), config,
                          source)
    created = not out.exists()
    done = _open_out(out, new, reporter)
    with _removed_on_refusal(out, created):
        return _replay_rows(plan, out, cfg, prepared, reporter, done)


def _replay_rows(plan: ReplayPlan, out: Path, cfg: ImportConfig, prepared: Prepared, reporter: Reporter,
                 done: list[bool]) -> ImportResult:
    scan, meta = plan.scan, prepared.meta
    total, K, names = scan.num_experts, scan.epochs, [n for n, _ in plan.layout]
    row_bytes = (K + 1) * (scan.num_params + 2) * 4 + 64
    todo = total - sum(done[:total])
    reporter.task("import", f"import {todo} expert(s) into {out.name}", total=todo)
    progress = _Progress(reporter, todo)
    first_acc: float | None = None
    base = 0
    for bf in scan.files:
        pending = [e for e in range(bf.experts) if not (base + e < len(done) and done[base + e])]
        if pending:
            with open_torch_file(bf.path) as tf:
                experts = experts_of(tf)
                for e in pending:
                    row = base + e
                    snaps = check_expert(experts[e], scan.shapes, K + 1, bf.path, e, names)
                    acc = None
                    if cfg.accuracy == "last" or (cfg.accuracy == "first" and progress.done == 0):
                        acc = _accuracy(plan.spec, flat_snapshot(tf, snaps[-1], e, K, names), prepared)
                        if first_acc is None:
                            first_acc = acc
                            _sanity(acc, meta.num_classes, meta.zca, reporter, f"{bf.path.name} expert {e}")
                    before = tf.bytes_read
                    with h5out.open_rows(out, row_bytes) as writer:
                        for k, leaves in enumerate(snaps):
                            writer.snapshot(row, k, flat_snapshot(tf, leaves, e, k, names))
                        writer.finish(row, acc)
                    tf.drop_cache()
                    progress.step(bf.path.name, e, tf.bytes_read - before)
                    stop_if_asked(reporter, _KEPT)
        base += bf.experts
    reporter.done("import")
    return _result(out, REPLAY_FORMAT, plan, total, progress, sum(done[:total]), first_acc,
                   {"epochs": K, "files": len(scan.files), "gaps": list(scan.gaps),
                    "source_bytes": scan.total_bytes})


def import_compressed(plan: CompressedPlan, out: Path, cfg: ImportConfig, prepared: Prepared,
                      reporter: Reporter = SILENT) -> ImportResult:
    """Stream every expert of checked waypoint/step pairs into /convex rows of `out`."""
    scan, meta = plan.scan, prepared.meta
    for note in plan.notes:
        reporter.log(f"note: {note}")
    if scan.gaps:
        reporter.log(f"note: the pair numbering has gaps (missing {describe_numbers(scan.gaps)}): importing the "
                     f"{len(scan.pairs)} pairs present in numeric order")
    convex = ConvexMeta(tuple(scan.positions), scan.strategy, scan.smooth)
    config = _base({"epochs": scan.epochs, "variant": scan.variant, "positions": list(scan.positions)}, plan, meta,
                   COMPRESSED_FORMAT)
    source = {"format": COMPRESSED_FORMAT, "folder": str(scan.folder.resolve()), "variant": scan.variant,
              "files": scan.listing(), "gaps": list(scan.gaps)}
    new = h5out.NewBuffer(meta, plan.spec, plan.layout, scan.epochs, scan.num_experts, _training(cfg), config,
                          source, convex)
    created = not out.exists()
    done = _open_out(out, new, reporter)
    with _removed_on_refusal(out, created):
        return _compressed_rows(plan, out, cfg, prepared, reporter, done)


def _compressed_rows(plan: CompressedPlan, out: Path, cfg: ImportConfig, prepared: Prepared, reporter: Reporter,
                     done: list[bool]) -> ImportResult:
    scan, meta = plan.scan, prepared.meta
    total = scan.num_experts
    row_bytes = (len(scan.positions) * scan.num_params + (scan.epochs + 1) * (len(scan.shapes) + 2)) * 4 + 64
    todo = total - sum(done[:total])
    reporter.task("import", f"import {todo} compressed expert(s) into {out.name}", total=todo)
    progress = _Progress(reporter, todo)
    first_acc: float | None = None
    base = 0
    for pair in scan.pairs:
        pending = [e for e in range(pair.experts) if not (base + e < len(done) and done[base + e])]
        if pending:
            with open_torch_file(pair.waypoint) as wtf, open_torch_file(pair.step) as stf:
                for e in pending:
                    before = wtf.bytes_read + stf.bytes_read
                    waypoints, beta = read_expert(wtf, stf, e, scan)
                    acc = None
                    if cfg.accuracy == "last" or (cfg.accuracy == "first" and progress.done == 0):
                        acc = _accuracy(plan.spec, waypoints[-1], prepared)  # the last (maybe smoothed) waypoint
                        if first_acc is None:
                            first_acc = acc
                            _sanity(acc, meta.num_classes, meta.zca, reporter, f"{pair.waypoint.name} expert {e}")
                    with h5out.open_rows(out, row_bytes) as writer:
                        writer.finish(base + e, acc, waypoints, beta)
                    progress.step(pair.waypoint.name, e, wtf.bytes_read + stf.bytes_read - before)
                    stop_if_asked(reporter, _KEPT)
        base += pair.experts
    reporter.done("import")
    return _result(out, COMPRESSED_FORMAT, plan, total, progress, sum(done[:total]), first_acc,
                   {"epochs": scan.epochs, "files": 2 * len(scan.pairs), "gaps": list(scan.gaps),
                    "variant": scan.variant, "positions": list(scan.positions), "strategy": scan.strategy,
                    "smoothing": "authors-code" if scan.smooth else "none",
                    "source_bytes": sum(p.bytes for p in scan.pairs)})


@dataclass
class ImportResult:
    """What `mctool import` did."""

    file: str
    format: str
    experts: int
    imported: int
    already_done: int
    model: dict[str, Any]
    num_params: int
    notes: list[str]
    first_test_accuracy: float | None
    bytes_read: int
    seconds: float
    epochs: int
    files: int
    gaps: list[int]
    source_bytes: int
    variant: str | None = None
    positions: list[int] | None = None
    strategy: str | None = None
    smoothing: str | None = None


def _result(out: Path, fmt: str, plan: ReplayPlan | CompressedPlan, total: int, progress: _Progress,
            already: int, first_acc: float | None, extra: dict[str, Any]) -> ImportResult:
    seconds = time.perf_counter() - progress.started
    return ImportResult(file=str(out), format=fmt, experts=total, imported=progress.done, already_done=already,
                        model=plan.spec.to_dict(), num_params=plan.scan.num_params, notes=list(plan.notes),
                        first_test_accuracy=first_acc, bytes_read=progress.bytes, seconds=round(seconds, 2),
                        **extra)


def choose_kind(folder: Path, kind: str) -> str:
    """`trajectories` (replay_buffer_{n}.pt) or `compressed` (waypoint/step pairs), by what the folder holds."""
    from mctool.interop.compressed import ANY_WAYPOINT

    if kind not in ("auto", "trajectories", "compressed"):
        raise UsageError(f"unknown --kind '{kind}' (use auto, trajectories or compressed)")
    if kind != "auto":
        return kind
    if not folder.is_dir():
        raise UsageError(f"{folder}: no such folder")
    names = [p.name for p in folder.iterdir()]
    has_replay = any(REPLAY_PATTERN.match(n) for n in names)
    has_compressed = any(ANY_WAYPOINT.match(n) for n in names)
    if has_replay and has_compressed:
        raise UsageError(f"{folder}: holds both full trajectories and compressed pairs; choose with "
                         "--kind trajectories or --kind compressed")
    return "compressed" if has_compressed else "trajectories"


def run(folder: Path, out: Path, cfg: ImportConfig, kind: str = "auto", data_dir: Path | None = None,
        device: str = "auto", download: bool = True, reporter: Reporter = SILENT) -> ImportResult:
    """`mctool import`: check every file, prepare the dataset the experts learned, stream the
    experts into `out` (resuming an interrupted import)."""
    from mctool import store
    from mctool.core.device import resolve_device
    from mctool.data.prepared import prepare

    source = resolve_source(folder, cfg)
    chosen = choose_kind(folder, kind)
    store.check_writable(out)
    # Cheap checks of every file (pickles only) before the dataset is loaded.
    if chosen == "trajectories":
        scan_replay_folder(folder)
    else:
        find_pairs(folder, cfg.variant)
    stop_if_asked(reporter, "nothing was written")
    for note in source.notes:
        reporter.log(f"note: {note}")
    reporter.log(f"loading {source.dataset}" + (" and fitting ZCA (cached after the first time)" if source.zca else ""))
    prepared = prepare(source.dataset, data_dir, source.zca, cfg.zca_eps, resolve_device(device), download=download)
    stop_if_asked(reporter, "nothing was written")
    # Held for the whole import, as distill and experts hold theirs: another mctool's write to
    # `out` is refused with one line instead of interleaving with the import's rows.
    with store.holding(out):
        if chosen == "trajectories":
            result = import_replay(plan_replay(folder, cfg, source, prepared.meta), out, cfg, prepared, reporter)
        else:
            result = import_compressed(plan_compressed(folder, cfg, source, prepared.meta), out, cfg, prepared,
                                       reporter)
    result.notes = list(source.notes) + result.notes
    return result
