"""`mctool inspect`: what an artifact holds, at a glance."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape
from rich.tree import Tree

from mctool.cli.common import DataDirOpt, DebugOpt, DeviceOpt, JsonOpt, QuietOpt, emit_json, run
from mctool.cli.render import stdout
from mctool.configs.evaluate import draw_count
from mctool.core.text import count

EPILOG = ("Examples:\n\n  mctool inspect buffer.h5\n\n  mctool inspect synset.h5 --json | python -m json.tool\n\n"
          "  mctool inspect buffer.h5 --png overview.png")


def _size(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def _pct(v: float | None) -> str:
    return "?" if v is None else f"{100 * v:.1f}%"


def _spread(ev: dict[str, Any]) -> str:
    runs = len(ev.get("accuracies", []))
    if runs <= 1:
        return f"{_pct(ev.get('mean'))} (n = 1)"
    return f"{_pct(ev.get('mean'))} ± {_pct(ev.get('std'))} over {runs} runs"


def overview(s: dict[str, Any]) -> Tree:
    """The Rich tree `inspect` prints (every string from the file escaped: no markup, no control codes)."""
    root = Tree(f"[bold]{escape(s['file'])}[/]  ({_size(s['size_bytes'])}, mctool format v{s['format_version']}, "
                f"written by mctool {escape(s['mctool_version'])} on {escape(s['created'])})")
    d = s["dataset"]
    if d:
        root.add(f"[bold]dataset[/] {escape(d['name'])}: {d['num_classes']} classes, {d['channels']}x{d['height']}x{d['width']}, "
                 + (f"ZCA (eps {d['zca_eps']})" if d["zca"] else "mean/std normalisation"))
    m = s["model"]
    if m:
        root.add(f"[bold]model[/] {escape(m['arch'])} depth {m['depth']} width {m['width']} {m['norm']} {m['pool']}: "
                 f"{m['num_layers']} layers, P = {m['num_params']:,} parameters")
    e = s["experts"]
    if e:
        node = root.add(f"[bold]experts[/] {e['done']}/{e['rows']} done, K = {count(e['epochs'], 'epoch')}, lr {e['lr']:g}, "
                        f"seed {e['seed']}" + ("" if e["has_trajectories"] else ", no full trajectories stored"))
        if e["done"]:
            node.add(f"test accuracy θ_0 -> θ_K (mean): {_pct(e['test_accuracy_first'])} -> {_pct(e['test_accuracy_last'])}")
            for x in e["per_expert"][:8]:
                node.add(f"expert {x['index']} (seed {x['seed']}): {_pct(x['test_accuracy_first'])} -> "
                         f"{_pct(x['test_accuracy_last'])}")
            if len(e["per_expert"]) > 8:
                node.add(f"... {len(e['per_expert']) - 8} more")
    c = s["convex"]
    if c:
        if not c["complete"]:
            root.add("[bold]convex[/] incomplete (interrupted) — run `mctool convexify` again")
        else:
            text = (f"[bold]convex[/] {c.get('experts', 0)} experts, waypoints at {c['positions']} "
                    f"(I = {c['interior']}), beta '{c['strategy']}', smoothing {c['smoothing']}")
            if "beta_min" in c:
                text += f", beta range [{c['beta_min']:.3g}, {c['beta_max']:.3g}]"
            root.add(text)
    st = s["storage"]
    if st:
        text = f"[bold]storage[/] full trajectory {_size(st['full_bytes_per_expert'])}/expert"
        if "convex_bytes_per_expert" in st:
            text += f", convexified {_size(st['convex_bytes_per_expert'])}/expert, ratio {st['ratio']:.2f}x"
        if st.get("file_size_per_expert"):
            size, allocated = st["file_size_per_expert"], st.get("file_bytes_per_expert")
            text += f"; this file: size {_size(size)}/expert"
            if allocated and _size(allocated) != _size(size):
                text += f", {_size(allocated)}/expert allocated on disk"
        root.add(text)
    for y in s["synsets"]:
        if y["method"] == "imported":  # made elsewhere (mctool import): no run settings of ours to show
            how = f"imported by `mctool import`, iteration {y['iterations']} of its run"
        else:
            how = (f"{escape(y['method'])} ({escape(y['grad'])}, {escape(y['image_grad_units'])} step units), preset "
                   f"{escape(y['preset']) or '-'}, {y['iterations']}/{y['iterations_target']} iterations"
                   + (" (checkpoint: resumable)" if y["has_checkpoint"] and y['iterations'] < y['iterations_target']
                      else ""))
        labels = f"{y['labels']} labels" + (" (learned, --learn-labels)" if y.get("learned_labels") else "")
        if y.get("ema"):
            how += f", --ema {y['ema']:g} (what is stored is the moving average)"
        node = root.add(f"[bold]synset[/] '{escape(y['name'])}': ipc {y['ipc']}, images {y['images_shape']}, {labels}, "
                        f"learned lr {y['lr']:.4g}, {how}")
        best = y.get("best")
        if best:
            how = "selected on the TEST split (the authors' protocol)" if best["selected_on"] == "test" else \
                "selected on a validation split"
            node.add(f"best images: iteration {best['iteration']}, {_pct(best['score'].get('mean'))} on "
                     f"{best['selected_on']}, {how}")
        for ev in y["evaluations"]:
            node.add(f"evaluation {escape(str(ev.get('model', '?')))}: {_spread(ev)}, {ev.get('epochs', '?')} epochs"
                     + _evaluated_what(ev))
    return root


def _evaluated_what(ev: dict) -> str:
    """Which images an evaluation trained on, and where it was scored."""
    # Evaluations stored since `evaluate --labels` say which labels they trained on: hard and soft apart.
    labels = f", {ev['labels']} labels" if ev.get("labels") in ("hard", "soft") else ""
    if ev.get("kind") == "random-real":
        draws = draw_count(ev.get("config"), ev.get("runs"))
        return f", random real images (baseline{', ' + count(draws, 'draw') if draws > 1 else ''}){labels}"
    what = f", {ev.get('target', 'final')} images" if ev.get("target") == "best" else ""
    what += f" of iteration {ev['iteration']}" if "iteration" in ev else ""
    if ev.get("split", "test") != "test":
        what += f", on the {escape(str(ev['split']))} split"
    return what + labels


def inspect(
    file: Path = typer.Argument(..., metavar="FILE", help="Any mctool artifact."),
    png: Optional[Path] = typer.Option(None, "--png", help="Also write pictures: image grid(s), beta curves, accuracy along the trajectory."),
    evaluate: bool = typer.Option(True, "--evaluate/--no-evaluate", help="With --png: evaluate the first expert's convexified path on the test split for the accuracy plot (seconds to minutes; the stored curves need none)."),
    data_dir: Optional[Path] = DataDirOpt,
    device: str = DeviceOpt,
    json_out: bool = JsonOpt,
    quiet: bool = QuietOpt,
    debug: bool = DebugOpt,
) -> None:
    """Show what an artifact holds: dataset, model, experts, convex waypoints, synsets, storage."""

    def body(reporter):
        from mctool.store import summarize

        s = summarize(file)
        if png is not None:
            from mctool.core.device import resolve_device
            from mctool.plots import write_overview

            s["png"] = [str(p) for p in write_overview(file, png, data_dir, resolve_device(device),
                                                       evaluate=evaluate, reporter=reporter)]
        if json_out:
            emit_json(s)
        else:
            stdout.print(overview(s), soft_wrap=False)  # wrap long lines at words (never cut them)
            for p in s.get("png", []):
                stdout.print(f"wrote {escape(p)}")

    run(body, quiet, debug)
