"""`--tune`'s preset file: the winner's settings with the search's table as its header, written
atomically, never through a link nor over a file --tune did not write; the table's text helpers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mctool import store
from mctool.core.errors import UsageError
from mctool.distill.config import DEFAULT_EVAL_SHARE
from mctool.evaluate.scores import score_text
from mctool.distill.tune_result import Candidate, TuneResult


def curve_text(cand: Candidate) -> str:
    """'4: 70.1, 8: 71.3, 16: 72.0' (validation %, by iteration)."""
    return ", ".join(f"{p['iteration']}: {100 * p['mean']:.1f}" for p in cand.curve)


def _show(values: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())


def preset_values(result: TuneResult) -> dict[str, Any]:
    """The winner as preset keys (the settings a preset may hold)."""
    from mctool.distill import preset_schema

    keys = preset_schema().all_keys()
    return {k: v for k, v in result.best.items() if k in keys and v is not None}


PRESET_MARK = "# Found by `mctool distill --tune`"  # the first line of every preset --tune writes


def preset_comment(result: TuneResult) -> str:
    """The header of the written preset: how it was found, on what, with which scores."""
    lines = [f"{PRESET_MARK[2:]} on {result.buffer} ({result.dataset}, ipc {result.ipc}), {store.now_iso()}.",
             "Search: successive halving — lr_img by decades, then max_start_epoch, syn_steps, expert_epochs around "
             f"the best — at iterations {', '.join(map(str, result.horizons)) or '-'}; each score from {_runs(result)} "
             f"networks on {result.val_images} validation images held out of the training split (never the test "
             "split).",
             f"Budget {result.budget_s / 60:g} min, used {result.seconds / 60:.1f} min.",
             "", "validation accuracy (%) per candidate, by iteration:"]
    if result.random_real is not None:
        rr = result.random_real
        lines.append(f"  {'starting images':16s} {'(iteration 0, the bar to pass)':60s} "
                     f"{score_text(rr['mean'], rr['std'], rr['runs'])}")
    for i, c in enumerate(result.candidates):
        score = curve_text(c) + (f" ({c.note})" if c.note else "") if c.curve else c.note
        mark = "  <- chosen" if i == result.best_index else ""
        lines.append(f"  {c.stage:16s} {_show(c.values):60s} {score}{mark}")
    for s in result.skipped:
        lines.append(f"skipped: {s}")
    for n in result.notes:
        lines.append(f"note: {n}")
    return "\n".join(lines)


def _runs(result: TuneResult) -> int:
    return max((c.runs for c in result.candidates), default=0)


def check_preset_target(path: Path, inputs: tuple[Path, ...] = ()) -> None:
    """Refuse, before any work, a preset path that would replace something that is not a preset
    --tune wrote: an input (the buffer, -o), a symlink, a folder, an HDF5 artifact, any other file."""
    from mctool.presets import is_own_preset

    shown = store.shown(path)
    for other in inputs:
        try:
            same = path.exists() and other.exists() and path.samefile(other)
        except OSError:
            same = False
        if same or path.expanduser().absolute() == other.expanduser().absolute():
            raise UsageError(f"--tune-out {shown}: is {store.shown(other)}, an input or output of this command; "
                             "name another .toml file")
    if path.is_symlink():
        raise UsageError(f"--tune-out {shown}: is a symbolic link; mctool does not write through links — remove it "
                         "or name another file")
    if path.is_dir():
        raise UsageError(f"--tune-out {shown}: is a folder; name a .toml file")
    if path.exists() and not is_own_preset(path, PRESET_MARK):
        raise UsageError(f"--tune-out {shown}: exists and is not a preset written by `mctool distill --tune`; "
                         "nothing was changed — name another file or remove it")


def write_preset(path: Path, values: dict[str, Any], comment: str, schema: Any, replaces: str | None = None) -> Path:
    """Write a preset file (mctool.presets.preset_text) with store.write_atomically: a kill at any
    point leaves the old file or the new one, never through a link. With `replaces`, an existing
    `path` is replaced only when it is a plain file whose first line is `replaces` (a preset the
    same writer wrote), checked before the write and again just before the rename."""
    from mctool.presets import preset_text

    text = preset_text(values, comment, schema).encode("utf-8")
    _check_replaceable(path, replaces)

    def write(fh: Any) -> None:
        fh.write(text)
        _check_replaceable(path, replaces)  # a link or another file put there meanwhile

    return store.write_atomically(path, write)


def _check_replaceable(path: Path, mark: str | None) -> None:
    from mctool.presets import is_own_preset

    shown = store.shown(path)
    if path.is_symlink():
        raise UsageError(f"{shown}: is a symbolic link; mctool does not write through links — remove it or name "
                         "another file")
    if path.is_dir():
        raise UsageError(f"{shown}: is a folder; name a .toml file")
    if mark is not None and path.exists() and not is_own_preset(path, mark):
        raise UsageError(f"{shown}: exists and is not a preset mctool wrote; nothing was changed — name another "
                         "file or remove it")


def write_result_preset(result: TuneResult, path: Path) -> Path:
    """Write the winner as a preset file `--preset PATH` reads back (atomically, never through a
    link, never over a file --tune did not write); a folder: dataset inside the preset's folder
    is written relative to it (the two can move together)."""
    from mctool.distill import preset_schema

    values = preset_values(result)
    if not values.get("eval_share"):
        # The run it is for keeps its best images on validation, the starting ones included.
        values["eval_share"] = DEFAULT_EVAL_SHARE
    values["source"] = "tuned"
    values["description"] = f"mctool distill --tune on {result.buffer}"
    ds = values.get("dataset", "")
    if isinstance(ds, str) and ds.lower().startswith("folder:"):
        target = Path(ds[len("folder:"):])
        here = path.expanduser().resolve().parent
        try:
            rel = target.relative_to(here)
            values["dataset"] = f"folder:{rel.as_posix() or '.'}"
        except ValueError:
            values["dataset"] = f"folder:{target}"
    order = ["source", "description", "dataset", "ipc"]
    ordered = {k: values[k] for k in order if k in values}
    ordered.update({k: v for k, v in values.items() if k not in ordered})
    return write_preset(path, ordered, preset_comment(result), preset_schema(), replaces=PRESET_MARK)


def default_preset_path(out: Path, dataset: str, ipc: int) -> Path:
    """tuned-DATASET-ipcN.toml beside the synset file (a folder dataset: its folder's name)."""
    name = Path(dataset[len("folder:"):]).name if dataset.lower().startswith("folder:") else dataset
    slug = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in name) or "dataset"
    return out.parent / f"tuned-{slug}-ipc{ipc}.toml"
