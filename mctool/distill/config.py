"""A distillation's settings: DistillConfig, presets, what a buffer implies, and the rules of resume.

Presets fill a DistillConfig, options override, the artifact stores it (`config`). Without a
preset, the buffer's dataset, preprocessing and waypoint count and mctool/distill/autoconfig.py's
rules give the defaults. A resumed run keeps the stored settings except the resume-safe ones.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from mctool import presets, store
from mctool.core.errors import UsageError
from mctool.configs.distill import (AUTO_SELECT_MIN_ITERATIONS, DEFAULT_EVAL_SHARE, DEFAULT_INIT_DRAWS,  # noqa: F401
                                     DEFAULT_LR_BACKOFF, DRAWS_IPC, MAX_BACKOFFS, DistillConfig, list_presets, load_preset,
                                     preset_schema)  # (re-exported)
from mctool.core.settings import legacy_values, resume_safe


def check_synset_name(name: str) -> None:
    """A synset name becomes an HDF5 group name under /synsets: no paths, no empty names."""
    if not name or "/" in name or name in (".", "..") or store.clean_text(name) != name:
        raise UsageError(f"--name {store.clean_text(repr(name))}: a synset name may not be empty, '.' or '..', "
                         "or contain '/' or control characters")


def synset_name(cfg: DistillConfig) -> str:
    """Default synset name: the preset's name, else method-ipcN."""
    return cfg.preset or f"{cfg.method}-ipc{cfg.ipc}"


def _fields() -> set[str]:
    return {f.name for f in dataclasses.fields(DistillConfig)}


def resolve_config(preset: str | None, overrides: dict[str, Any], buffer: store.Buffer | None = None,
                   stored: dict[str, Any] | None = None) -> DistillConfig:
    """The run's settings.

    A new run: built-in defaults <- what the buffer implies (dataset, preprocessing, waypoint
    count, when no preset says otherwise) <- the preset's values (none: eval_share
    DEFAULT_EVAL_SHARE, the best images kept; lr_backoff DEFAULT_LR_BACKOFF) <- `overrides` that are not None;
    without a preset a selecting run at ipc in DRAWS_IPC chooses among DEFAULT_INIT_DRAWS starting draws.
    A resumed run (`stored`: the synset's config): the stored settings (with the values older
    releases implied for keys they did not store) <- `overrides`, which may differ only in the
    settings a resume may change."""
    values: dict[str, Any] = {}
    p = load_preset(preset) if preset else None
    if stored is not None:
        values.update({k: v for k, v in stored.items() if k in _fields()})
        for key, legacy in legacy_values(DistillConfig).items():
            values.setdefault(key, legacy)
    else:
        if buffer is not None:
            values.update(buffer_defaults(buffer, preset_given=p is not None, ipc=overrides.get("ipc")))
        if p is not None:
            values.update({k: v for k, v in p.values.items() if k in _fields()})
            values["preset"] = p.name
        else:
            # Never worse than the start, by default: a run whose settings nobody tuned keeps its
            # best images on the validation split, the starting ones included.
            values["eval_share"] = DEFAULT_EVAL_SHARE
            # ... and cuts an image learning rate that makes them worse than they started (runner.py).
            values["lr_backoff"] = DEFAULT_LR_BACKOFF
    given = {k: v for k, v in overrides.items() if v is not None and k in _fields()}
    if stored is not None:
        _check_resume_changes(values, given, p)
    values.update(given)
    if p is None and stored is None and "lr_backoff" not in given and not (values.get("eval_every")
                                                                           or values.get("eval_share")):
        values["lr_backoff"] = 0.0  # the default cut follows the default selection: off with it
    cfg = DistillConfig(**values)
    if (p is None and stored is None and "init_draws" not in given and cfg.pix_init != "noise"
            and DRAWS_IPC[0] <= cfg.ipc <= DRAWS_IPC[1]
            and (cfg.eval_every > 0 or (cfg.eval_share > 0 and cfg.iterations >= AUTO_SELECT_MIN_ITERATIONS))):
        # A run nobody tuned chooses its starting draw too (its selection's networks score the draws).
        cfg = dataclasses.replace(cfg, init_draws=DEFAULT_INIT_DRAWS)
    found = cfg.problem()
    if p is not None and stored is None and found is not None and found[0] not in given and found[0] in p.values:
        raise UsageError(f"{p.path}: {found[0]} {found[1]}")  # the preset's value, not an option's
    cfg.validate()
    return cfg


def _check_resume_changes(stored: dict[str, Any], given: dict[str, Any], preset: Any) -> None:
    safe = resume_safe(DistillConfig)
    asked = dict(given)
    if preset is not None:
        asked = {**{k: v for k, v in preset.values.items() if k in _fields()}, **asked}
    diff = [k for k, v in asked.items() if k not in safe and json.loads(json.dumps(v)) != stored.get(k)]
    if diff:
        raise UsageError("cannot resume with different settings: "
                         + ", ".join(f"{k}={stored.get(k)!r} (now {asked[k]!r})" for k in diff[:4])
                         + " — drop them (a resume keeps the run's settings) or start another --name")


def buffer_defaults(buffer: store.Buffer, preset_given: bool, ipc: int | None = None) -> dict[str, Any]:
    """Settings implied by the buffer: its dataset, and — when no preset says otherwise — its
    preprocessing, waypoint count and the settings mctool/distill/autoconfig.py's rules derive from the
    dataset and the experts for `ipc` (default: the built-in ipc)."""
    from mctool.distill import autoconfig

    values: dict[str, Any] = {"dataset": buffer.data.name}
    if not preset_given:
        values["zca"] = buffer.data.zca
        if buffer.convex_state == "complete":
            values["interior"] = len(buffer.convex.meta.positions) - 2
        values.update(autoconfig.suggest(autoconfig.facts(buffer), ipc or DistillConfig.ipc).values)
    return values


def buffer_note(buffer: store.Buffer, cfg: DistillConfig, given: set[str]) -> str:
    """The note a run without a preset logs: which settings the buffer's rules chose, and why."""
    from mctool.distill import autoconfig

    choice = autoconfig.suggest(autoconfig.facts(buffer), cfg.ipc)
    return autoconfig.describe(choice, dataclasses.asdict(cfg), given)


def check_buffer_matches(cfg: DistillConfig, buffer: store.Buffer) -> None:
    """A preset for another dataset, or another preprocessing, cannot use this buffer."""
    meta = buffer.data
    if cfg.dataset and cfg.dataset != meta.name:
        raise UsageError(f"{store.shown(buffer.path)}: holds experts for '{meta.name}' but the preset is for "
                         f"'{cfg.dataset}'; drop --preset to use settings derived from the buffer, pass --preset "
                         "with a preset file whose dataset is this one, or tune your own with `mctool distill --tune`")
    if cfg.zca != meta.zca:
        raise UsageError(f"{store.shown(buffer.path)}: experts were trained {'with' if meta.zca else 'without'} ZCA "
                         f"but the settings ask {'for' if cfg.zca else 'against'} it (--zca/--no-zca)")


def missing_buffer_hint(buffer: Path, dataset: str | None, default_buffer: bool) -> str:
    """What to run first when there is no buffer, sized for this machine (CPU: a small buffer).
    A buffer the user named is more likely a mistyped path than a buffer to make: no recipe then."""
    if not default_buffer:
        return f"{store.shown(buffer)}: no such file (check the buffer's path)"
    ds = dataset or "DATASET"
    other = " (or name another buffer: `mctool distill BUFFER`)"
    size = "--n 100" if torch.cuda.is_available() else "--n 2 --epochs 10 --width 32"
    where = "" if torch.cuda.is_available() else " (sized for a CPU; the paper's buffers are --n 100 on GPUs)"
    return (f"{store.shown(buffer)}: no such file — make experts first: `mctool experts {ds} {size} -o "
            f"{store.shown(buffer)}`{where} then `mctool convexify {store.shown(buffer)}`{other}")
