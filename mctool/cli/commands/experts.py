"""`mctool experts`: train expert networks and record their trajectories."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from mctool.cli.common import DataDirOpt, DebugOpt, DeviceOpt, JsonOpt, QuietOpt, emit_json, run, settings_from, with_settings
from mctool.cli.render import stdout, table
from mctool.configs.experts import ExpertsConfig

EPILOG = ("Examples:\n\n  mctool experts fashion-mnist --n 2 --epochs 10 --width 32   (a CPU: minutes)\n\n"
          "  mctool experts folder:pets --n 5 --epochs 30 --width 32 --batch-size 32   (your own images; a small "
          "set wants a small batch)\n\n"
          "  mctool experts cifar10 --n 100 -o cifar10.h5   (the paper's buffer: hours on a GPU, days on a CPU)\n\n"
          "  mctool experts cifar10 --n 100 --convexify --interior 2   (waypoints + beta only)")


@with_settings(ExpertsConfig, optional=False)
def experts(
    dataset: str = typer.Argument(..., metavar="DATASET", help="cifar10, cifar100, tinyimagenet, fashion-mnist, mnist or folder:PATH (see README, Datasets)."),
    out: Path = typer.Option(Path("buffer.h5"), "-o", "--out", help="Buffer file to create or extend."),
    resume: bool = typer.Option(False, "--resume", help="Require an existing buffer and continue it (re-running the same command resumes anyway)."),
    download: bool = typer.Option(True, "--download/--no-download", help="Download CIFAR/Tiny ImageNet/MNIST into --data-dir when missing (offline: one line saying where to put the files)."),
    data_dir: Optional[Path] = DataDirOpt,
    device: str = DeviceOpt,
    json_out: bool = JsonOpt,
    quiet: bool = QuietOpt,
    debug: bool = DebugOpt,
    **settings: Any,
) -> None:
    """Train N expert networks on the real training set and record their parameter trajectories."""

    def body(reporter):
        from mctool.experts import run as run_experts

        cfg = ExpertsConfig(dataset=dataset, **settings_from(ExpertsConfig, settings))
        result = run_experts(cfg, out, data_dir, device, download, resume, reporter)
        if result is None:
            return
        if json_out:
            emit_json(result)
            return
        rows = [[t.expert, t.seed, t.test_accuracy_first, t.test_accuracy_last, f"{t.seconds:.1f}"]
                for t in result.trained]
        if not rows:
            stdout.print(f"{out}: already holds {result.already_done} finished expert(s) — nothing to do "
                         "(raise --n to add more)")
            return
        before = result.already_done
        earlier = f" ({before} done before this run, not listed)" if before else ""
        stdout.print(table(f"{out}: {before + len(rows)}/{result.experts} experts done{earlier}",
                           ["expert", "seed", "acc θ_0", "acc θ_K", "seconds"], rows))

    run(body, quiet, debug, interrupt_hint="finished experts are kept: run the same command again to resume")
