"""`mctool import`: expert buffers of the MTT family of scripts into one mctool buffer, or a
synthetic set made elsewhere (the scripts' images_*.pt, a DD-Ranking folder, an mctool export)
into a synset file that `mctool evaluate` scores."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from mctool.cli.common import DataDirOpt, DebugOpt, DeviceOpt, JsonOpt, QuietOpt, emit_json, run
from mctool.cli.render import stdout, table

EPILOG = (
    "Examples:\n\n  mctool import buffers/CIFAR10/ConvNet -o cifar10.h5          (dataset and ZCA from the folder name)\n\n"
    "  mctool import ~/mtt/buffers/run7 --dataset cifar100 --zca -o c100.h5\n\n"
    "  mctool import buffers/Tiny/ConvNet --dataset tinyimagenet --no-zca --depth 3 -o tiny.h5\n\n"
    "  mctool import buffers/CIFAR10/ConvNet --kind compressed --variant ip4 -o mct.h5\n\n"
    "  mctool import logged_files/CIFAR10/run7/images_best.pt --dataset cifar10 --zca -o mtt.h5   (a synset)\n\n"
    "  mctool import for-ddranking/ -o back.h5                      (an mctool export: everything from its JSON)"
)


def import_(
    folder: Path = typer.Argument(..., metavar="FOLDER", help="Folder holding replay_buffer_{n}.pt (or the MCT authors' waypoint_buffer*/step_buffer* pairs); or a synthetic set: an images*.pt file, a folder holding one, or an mctool export folder."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Buffer to create, or to resume an interrupted import into (default buffer.h5); for a synthetic set, the synset file to create or add to (default synset.h5)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Dataset the experts learned (cifar10, cifar100, tinyimagenet, fashion-mnist, mnist, folder:PATH); default: from the scripts' folder name <DATASET>[_NO_ZCA]/<model>/."),
    zca: Optional[bool] = typer.Option(None, "--zca/--no-zca", help="Whether the experts saw ZCA-whitened images (the files do not say); default: from the folder name (CIFAR folders end in _NO_ZCA without ZCA)."),
    zca_eps: float = typer.Option(0.1, "--zca-eps", help="ZCA epsilon the scripts used (0.1)."),
    model: Optional[str] = typer.Option(None, "--model", help="The scripts' model name (ConvNet, ConvNetD4, ConvNetBN, ...); default: the folder name if it is one."),
    depth: Optional[int] = typer.Option(None, "--depth", min=1, help="ConvNet depth (checked against the files; inferred from them when omitted)."),
    width: Optional[int] = typer.Option(None, "--width", min=1, help="ConvNet width (checked; inferred when omitted)."),
    norm: Optional[str] = typer.Option(None, "--norm", help="instancenorm, batchnorm, groupnorm, layernorm or none (the first three look alike in the files; default instancenorm)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="Expected K (checked against the files)."),
    kind: str = typer.Option("auto", "--kind", help="auto, trajectories (replay_buffer_{n}.pt), compressed (waypoint/step pairs) or synset (images*.pt / an export; auto picks it for an images file, an export, or a folder of images*.pt without expert files)."),
    variant: Optional[str] = typer.Option(None, "--variant", help="Compressed pairs: ip4, ip2, uni, dec or proj (needed when a folder holds several)."),
    accuracy: str = typer.Option("last", "--accuracy", help="Test accuracy of the final weights, stored as the whole-data reference: last (every expert), first (one, as a check), none."),
    lr: float = typer.Option(0.01, "--lr", help="The experts' training lr, recorded as stated (buffer.py's default)."),
    momentum: float = typer.Option(0.0, "--momentum", help="Recorded as stated."),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help="Recorded as stated."),
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="Recorded as stated."),
    syn_lr: Optional[float] = typer.Option(None, "--syn-lr", help="Synset: the step size to train on the images with, when no syn_lr/lr file was saved beside them (or to override it)."),
    space: str = typer.Option("auto", "--space", help="Synset: preprocessed (ZCA-whitened or normalised, what the scripts distil in), pixels ([0, 1], e.g. MTT's images_zca_*), or auto (pixels for images_zca_*)."),
    name: Optional[str] = typer.Option(None, "--name", help="Synset: name to store it under (default: the export's, or imported-<tag>)."),
    download: bool = typer.Option(True, "--download/--no-download", help="Download the dataset into --data-dir when missing."),
    data_dir: Optional[Path] = DataDirOpt,
    device: str = DeviceOpt,
    json_out: bool = JsonOpt,
    quiet: bool = QuietOpt,
    debug: bool = DebugOpt,
) -> None:
    """Import expert buffers of the MTT family of scripts (MTT, FTD, DATM, TESLA, MCT) into one mctool buffer."""

    def body(reporter: Any) -> None:
        from mctool.interop import importer, synsets_import

        if kind == "synset" or (kind == "auto" and synsets_import.looks_like_synset(folder)):
            _import_synset(reporter)
            return
        if syn_lr is not None or space != "auto" or name is not None:
            from mctool.core.errors import UsageError

            raise UsageError("--syn-lr, --space and --name are for synthetic sets; this is a folder of experts "
                             "(--kind synset to import it as a synthetic set)")

        cfg = importer.ImportConfig(dataset=dataset, zca=zca, zca_eps=zca_eps, model=model, depth=depth, width=width,
                                    norm=norm, epochs=epochs, variant=variant, accuracy=accuracy, lr=lr,
                                    momentum=momentum, weight_decay=weight_decay, batch_size=batch_size)
        result = importer.run(folder, out or Path("buffer.h5"), cfg, kind, data_dir, device, download, reporter)
        if json_out:
            emit_json(result)
            return
        m = result.model
        acc = result.first_test_accuracy
        stdout.print(table(
            f"{result.file}: imported {result.format}",
            ["experts", "new", "files", "K", "model", "P", "source MB", "test acc (first)"],
            [[result.experts, result.imported, result.files, result.epochs,
              f"ConvNet d{m['depth']} w{m['width']} {m['norm']}", result.num_params,
              f"{result.source_bytes / 1e6:.1f}", "" if acc is None else f"{100 * acc:.2f}%"]]))

    def _import_synset(reporter: Any) -> None:
        from mctool.interop import synsets_import

        cfg = synsets_import.SynsetImportConfig(dataset=dataset, zca=zca, zca_eps=zca_eps, space=space, lr=syn_lr,
                                                name=name, model=model, depth=depth, width=width, norm=norm)
        result = synsets_import.run(folder, out or Path("synset.h5"), cfg, data_dir, download, reporter)
        if json_out:
            emit_json(result)
            return
        m = result.model
        title = f"{result.file}: synset '{result.synset}'" + (" (already imported)" if result.already_imported else
                                                              f" imported from {result.format}")
        stdout.print(table(title, ["images", "ipc", "labels", "lr", "dataset", "space", "model"],
                           [[result.images, result.ipc, result.labels, f"{result.lr:.4g}", result.dataset,
                             ("ZCA" if result.zca else "normalised") + (" (from pixels)" if result.space == "pixels"
                                                                       else ""),
                             f"ConvNet d{m['depth']} w{m['width']} {m['norm']}"]]))
        if not quiet:
            stdout.print(f"score it: mctool evaluate {result.file} --name {result.synset} --baseline random")

    synset_like = kind == "synset" or (kind == "auto" and folder.is_file())
    run(body, quiet, debug, interrupt_hint="nothing was written; run the same command again" if synset_like else
        "finished experts are kept: run the same command again to resume")
