"""`mctool evaluate`: how good is a synthetic set?"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from mctool.cli import DataDirOpt, DebugOpt, DeviceOpt, JsonOpt, QuietOpt, app, emit_json, run
from mctool.render import stdout, table


@app.command(
    epilog="Examples:\n\n  mctool evaluate synset.h5\n\n  mctool evaluate synset.h5 --runs 3 --epochs 300 --baseline random\n\n"
    "  mctool evaluate synset.h5 --models ConvNet,ResNet18,VGG11,AlexNet,LeNet,MLP --json",
)
def evaluate(
    file: Path = typer.Argument(Path("synset.h5"), metavar="FILE", help="File with a synthetic set (from `mctool distill`)."),
    name: Optional[str] = typer.Option(None, "--name", help="Synset to evaluate (default: the only or latest one)."),
    runs: int = typer.Option(5, "--runs", min=1, help="Fresh networks per model."),
    epochs: int = typer.Option(1000, "--epochs", min=1, help="Training epochs per network (lr x 0.1 at the midpoint)."),
    models: str = typer.Option("ConvNet", "--models", help="Comma-separated: ConvNet, ConvNetBN, ResNet18, ResNet18BN, VGG11, VGG11BN, AlexNet, LeNet, MLP, ..."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="'random': also evaluate ipc random real images per class on the same protocol."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Training lr (default: the synset's learned step size)."),
    seed: int = typer.Option(0, "--seed", help="Seed for network inits, shuffles, augmentation, baseline images."),
    save: bool = typer.Option(True, "--save/--no-save", help="Store the results with the synset."),
    data_dir: Optional[Path] = DataDirOpt,
    device: str = DeviceOpt,
    json_out: bool = JsonOpt,
    quiet: bool = QuietOpt,
    debug: bool = DebugOpt,
) -> None:
    """Train fresh networks on the synthetic set and report real test accuracy (mean ± std)."""

    def body(reporter):
        import torch

        from mctool import artifact
        from mctool.device import resolve_device
        from mctool.errors import UsageError
        from mctool.evaluate import EvaluateConfig, evaluate_set, random_real
        from mctool.nets import build_model, spec_for
        from mctool.prepared import prepare_like

        if baseline not in (None, "random"):
            raise UsageError(f"unknown --baseline '{baseline}' (use: random)")
        with artifact.open_artifact(file) as f:
            meta = artifact.DatasetMeta.read(file, f)
            spec, _ = artifact.read_model(file, f)
            g = artifact.pick_synset(file, f, name)
            synset = g.name.split("/")[-1]
            images = torch.from_numpy(g["images"][()])
            labels = torch.from_numpy(g["labels"][()])
            learned = float(g.attrs.get("lr", 0.01))
            ipc = int(g.attrs.get("ipc", 1))
            reference = artifact.json_attr(g, "experts_reference", None)
            iteration = int(g.attrs.get("iterations", 0))
        model_list = tuple(m.strip() for m in models.split(",") if m.strip())
        for m in model_list:
            build_model(spec_for(m, spec))  # unknown or impossible models fail here, before any training
        cfg = EvaluateConfig(models=model_list, runs=runs, epochs=epochs, lr=lr, seed=seed)
        use_lr = lr if lr is not None else learned
        cfg.schedule(use_lr)  # bad settings fail before the data is prepared
        dev = resolve_device(device)
        prepared = prepare_like(meta, data_dir, dev)
        results = evaluate_set(images, labels, use_lr, prepared, spec, cfg, "synset", reporter)
        if baseline == "random":
            bx, by = random_real(prepared, ipc, seed)
            results += evaluate_set(bx, by, use_lr, prepared, spec, cfg, "random-real", reporter)
        for r in results:
            r["iteration"] = iteration  # the synset's state these numbers describe
        if save:
            with artifact.atomic_write(file) as f:
                g = f["synsets"][synset]
                stored = artifact.json_attr(g, "evaluations", [])
                g.attrs["evaluations"] = json.dumps(stored + results)
        out = {"file": str(file), "synset": synset, "ipc": ipc, "lr": use_lr, "results": results,
               "experts_reference": reference}
        if json_out:
            emit_json(out)
            return
        rows = [[r["kind"], r["model"], f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f}",
                 " ".join(f"{100 * a:.2f}" for a in r["accuracies"]), r["epochs"], f"{r['seconds_per_run']:.1f}"]
                for r in results]
        if reference is not None:
            rows.append(["experts (whole dataset)", spec.arch, f"{100 * reference['mean']:.2f}", "", reference.get("epochs", ""), ""])
        stdout.print(table(f"{file}: synset '{synset}' (ipc {ipc}, lr {use_lr:.4g})",
                           ["set", "model", "test accuracy %", "per run %", "epochs", "s/run"], rows))

    run(body, quiet, debug, interrupt_hint="nothing was stored; run the command again")
