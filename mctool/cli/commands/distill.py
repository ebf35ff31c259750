"""`mctool distill`: learn a synthetic set by matching convexified trajectories."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

import typer

from mctool.cli.common import DataDirOpt, DebugOpt, DeviceOpt, JsonOpt, QuietOpt, emit_json, run, settings_from, with_settings
from mctool.cli.render import cell, mean_std, pct, stdout, table
from mctool.configs.distill import DistillConfig
from mctool.configs.evaluate import draw_count
from mctool.core.errors import UsageError
from mctool.core.text import count

EPILOG = ("Examples:\n\n  mctool distill --list-presets\n\n"
          "  mctool distill --preset cifar10-ipc10                 (reads buffer.h5, writes synset.h5)\n\n"
          "  mctool distill convex.h5 --preset cifar10-ipc10 -o c10.h5   (another buffer and output)\n\n"
          "  mctool distill --preset fashion-mnist-ipc10 --iterations 50 --buffer buffer.h5 -o synset.h5\n\n"
          "  mctool distill --preset cifar10-ipc10 --resume        (continue after Ctrl-C or SIGTERM)\n\n"
          "  mctool distill --preset cifar10-ipc10 --eval-every 100   (keep the best images, chosen on a validation split)\n\n"
          "  mctool distill --preset cifar10-ipc10 --method mtt    (MTT baseline on raw trajectories)\n\n"
          "  mctool distill --tune --ipc 10 --buffer buffer.h5     (your own dataset: search the settings, keep them "
          "as a preset file, distill)")

DEFAULT_BUFFER = Path("buffer.h5")


def print_presets(json_out: bool) -> None:
    """The shipped presets as a table (or JSON). A terminal too narrow for the table gets one
    line per preset, its settings wrapped as key=value words: a preset name is never cut."""
    from rich.table import Table
    from rich.text import Text

    from mctool.configs.distill import list_presets
    from mctool.core.settings import columns

    presets = list_presets()
    if json_out:
        emit_json([{"name": p.name, **p.values} for p in presets])
        return
    cols = ["name", "source", *columns(DistillConfig)]
    builtin = dataclasses.asdict(DistillConfig())
    rows = [[p.name] + [p.values.get(c, "") for c in cols[1:]] for p in presets]
    # Without a preset, the buffer's preprocessing is expected and mctool/distill/autoconfig.py's rules
    # derive the step settings from the buffer.
    from mctool.distill.autoconfig import RULED

    for key in ("zca", *RULED):
        builtin[key] = "buffer's"
    rows.append(["(no preset)", "defaults"] + [builtin[c] for c in cols[2:]])
    title = ("presets (source 'paper' = MCT supplement Table A; 'ours' = mctool's own; options override any of "
             "them)")
    wide = table(title, cols, rows)
    if stdout.measure(wide, options=stdout.options.update_width(10**4)).maximum <= stdout.width:  # unclamped
        stdout.print(wide)
        return
    narrow = Table(title=Text(title), title_justify="left", box=None, padding=(0, 2, 0, 0), show_header=True)
    narrow.add_column("name", no_wrap=True)
    narrow.add_column("source", no_wrap=True)
    narrow.add_column("settings", overflow="fold")
    for row in rows:
        narrow.add_row(Text(str(row[0])), Text(str(row[1])),
                       Text(" ".join(f"{c}={cell(v)}" for c, v in zip(cols[2:], row[2:]))))
    stdout.print(narrow, soft_wrap=False)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def print_dry_run(report: Any) -> None:
    """The --dry-run table."""
    free = "unknown" if report.free_bytes is None else _gib(report.free_bytes)
    what = "memory (--memory)" if getattr(report, "memory_given", False) else "free"
    rows = [[("* " if r.selected else "  ") + r.mode, _gib(r.whole_bytes),
             "?" if r.whole_fits is None else ("yes" if r.whole_fits else "no"),
             "whole steps" if r.micro_batch is None else f"{r.micro_batch} images", _gib(r.chunked_bytes),
             "yes" if r.fits else "NO"] for r in report.rows]
    stdout.print(table(f"{report.buffer}: one iteration on {report.device} ({report.images} images, {report.batch} per "
                       f"inner step, {report.syn_steps} steps, second order {report.second_order}; {what} {free}, "
                       f"budget {100 * report.budget_fraction:.0f} % of it)",
                       ["--grad (* = selected)", "peak, whole steps", "fits", "--micro-batch auto", "peak then",
                        "fits"], rows))
    for r in report.rows:
        if r.selected:
            stdout.print(f"{r.mode}: {r.why}")
    for note in report.notes:
        stdout.print(f"note: {note}")


def evaluation_line(ev: dict[str, Any]) -> str:
    """One stored evaluation of the synset, as the run lists them (a resumed run lists those of its
    earlier sittings and `mctool evaluate`'s too): which images, which iteration, mean ± std."""
    score = f"{ev.get('model', '?')} {mean_std(ev.get('mean'), ev.get('std'), int(ev.get('runs') or 1))} %"
    split = f"on the {ev.get('split', 'test')} split"
    if ev.get("kind") == "random-real":
        draws = draw_count(ev.get("config"), ev.get("runs"))
        return (f"evaluation of random real images (the baseline, by mctool evaluate"
                f"{', ' + count(draws, 'draw') if draws > 1 else ''}): {score} {split}")
    what = "the best images" if ev.get("target") == "best" else "the images"
    if ev.get("iteration") is None:
        return f"evaluation of {what} (iteration not recorded by the release that stored it): {score} {split}"
    return f"evaluation of {what} at iteration {ev['iteration']}: {score} {split}"


def print_tuning(result: Any) -> None:
    """The --tune table: the starting images, then every candidate's learning curve on the
    validation split, the winner marked, what was skipped, the closing notes."""
    from mctool.distill.tune_preset import _show, curve_text

    rows = []
    if result.random_real is not None:
        rr = result.random_real
        rows.append(["  starting images", f"ipc {result.ipc}: the bar to pass", 0,
                     mean_std(rr["mean"], rr["std"], rr["runs"]), "", f"{rr['lr']:.3g}", ""])
    for i, c in enumerate(result.candidates):
        last = c.curve[-1] if c.curve else None
        score = mean_std(last["mean"], last["std"], last["runs"]) if last else c.note
        curve = curve_text(c) + (f" ({c.note})" if c.note and last else "")
        rows.append([("* " if i == result.best_index else "  ") + c.stage, _show(c.values),
                     last["iteration"] if last else "", score, curve,
                     "?" if c.alpha is None else f"{c.alpha:.3g}", f"{c.seconds:.0f}"])
    horizons = ", ".join(map(str, result.horizons)) or "-"
    stdout.print(table(f"--tune on {result.buffer}: validation accuracy (%) of {result.val_images} held-out training "
                       f"images; successive halving at iterations {horizons} (* = chosen)",
                       ["stage", "settings", "iteration", "validation", "curve (iteration: %)", "learned lr",
                        "seconds"], rows))
    for s in result.skipped:
        stdout.print(f"skipped: {s}")
    for n in result.notes:
        stdout.print(f"note: {n}")
    stdout.print(f"search: {result.seconds / 60:.1f} min of a {result.budget_s / 60:g} min budget")
    stdout.print(f"tuned preset: {result.preset}  (mctool distill --preset {result.preset})")


@with_settings(DistillConfig, optional=True)
def distill(
    buffer_file: Optional[Path] = typer.Argument(None, metavar="BUFFER", show_default=False, help="Buffer with /convex (MCT) or trajectories (MTT); the same as --buffer (default buffer.h5)."),
    preset: Optional[str] = typer.Option(None, "--preset", help="Shipped preset name or a .toml path; settings neither it nor an option gives come from the buffer (rules fitted to Table A: image size, classes, the experts' K, lr and batch) or the built-in defaults (the last row of --list-presets)."),
    list_presets: bool = typer.Option(False, "--list-presets", help="Show the shipped presets and exit."),
    buffer: Path = typer.Option(DEFAULT_BUFFER, "--buffer", help="Buffer with /convex (MCT) or trajectories (MTT); or name it first: `mctool distill BUFFER`."),
    out: Path = typer.Option(Path("synset.h5"), "-o", "--out", help="Output file for the synthetic set (a PNG grid is written beside it)."),
    name: Optional[str] = typer.Option(None, "--name", help="Synset name inside the file (default: the preset's name or METHOD-ipcN)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the synset's checkpoint in -o FILE with its stored settings."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the estimated peak memory of one iteration per gradient mode on this device, for these settings and buffer, and the micro-batch auto would choose; run nothing. Without a buffer (none at buffer.h5): from the preset's dataset and its ConvNet (--width, --depth)."),
    width: Optional[int] = typer.Option(None, "--width", min=1, help="With --dry-run and no buffer: the ConvNet's width (default 128, the paper's; a buffer's experts fix it otherwise)."),
    memory: Optional[str] = typer.Option(None, "--memory", metavar="SIZE", help="With --dry-run: fit this much memory (e.g. 24GB, 80GiB) instead of this device's free memory; --device cuda then needs no GPU here."),
    tune: bool = typer.Option(False, "--tune", help="First search lr_img (by decades), then max_start_epoch, syn_steps and expert_epochs (those no option fixes) around the preset's or the buffer's settings: successive halving of distillations scored on a validation split held out of the training set (never the test split), the starting images included. Prints the table, writes the winner as a preset file (--tune-out), then distills with it."),
    tune_minutes: float = typer.Option(20.0, "--tune-minutes", help="Time budget of --tune, in minutes (kept: measured first, planned to fit, stopped when spent). The final distillation continues the winner; when it is short (at most a third of the budget, predicted) it is kept inside the budget too, else it comes after it."),
    tune_out: Optional[Path] = typer.Option(None, "--tune-out", help="Preset file --tune writes (default: tuned-DATASET-ipcN.toml beside -o); it may replace only a preset --tune wrote (never an input, a link or another file)."),
    tune_only: bool = typer.Option(False, "--tune-only", help="With --tune: stop after writing the preset file."),
    tune_runs: int = typer.Option(2, "--tune-runs", help="With --tune: networks trained to score each candidate."),
    tune_epochs: int = typer.Option(300, "--tune-epochs", help="With --tune: epochs of each of those networks."),
    data_dir: Optional[Path] = DataDirOpt,
    device: str = DeviceOpt,
    json_out: bool = JsonOpt,
    quiet: bool = QuietOpt,
    debug: bool = DebugOpt,
    **settings: Any,
) -> None:
    """Learn synthetic images by matching convexified expert trajectories (MCT)."""
    option_buffer, buffer = buffer, buffer_file or buffer  # `mctool distill BUFFER` = `--buffer BUFFER`

    def body(reporter):
        if buffer_file is not None and option_buffer not in (DEFAULT_BUFFER, buffer_file):
            raise UsageError(f"two buffers given: {buffer_file} and --buffer {option_buffer}; name one")
        if list_presets:
            print_presets(json_out)
            return
        if preset:
            from mctool.configs.distill import load_preset

            load_preset(preset)  # an unknown or broken preset: one line before torch is imported
        if dry_run:
            from mctool.distill import dry_run as estimate

            size = None
            if memory is not None:
                from mctool.matching.memory import parse_size

                try:
                    size = parse_size(memory)
                except ValueError as exc:
                    raise UsageError(f"--memory: {exc}") from None
            report = estimate(preset, settings_from(DistillConfig, settings), buffer, device,
                              default_buffer=buffer == DEFAULT_BUFFER, width=width, memory_size=size)
            if json_out:
                emit_json(report)
                return
            print_dry_run(report)
            return
        if width is not None or memory is not None:
            raise UsageError("--width and --memory are for --dry-run (a run's network comes from its buffer, its "
                             "memory from the device)")
        from mctool.distill import run as run_distill

        overrides = settings_from(DistillConfig, settings)
        if tune_only and not tune:
            raise UsageError("--tune-only needs --tune")
        if tune:
            from mctool.distill.tune import TuneConfig, run as run_tune

            if resume:
                raise UsageError("--tune starts a new run: drop --resume (or --tune to continue the checkpoint)")
            tuned = run_tune(preset, overrides, buffer, out, TuneConfig(minutes=tune_minutes, eval_runs=tune_runs,
                                                                         eval_epochs=tune_epochs), tune_out, tune_only,
                             name, data_dir, device, default_buffer=buffer == DEFAULT_BUFFER, reporter=reporter)
            if json_out:
                emit_json({"tune": tuned.tune, "distill": tuned.distill})
                return
            print_tuning(tuned.tune)
            result = tuned.distill
        else:
            result = run_distill(preset, overrides, buffer, out, name, resume, data_dir, device,
                                 default_buffer=buffer == DEFAULT_BUFFER, reporter=reporter)
        if result is None:
            return
        if json_out:
            emit_json(result)
            return
        rows = [[result.synset, result.iterations, result.loss_first, result.loss_last_mean, result.alpha,
                 result.skipped_iterations, f"{result.seconds:.1f}"]]
        stdout.print(table(f"{out}: distilled", ["synset", "iterations", "loss (first)", "loss (last 20)",
                                                  "learned lr", "skipped", "seconds"], rows))
        for ev in result.evaluations:
            stdout.print(evaluation_line(ev))
        if result.best is not None:
            b = result.best
            score = mean_std(b["score"].get("mean"), b["score"].get("std"), int(b["score"].get("runs") or 1))
            start = " — the starting images" if b["iteration"] == 0 else ""
            stdout.print(f"best images: iteration {b['iteration']}{start} ({score} % on the "
                         f"{b['selected_on']} split{' — selected on test, as the authors do' if b['selected_on'] == 'test' else ''}); "
                         f"{result.png_best}")
        for note in result.notes:
            if note.startswith(("selection on", "the starting images scored best", "the starting images are kept",
                                "lr_img was cut")):
                stdout.print(note)
        stdout.print(f"images: {result.png}")

    hint = "checkpoint saved: add --resume to the same command to continue"
    if tune:  # `--tune --resume` is refused: the final run resumes from the preset --tune wrote
        hint = (f"a final run that had begun saved its checkpoint: continue it with `mctool distill --preset "
                f"{tune_out or 'TUNED.toml'} --buffer {buffer} -o {out} --resume`"
                + ("" if tune_out else " (TUNED.toml: the preset --tune wrote beside -o)"))
    run(body, quiet, debug, interrupt_hint=hint)
