"""`mctool import` and `mctool export` (NOT registered: the integrator moves them into the cli package).

Register on an app with ``register(app)``; tests do so on a fresh Typer app.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from mctool.cli import DataDirOpt, DebugOpt, DeviceOpt, JsonOpt, QuietOpt, emit_json, run
from mctool.render import stdout, table

IMPORT_EPILOG = (
    "Examples:\n\n  mctool import buffers/CIFAR10/ConvNet -o cifar10.h5          (dataset and ZCA from the folder name)\n\n"
    "  mctool import ~/mtt/buffers/run7 --dataset cifar100 --zca -o c100.h5\n\n"
    "  mctool import buffers/Tiny/ConvNet --dataset tinyimagenet --no-zca --depth 3 -o tiny.h5\n\n"
    "  mctool import buffers/CIFAR10/ConvNet --kind compressed --variant ip4 -o mct.h5"
)


def import_cmd(
    folder: Path = typer.Argument(..., metavar="FOLDER", help="Folder holding replay_buffer_{n}.pt (or the MCT authors' waypoint_buffer*/step_buffer* pairs)."),
    out: Path = typer.Option(Path("buffer.h5"), "-o", "--out", help="Buffer to create, or to resume an interrupted import into."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Dataset the experts learned (cifar10, cifar100, tinyimagenet, fashion-mnist, mnist, folder:PATH); default: from the scripts' folder name <DATASET>[_NO_ZCA]/<model>/."),
    zca: Optional[bool] = typer.Option(None, "--zca/--no-zca", help="Whether the experts saw ZCA-whitened images (the files do not say); default: from the folder name (CIFAR folders end in _NO_ZCA without ZCA)."),
    zca_eps: float = typer.Option(0.1, "--zca-eps", help="ZCA epsilon the scripts used (0.1)."),
    model: Optional[str] = typer.Option(None, "--model", help="The scripts' model name (ConvNet, ConvNetD4, ConvNetBN, ...); default: the folder name if it is one."),
    depth: Optional[int] = typer.Option(None, "--depth", min=1, help="ConvNet depth (checked against the files; inferred from them when omitted)."),
    width: Optional[int] = typer.Option(None, "--width", min=1, help="ConvNet width (checked; inferred when omitted)."),
    norm: Optional[str] = typer.Option(None, "--norm", help="instancenorm, batchnorm, groupnorm, layernorm or none (the first three look alike in the files; default instancenorm)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="Expected K (checked against the files)."),
    kind: str = typer.Option("auto", "--kind", help="auto, trajectories (replay_buffer_{n}.pt) or compressed (waypoint/step pairs)."),
    variant: Optional[str] = typer.Option(None, "--variant", help="Compressed pairs: ip4, ip2, uni, dec or proj (needed when a folder holds several)."),
    accuracy: str = typer.Option("last", "--accuracy", help="Test accuracy of the final weights, stored as the whole-data reference: last (every expert), first (one, as a check), none."),
    lr: float = typer.Option(0.01, "--lr", help="The experts' training lr, recorded as stated (buffer.py's default)."),
    momentum: float = typer.Option(0.0, "--momentum", help="Recorded as stated."),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help="Recorded as stated."),
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="Recorded as stated."),
    download: bool = typer.Option(True, "--download/--no-download", help="Download the dataset into --data-dir when missing."),
    data_dir: Optional[Path] = DataDirOpt,
    device: str = DeviceOpt,
    json_out: bool = JsonOpt,
    quiet: bool = QuietOpt,
    debug: bool = DebugOpt,
) -> None:
    """Import expert buffers of the MTT family of scripts (MTT, FTD, DATM, TESLA, MCT) into one mctool buffer."""

    def body(reporter: Any) -> None:
        from mctool.device import resolve_device
        from mctool.interop import importer
        from mctool.interop.buffers import REPLAY_PATTERN, scan_replay_folder
        from mctool.interop.compressed import ANY_WAYPOINT, find_pairs
        from mctool.prepared import prepare

        cfg = importer.ImportConfig(dataset=dataset, zca=zca, zca_eps=zca_eps, model=model, depth=depth, width=width,
                                    norm=norm, epochs=epochs, variant=variant, accuracy=accuracy, lr=lr,
                                    momentum=momentum, weight_decay=weight_decay, batch_size=batch_size)
        source = importer.resolve_source(folder, cfg)
        chosen = _kind(folder, kind, REPLAY_PATTERN, ANY_WAYPOINT)
        # Cheap checks of every file (pickles only) before the dataset is loaded.
        if chosen == "trajectories":
            scan_replay_folder(folder)
        else:
            find_pairs(folder, variant)
        for note in source.notes:
            reporter.log(f"note: {note}")
        prepared = prepare(source.dataset, data_dir, source.zca, zca_eps, resolve_device(device), download=download)
        if chosen == "trajectories":
            plan = importer.plan_replay(folder, cfg, source, prepared.meta)
            result = importer.import_replay(plan, out, cfg, prepared, reporter)
        else:
            cplan = importer.plan_compressed(folder, cfg, source, prepared.meta)
            result = importer.import_compressed(cplan, out, cfg, prepared, reporter)
        result["notes"] = list(source.notes) + result["notes"]
        if json_out:
            emit_json(result)
            return
        m = result["model"]
        acc = result["first_test_accuracy"]
        stdout.print(table(
            f"{result['file']}: imported {result['format']}",
            ["experts", "new", "files", "K", "model", "P", "source MB", "test acc (first)"],
            [[result["experts"], result["imported"], result["files"], result["epochs"],
              f"ConvNet d{m['depth']} w{m['width']} {m['norm']}", result["num_params"],
              f"{result['source_bytes'] / 1e6:.1f}", "" if acc is None else f"{100 * acc:.2f}%"]]))

    run(body, quiet, debug, interrupt_hint="finished experts are kept: run the same command again to resume")


def _kind(folder: Path, kind: str, replay: Any, compressed: Any) -> str:
    from mctool.errors import UsageError

    if kind not in ("auto", "trajectories", "compressed"):
        raise UsageError(f"unknown --kind '{kind}' (use auto, trajectories or compressed)")
    if kind != "auto":
        return kind
    if not folder.is_dir():
        raise UsageError(f"{folder}: no such folder")
    names = [p.name for p in folder.iterdir()]
    has_replay = any(replay.match(n) for n in names)
    has_compressed = any(compressed.match(n) for n in names)
    if has_replay and has_compressed:
        raise UsageError(f"{folder}: holds both full trajectories and compressed pairs; choose with "
                         "--kind trajectories or --kind compressed")
    return "compressed" if has_compressed else "trajectories"


EXPORT_EPILOG = (
    "Examples:\n\n  mctool export synset.h5 --format mtt -o for-mtt/        (images_best.pt, labels_best.pt, lr_best.pt)\n\n"
    "  mctool export synset.h5 --format ddranking -o dd/        (images.pt, labels.pt, lr.pt)\n\n"
    "  mctool export synset.h5 --format png -o pictures/         (one folder per class)"
)


def export_cmd(
    file: Path = typer.Argument(Path("synset.h5"), metavar="FILE", help="File with a synthetic set (from `mctool distill`)."),
    fmt: str = typer.Option(..., "--format", "-f", help="mtt (MTT/FTD/DATM/TESLA file names), ddranking (DD-Ranking's), or png (de-whitened images per class)."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Folder to write (default: FILE's name + -FORMAT); must be empty or an earlier export."),
    name: Optional[str] = typer.Option(None, "--name", help="Synset to export (default: the only or latest one)."),
    zca_matrix: bool = typer.Option(False, "--zca-matrix", help="Also write zca.pt (mean, transform, inverse) so receivers can de-whiten exactly (37 MB for CIFAR)."),
    data_dir: Optional[Path] = DataDirOpt,
    json_out: bool = JsonOpt,
    quiet: bool = QuietOpt,
    debug: bool = DebugOpt,
) -> None:
    """Write a synthetic set as the tensor files MTT-family scripts and DD-Ranking read, or as PNGs per class."""

    def body(reporter: Any) -> None:
        import torch

        from mctool.errors import DatasetNotFound, UsageError
        from mctool.interop import export, h5out
        from mctool.prepared import prepare_like

        if fmt not in export.FORMATS:
            raise UsageError(f"unknown --format '{fmt}' (use {', '.join(export.FORMATS)})")
        syn = h5out.read_synset(file, name)
        target = out or file.with_name(f"{file.stem}-{fmt}")
        prep = export.preprocessing_without_data(syn.meta)
        if prep is None and (fmt in ("png", "mtt") or zca_matrix):
            try:  # the ZCA matrix is refitted from the fingerprinted training split (cached)
                prep = prepare_like(syn.meta, data_dir, torch.device("cpu")).prep
            except DatasetNotFound:
                if fmt == "png" or zca_matrix:
                    raise
                reporter.log(f"note: {syn.meta.name} is not on this machine, so images_zca_best.pt "
                             "(the de-whitened images) is left out")
        if fmt == "png":
            assert prep is not None
            doc = export.export_pngs(syn, target, prep)
        else:
            doc = export.export_tensors(syn, target, fmt, prep, zca_matrix)
        files = sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file())
        result = {"folder": str(target), "format": fmt, "synset": syn.name, "files": files, "description": doc}
        if json_out:
            emit_json(result)
            return
        rows = [[syn.name, fmt, len(files), doc["labels"]["kind"], doc["space"]["kind"], f"{syn.lr:.4g}"]]
        stdout.print(table(f"{target}: exported", ["synset", "format", "files", "labels", "space", "lr"], rows))

    run(body, quiet, debug, interrupt_hint="the export folder may be incomplete: run the command again")


def register(app: typer.Typer) -> None:
    """Add `import` and `export` to a Typer app."""
    app.command("import", epilog=IMPORT_EPILOG)(import_cmd)
    app.command("export", epilog=EXPORT_EPILOG)(export_cmd)


def score_rows(results: list[dict[str, Any]], reference: dict[str, Any] | None, soft_labels: bool,
               whole_override: float | None) -> tuple[list[str], list[list[Any]]]:
    """Header and rows of the 'scores the field compares by' table for `mctool evaluate`."""
    from mctool.interop.scores import field_scores, whole_data_accuracy

    whole, origin = whole_data_accuracy(reference, whole_override)
    header = ["model", "synset %", "random real %", "gain (pp)", "whole data %", "HLR (pp)"]
    rows = []
    for r in field_scores(results, whole, soft_labels, origin):
        def pp(mean: float | None, std: float | None) -> str:
            if mean is None:
                return "—"
            return f"{100 * mean:+.2f}" + ("" if std is None else f" ± {100 * std:.2f}")
        rows.append([r["model"], f"{100 * r['synset_mean']:.2f} ± {100 * r['synset_std']:.2f}",
                     "—" if r["random_mean"] is None else f"{100 * r['random_mean']:.2f} ± {100 * r['random_std']:.2f}",
                     pp(r["gain_mean"], r["gain_std"]),
                     "—" if whole is None else f"{100 * whole:.2f} ({origin})",
                     pp(r["hlr_mean"], r["hlr_std"]) if r["hlr_mean"] is not None else f"— {r['hlr_note']}"])
    return header, rows
