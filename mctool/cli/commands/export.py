"""`mctool export`: a synthetic set as the tensor files MTT-family scripts and DD-Ranking read, or PNGs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from mctool.cli.common import DataDirOpt, DebugOpt, JsonOpt, QuietOpt, emit_json, run
from mctool.cli.render import stdout, table

EPILOG = (
    "Examples:\n\n  mctool export synset.h5 --format mtt -o for-mtt/        (images_best.pt, or images_ITER.pt for final "
    "images; labels_*, lr_* alike)\n\n"
    "  mctool export synset.h5 --format ddranking -o dd/        (images.pt, labels.pt, lr.pt)\n\n"
    "  mctool export synset.h5 --format png -o pictures/         (one folder per class)"
)


def export(
    file: Path = typer.Argument(Path("synset.h5"), metavar="FILE", help="File with a synthetic set (from `mctool distill`)."),
    fmt: str = typer.Option(..., "--format", "-f", help="mtt (MTT/FTD/DATM/TESLA file names), ddranking (DD-Ranking's), or png (de-whitened images per class)."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Folder to write (default: FILE's name + -FORMAT); must be absent, empty or an earlier export, which is replaced as a whole."),
    name: Optional[str] = typer.Option(None, "--name", help="Synset to export (default: the only or latest one)."),
    images: str = typer.Option("auto", "--images", help="final, best (kept by distill --eval-every, or by --eval-share: the default without a preset), or auto: best when the synset keeps them, else final."),
    zca_matrix: bool = typer.Option(False, "--zca-matrix", help="Also write zca.pt (mean, transform, inverse) so receivers can de-whiten exactly (37 MB for CIFAR)."),
    data_dir: Optional[Path] = DataDirOpt,
    json_out: bool = JsonOpt,
    quiet: bool = QuietOpt,
    debug: bool = DebugOpt,
) -> None:
    """Write a synthetic set as the tensor files MTT-family scripts and DD-Ranking read, or as PNGs per class."""

    def body(reporter: Any) -> None:
        from mctool.interop.export import export_file

        result = export_file(file, fmt, out, name, images, zca_matrix, data_dir, reporter)
        if json_out:
            emit_json(result)
            return
        doc = result.description
        rows = [[result.synset, result.images, fmt, len(result.files), doc["labels"]["kind"], doc["space"]["kind"],
                 f"{result.lr:.4g}"]]
        stdout.print(table(f"{result.folder}: exported", ["synset", "images", "format", "files", "labels", "space",
                                                          "lr"], rows))

    run(body, quiet, debug, interrupt_hint="the export folder was not changed: run the command again")
