"""`mctool evaluate`: how good is a synthetic set?"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from mctool.cli.common import DataDirOpt, DebugOpt, DeviceOpt, JsonOpt, QuietOpt, emit_json, run, settings_from, with_settings
from mctool.cli.render import mean_std, pct, stdout, table
from mctool.configs.evaluate import EvaluateConfig, draw_count
from mctool.core.text import count

EPILOG = ("Examples:\n\n  mctool evaluate synset.h5\n\n  mctool evaluate synset.h5 --runs 3 --epochs 300 --baseline random\n\n"
          "  mctool evaluate synset.h5 --models ConvNet,ResNet18,VGG11,AlexNet,LeNet,MLP --json\n\n"
          "  mctool evaluate learned.h5 --labels hard --baseline random")


def _signed(v: float | None, std: float | None = None, runs: int = 2) -> str:
    if v is None:
        return ""
    if runs <= 1:
        return f"{100 * v:+.2f} (n = 1)"  # one run has no spread
    return f"{100 * v:+.2f}" + ("" if std is None else f" ± {100 * std:.2f}")


def _reference(ref: dict) -> str:
    """The experts' accuracy: mean ± std over the experts (or n = 1)."""
    return mean_std(ref.get("mean"), ref.get("std"), int(ref.get("experts") or 1))


def _whole(value: float | None, source: str | None, ref: dict | None) -> str:
    """The whole-data accuracy: the experts' mean ± std, or the value --whole-data gave."""
    if value is None:
        return ""
    if source != "--whole-data" and ref is not None:  # the experts' final test accuracy
        return _reference(ref)
    return f"{pct(value)} (given)"


@with_settings(EvaluateConfig, optional=False)
def evaluate(
    file: Path = typer.Argument(Path("synset.h5"), metavar="FILE", help="File with a synthetic set (from `mctool distill`)."),
    name: Optional[str] = typer.Option(None, "--name", help="Synset to evaluate (default: the only or latest one)."),
    images: str = typer.Option("auto", "--images", help="final, best (kept by distill --eval-every, or by --eval-share: the default without a preset), both, or auto: both when the synset keeps best images."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="'random': also evaluate ipc random real images per class on the same protocol (gives the gain)."),
    buffer: Optional[Path] = typer.Option(None, "--buffer", help="The buffer the synset was distilled from: its first expert labels the random-real baseline for --baseline-labels expert (auto: when the synset trains on soft labels, i.e. not with --labels hard)."),
    whole_data: Optional[float] = typer.Option(None, "--whole-data", help="Test accuracy of the architecture trained on the whole training set (fraction or %), for HLR (default: the experts' final accuracy stored with the synset)."),
    save: bool = typer.Option(True, "--save/--no-save", help="Store the results with the synset."),
    data_dir: Optional[Path] = DataDirOpt,
    device: str = DeviceOpt,
    json_out: bool = JsonOpt,
    quiet: bool = QuietOpt,
    debug: bool = DebugOpt,
    **settings: Any,
) -> None:
    """Train fresh networks on the synthetic set: real test accuracy (mean ± std), gain over random real, HLR."""

    def body(reporter):
        from mctool.evaluate.evaluation import evaluate_file

        cfg = EvaluateConfig(**settings_from(EvaluateConfig, settings))
        result = evaluate_file(file, cfg, name, baseline, images, save, whole_data, data_dir, device, reporter,
                               buffer=buffer)
        if json_out:
            emit_json(result)
            return
        rows = []
        for r in result.results:
            what = f"synset ({r.target}, iteration {r.iteration})" if r.kind == "synset" else \
                f"{r.kind} ({count(draw_count(r.config, r.runs), 'draw')})"
            rows.append([what, r.labels, r.model, mean_std(r.mean, r.std, r.runs), " ".join(pct(a) for a in r.accuracies),
                         r.epochs, f"{r.seconds_per_run:.1f}"])
        ref = result.experts_reference
        if ref is not None:
            rows.append(["experts (whole dataset)", "hard", "ConvNet", _reference(ref), "", ref.get("epochs", ""), ""])
        stdout.print(table(f"{file}: synset '{result.synset}' (ipc {result.ipc}, lr {result.lr:.4g})",
                           ["set", "labels", "model", "test accuracy %", "per run %", "epochs", "s/run"], rows))
        scores = [[s.target + (f" (selected on {result.selected_on})" if s.target == "best" else ""),
                   s.labels + (f" (baseline {s.baseline_labels})" if s.baseline_labels not in (None, s.labels) else ""),
                   s.model,
                   mean_std(s.mean, s.std, s.runs),
                   mean_std(s.random_real, s.random_real_std, s.random_real_runs) if s.random_real is not None else "",
                   _signed(s.gain, s.gain_std, s.runs), _whole(s.whole_data, result.whole_data_source, ref),
                   _signed(s.hlr, s.hlr_std, s.runs) if s.hlr is not None else s.note] for s in result.scores]
        if any(s.gain is not None or s.hlr is not None for s in result.scores):
            stdout.print(table("scores (gain = synthetic − random real, same protocol; HLR = whole data − "
                               f"synthetic{', whole data from ' + result.whole_data_source if result.whole_data_source else ''})",
                               ["images", "labels", "model", "accuracy %", "random real %", "gain", "whole data %", "HLR"],
                               scores))

    run(body, quiet, debug, interrupt_hint="nothing was stored; run the command again")
