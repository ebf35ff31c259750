"""`mctool distill`: learn a synthetic set by matching convexified trajectories."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

import typer

from mctool.cli import DataDirOpt, DebugOpt, DeviceOpt, JsonOpt, QuietOpt, app, emit_json, run
from mctool.render import stdout, table


def resolve_config(preset: str | None, overrides: dict[str, Any]) -> Any:
    """DistillConfig from defaults <- preset <- command-line options (those given)."""
    from mctool.distill import config_from_preset

    return config_from_preset(preset, overrides)


def print_presets(json_out: bool) -> None:
    """The shipped presets as a table (or JSON)."""
    from mctool.presets import list_presets

    presets = list_presets()
    if json_out:
        emit_json([{"name": p.name, **p.values} for p in presets])
        return
    cols = ["name", "source", "ipc", "syn_steps", "expert_epochs", "max_start_epoch", "lr_img", "lr_lr", "lr_init",
            "iterations", "zca"]
    from mctool.distill import DistillConfig

    builtin = dataclasses.asdict(DistillConfig())
    rows = [[p.name] + [p.values.get(c, "") for c in cols[1:]] for p in presets]
    builtin["zca"] = "buffer's"  # without a preset, the buffer's preprocessing is expected
    rows.append(["(no preset)", "defaults"] + [builtin[c] for c in cols[2:]])
    stdout.print(table("presets (source 'paper' = MCT supplement Table A; 'ours' = mctool's own; options "
                       "override any of them)", cols, rows))


DEFAULT_BUFFER = Path("buffer.h5")


def missing_buffer_hint(buffer: Path, dataset: str | None) -> str:
    """What to run first when there is no buffer."""
    ds = dataset or "DATASET"
    other = " (or pass --buffer FILE)" if buffer == DEFAULT_BUFFER else ""
    return (f"{buffer}: no such file — make experts first: `mctool experts {ds} --n 100 -o {buffer}` "
            f"then `mctool convexify {buffer}`{other}")


@app.command(
    epilog="Examples:\n\n  mctool distill --list-presets\n\n"
    "  mctool distill --preset cifar10-ipc10                 (reads buffer.h5, writes synset.h5)\n\n"
    "  mctool distill --preset fashion-mnist-ipc10 --iterations 50 --buffer buffer.h5 -o synset.h5\n\n"
    "  mctool distill --preset cifar10-ipc10 --resume        (continue after Ctrl-C)\n\n"
    "  mctool distill --preset cifar10-ipc10 --method mtt    (MTT baseline on raw trajectories)",
)
def distill(
    preset: Optional[str] = typer.Option(None, "--preset", help="Shipped preset name or a .toml path; settings neither it nor an option gives take the built-in defaults (the last row of --list-presets)."),
    list_presets: bool = typer.Option(False, "--list-presets", help="Show the shipped presets and exit."),
    buffer: Path = typer.Option(DEFAULT_BUFFER, "--buffer", help="Buffer with /convex (MCT) or trajectories (MTT)."),
    out: Path = typer.Option(Path("synset.h5"), "-o", "--out", help="Output file for the synthetic set (a PNG grid is written beside it)."),
    name: Optional[str] = typer.Option(None, "--name", help="Synset name inside the file (default: the preset's name or METHOD-ipcN)."),
    ipc: Optional[int] = typer.Option(None, "--ipc", help="Images per class."),
    syn_steps: Optional[int] = typer.Option(None, "--syn-steps", help="Inner SGD steps on the synthetic set (N)."),
    expert_epochs: Optional[float] = typer.Option(None, "--expert-epochs", help="Target = start + expert_epochs (M), clamped to K."),
    max_start_epoch: Optional[float] = typer.Option(None, "--max-start-epoch", help="Start ~ U(0, max_start_epoch)."),
    lr_img: Optional[float] = typer.Option(None, "--lr-img", help="Image learning rate (SGD, momentum 0.5)."),
    lr_lr: Optional[float] = typer.Option(None, "--lr-lr", help="Learning rate of the learnable step size alpha."),
    lr_init: Optional[float] = typer.Option(None, "--lr-init", help="Initial value of alpha."),
    iterations: Optional[int] = typer.Option(None, "--iterations", help="Distillation iterations."),
    batch_syn: Optional[int] = typer.Option(None, "--batch-syn", help="Synthetic mini-batch per inner step (0 = all)."),
    zca: Optional[bool] = typer.Option(None, "--zca/--no-zca", help="Expected preprocessing of the buffer (checked)."),
    interior: Optional[int] = typer.Option(None, "--interior", help="Interior waypoints expected in the buffer (default: the preset's, else the buffer's); a buffer with another count is used as it is, with a note."),
    method: Optional[str] = typer.Option(None, "--method", help="mct (convexified, default) or mtt (raw trajectories, unrolled)."),
    grad: Optional[str] = typer.Option(None, "--grad", help="constant (MCT's two-pass, default), adjoint (exact, flat memory) or unrolled (exact)."),
    discrete: Optional[bool] = typer.Option(None, "--discrete/--continuous", help="Integer start epochs (ablation) instead of continuous."),
    pix_init: Optional[str] = typer.Option(None, "--init", help="Initial images: real (random real images per class) or noise."),
    soft_labels: Optional[bool] = typer.Option(None, "--soft-labels/--hard-labels", help="Labels from the expert's predictions."),
    augment: Optional[str] = typer.Option(None, "--augment", help="DSA ops joined by '_', or none."),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", help="Save a resumable checkpoint every N iterations (default 100)."),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help="Evaluate every N iterations and at the end (0 = never)."),
    eval_runs: Optional[int] = typer.Option(None, "--eval-runs", help="Networks per periodic evaluation (default 1)."),
    eval_epochs: Optional[int] = typer.Option(None, "--eval-epochs", help="Epochs per periodic evaluation (default 300)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Run seed (default 0)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the synset's checkpoint in -o FILE."),
    data_dir: Optional[Path] = DataDirOpt,
    device: str = DeviceOpt,
    json_out: bool = JsonOpt,
    quiet: bool = QuietOpt,
    debug: bool = DebugOpt,
) -> None:
    """Learn synthetic images by matching convexified expert trajectories (MCT)."""
    overrides = {k: v for k, v in locals().items() if k in {
        "ipc", "syn_steps", "expert_epochs", "max_start_epoch", "lr_img", "lr_lr", "lr_init", "iterations",
        "batch_syn", "zca", "interior", "method", "grad", "discrete", "pix_init", "soft_labels", "augment",
        "checkpoint_every", "eval_every", "eval_runs", "eval_epochs", "seed"}}

    def body(reporter):
        if list_presets:
            print_presets(json_out)
            return
        from mctool import artifact, distributed
        from mctool.device import resolve_device
        from mctool.distill import check_buffer_matches, check_synset_name, run as run_distill, synset_name
        from mctool.errors import UsageError
        from mctool.evaluate import EvaluateConfig, evaluate_set
        from mctool.plots import synset_grid, synset_png_path
        from mctool.prepared import prepare_like

        cfg = resolve_config(preset, overrides)
        cfg.validate()
        if name is not None:
            check_synset_name(name)
        if not buffer.exists():
            raise UsageError(missing_buffer_hint(buffer, cfg.dataset))
        with artifact.open_artifact(buffer) as f:
            meta = artifact.DatasetMeta.read(buffer, f)
            spec, _ = artifact.read_model(buffer, f)
            convex = artifact.read_convex(buffer, f) if cfg.method == "mct" else None
        if cfg.dataset is None:
            cfg = dataclasses.replace(cfg, dataset=meta.name)
        if zca is None and not preset:
            cfg = dataclasses.replace(cfg, zca=meta.zca)
        if interior is None and not preset and convex is not None:
            cfg = dataclasses.replace(cfg, interior=len(convex.positions) - 2)
        check_buffer_matches(cfg, meta, buffer)
        dev = resolve_device(device)
        distributed.init_from_env(dev)
        if not distributed.is_main():
            reporter.quiet, reporter.bars = True, False
        prepared = prepare_like(meta, data_dir, dev)

        def evaluate(state):
            ecfg = EvaluateConfig(runs=cfg.eval_runs, epochs=cfg.eval_epochs, seed=cfg.seed, augment=cfg.augment)
            res = evaluate_set(state.images, state.labels, state.alpha, prepared, spec, ecfg, "synset", reporter)[0]
            res["iteration"] = state.iteration
            reporter.log(f"iteration {state.iteration}: {res['model']} test accuracy {res['mean']:.4f}")
            return res

        result = run_distill(cfg, buffer, out, prepared, name=name or synset_name(cfg), resume=resume,
                             reporter=reporter, evaluate=evaluate)
        distributed.shutdown()
        if not distributed.is_main():
            return
        with artifact.open_artifact(out) as f:
            g = artifact.pick_synset(out, f, result["synset"])
            import torch

            images = torch.from_numpy(g["images"][()])
        png = synset_png_path(out, result["synset"])
        result["png"] = str(synset_grid(images, prepared.prep, cfg.ipc, png))
        result["config"] = dataclasses.asdict(cfg)
        if json_out:
            emit_json(result)
            return
        rows = [[result["synset"], result["iterations"], result["loss_first"], result["loss_last_mean"],
                 result["alpha"], result["skipped_iterations"], f"{result['seconds']:.1f}"]]
        stdout.print(table(f"{out}: distilled", ["synset", "iterations", "loss (first)", "loss (last 20)",
                                                  "learned lr", "skipped", "seconds"], rows))
        for ev in result["evaluations"]:
            stdout.print(f"evaluation ({ev.get('kind', 'synset')}) at iteration {ev.get('iteration', '?')}: "
                         f"{ev['model']} {100 * ev['mean']:.2f}%")
        stdout.print(f"images: {result['png']}")

    run(body, quiet, debug, interrupt_hint="checkpoint saved: add --resume to the same command to continue")
