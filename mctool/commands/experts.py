"""`mctool experts`: train expert networks and record their trajectories."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import typer

from mctool.cli import DataDirOpt, DebugOpt, DeviceOpt, JsonOpt, QuietOpt, app, emit_json, run
from mctool.render import stdout, table


@app.command(
    epilog="Examples:\n\n  mctool experts fashion-mnist --n 2 --epochs 10 --width 32\n\n"
    "  mctool experts cifar10 --n 100 -o cifar10.h5\n\n"
    "  mctool experts cifar10 --n 100 --convexify --interior 2   (waypoints + beta only)",
)
def experts(
    dataset: str = typer.Argument(..., metavar="DATASET", help="cifar10, cifar100, tinyimagenet, fashion-mnist, mnist or folder:PATH."),
    n: int = typer.Option(1, "--n", "-n", "--num-experts", min=1, help="Number of experts the buffer should hold (appends to an existing one). Under torchrun write --num-experts (torchrun takes --n for itself)."),
    epochs: int = typer.Option(50, "--epochs", min=1, help="Epochs per expert (K); K+1 snapshots are kept."),
    lr: float = typer.Option(0.01, "--lr", help="SGD learning rate."),
    momentum: float = typer.Option(0.0, "--momentum", help="SGD momentum."),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help="SGD weight decay."),
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="Training batch size."),
    width: int = typer.Option(128, "--width", min=1, help="ConvNet width (channels)."),
    depth: Optional[int] = typer.Option(None, "--depth", min=1, help="ConvNet depth (default: 3 for 28/32 px, 4 for 64 px, 5 for 128 px)."),
    zca: bool = typer.Option(True, "--zca/--no-zca", help="ZCA whitening (Table A) or mean/std normalisation."),
    augment: str = typer.Option("color_crop_cutout_flip_scale_rotate", "--augment", help="DSA ops joined by '_', or 'none'."),
    seed: int = typer.Option(0, "--seed", help="Run seed; expert i uses a seed spawned from (seed, i)."),
    out: Path = typer.Option(Path("buffer.h5"), "-o", "--out", help="Buffer file to create or extend."),
    resume: bool = typer.Option(False, "--resume", help="Require an existing buffer and continue it (re-running the same command resumes anyway)."),
    convexify: bool = typer.Option(False, "--convexify", help="Stream: compute waypoints + beta while training and never store the full trajectory (positions must be known up front: --interior/--positions)."),
    interior: Optional[int] = typer.Option(None, "--interior", min=0, help="With --convexify: interior waypoints, uniformly placed (default 2)."),
    positions: Optional[str] = typer.Option(None, "--positions", help="With --convexify: explicit positions, e.g. 0,17,34,50."),
    beta: Optional[str] = typer.Option(None, "--beta", help="With --convexify: mct (default), uniform, decreasing or projected."),
    smooth: bool = typer.Option(False, "--smooth", help="With --convexify: the authors' code's waypoint smoothing."),
    download: bool = typer.Option(True, "--download/--no-download", help="Download CIFAR/Tiny ImageNet/MNIST into --data-dir when missing (offline: one line saying where to put the files)."),
    data_dir: Optional[Path] = DataDirOpt,
    device: str = DeviceOpt,
    json_out: bool = JsonOpt,
    quiet: bool = QuietOpt,
    debug: bool = DebugOpt,
) -> None:
    """Train N expert networks on the real training set and record their parameter trajectories."""

    def body(reporter):
        from mctool import distributed
        from mctool.convex import ConvexifyConfig
        from mctool.device import resolve_device
        from mctool.errors import UsageError
        from mctool.experts import ExpertsConfig, run as run_experts
        from mctool.nets import default_depth
        from mctool.prepared import prepare

        if not convexify and (interior is not None or positions is not None or beta is not None or smooth):
            raise UsageError("--interior, --positions, --beta and --smooth only apply with --convexify "
                             "(or run `mctool convexify` on the buffer afterwards)")
        if resume and not out.exists():
            raise UsageError(f"--resume: {out} does not exist (drop --resume to start a new buffer)")
        dev = resolve_device(device)
        distributed.init_from_env(dev)
        if not distributed.is_main():
            reporter.quiet, reporter.bars = True, False
        stream_positions = None
        if convexify:
            stream = ConvexifyConfig(ConvexifyConfig.interior if interior is None else interior, positions,
                                     beta or ConvexifyConfig.strategy, smooth)
            stream_positions = tuple(stream.resolve_positions(epochs))
        if download and distributed.world_size() > 1:
            # Rank 0 downloads (if needed) while the others wait, instead of all racing for the files.
            if distributed.is_main():
                from mctool.data import load_dataset

                load_dataset(dataset, data_dir, download=True)
            distributed.barrier()
        cfg = ExpertsConfig(
            dataset=dataset, num_experts=n, epochs=epochs, lr=lr, momentum=momentum,
            weight_decay=weight_decay, batch_size=batch_size, width=width, depth=depth or 0, zca=zca,
            augment=augment, seed=seed, stream_positions=stream_positions,
            stream_strategy=beta or ConvexifyConfig.strategy, stream_smooth=smooth,
        )
        cfg.validate()  # before any download, cache or file
        prepared = prepare(dataset, data_dir, zca, 0.1, dev, download=download and distributed.world_size() == 1)
        cfg = dataclasses.replace(cfg, dataset=prepared.meta.name,
                                  depth=depth or default_depth(prepared.meta.height))
        result = run_experts(cfg, out, prepared, reporter)
        distributed.shutdown()
        if not distributed.is_main():
            return
        if json_out:
            emit_json(result)
        else:
            rows = [[t["expert"], t["seed"], t["test_accuracy_first"], t["test_accuracy_last"], f"{t['seconds']:.1f}"]
                    for t in result["trained"]]
            if not rows:
                stdout.print(f"{out}: already holds {result['already_done']} finished expert(s) — nothing to do "
                             "(raise --n to add more)")
                return
            before = result["already_done"]
            earlier = f" ({before} done before this run, not listed)" if before else ""
            stdout.print(table(f"{out}: {before + len(rows)}/{n} experts done{earlier}",
                               ["expert", "seed", "acc θ_0", "acc θ_K", "seconds"], rows))

    run(body, quiet, debug, interrupt_hint="finished experts are kept: run the same command again to resume")
