"""The facts `mctool inspect` shows, as plain data (the --json document; keys in docs/format.md).

Everything is read through the store's checks (a malformed file is refused with one line), and
only what a summary needs: shapes, flags, accuracies and β — never whole trajectories or images.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from mctool.models import Layout
from mctool.store import convex as _convex
from mctool.store import experts as _experts
from mctool.store import synsets as _synsets
from mctool.store.fields import Fields
from mctool.store.files import clean_text, open_artifact, reading, require_group, set_whole_file_check, shown
from mctool.store.meta import DatasetMeta, read_dataset, read_model


def _stored_bytes(ds: h5py.Dataset) -> int:
    return int(ds.id.get_storage_size())


def _experts_facts(path: Path, f: h5py.File, layout: Layout) -> dict[str, Any] | None:
    if "experts" not in f:
        return None
    info = _experts.read_experts(path, f, layout)
    idx = info.done_indices
    acc = _experts.experts_accuracy(path, f, info) if idx.size else np.zeros((0, info.epochs + 1))
    seeds = info.seeds[idx].tolist()
    final = _experts.final_accuracy(acc, info.epochs)  # the one definition
    out: dict[str, Any] = {
        "rows": info.rows,
        "done": int(idx.size),
        "epochs": info.epochs,
        "lr": info.lr,
        "batch_size": info.batch_size,
        "seed": info.seed,
        "seeds": [int(s) for s in seeds],
        "has_trajectories": info.has_trajectories,
        "test_accuracy_first": _mean_known(acc[:, 0]),
        "test_accuracy_last": final.mean if final is not None else None,
        "test_accuracy_mean_curve": [_mean_known(column) for column in acc.T],
        "per_expert": [
            {"index": int(e), "seed": int(s), "test_accuracy_first": float(a[0]), "test_accuracy_last": float(a[-1])}
            for e, s, a in zip(idx, seeds, acc)
        ],
    }
    if info.has_trajectories and idx.size:
        out["trajectory_bytes_stored"] = _stored_bytes(f["experts/trajectories"])
    return out


def _convex_facts(path: Path, f: h5py.File, layout: Layout, epochs: int | None) -> dict[str, Any] | None:
    if "convex" not in f:
        return None
    complete = Fields(path, f["convex"]).bool("complete", False)
    meta = _convex.read_convex_meta(path, f)
    out: dict[str, Any] = {
        "complete": complete,
        "positions": list(meta.positions),
        "interior": len(meta.positions) - 2,
        "strategy": meta.strategy,
        "smoothing": "authors-code" if meta.smooth else "none",
    }
    if complete:
        info = _convex.read_convex(path, f, layout, epochs)
        idx = info.done_indices
        out["experts"] = int(idx.size)
        if idx.size:
            r = Fields(path, f["convex"])
            beta = r.array("beta", "f", [info.rows, meta.epochs + 1, len(layout)], finite=True, rows=idx)
            _convex.check_beta(r, beta, meta, idx)
            out["beta_min"], out["beta_max"] = float(beta.min()), float(beta.max())
        out["stored_bytes"] = _stored_bytes(f["convex/waypoints"]) + _stored_bytes(f["convex/beta"])
    return out


def _synset_facts(path: Path, f: h5py.File, data: DatasetMeta | None) -> list[dict[str, Any]]:
    rows = []
    for name in _synsets.synset_names(f, path):
        assert data is not None  # summarize requires /dataset beside synsets
        syn = _synsets.read_synset(path, f, name, data, values=False)
        g = f["synsets"][name]
        entry = {
            "name": name,
            "ipc": syn.ipc,
            "images_shape": list(g["images"].shape),
            "labels": "soft" if g["labels"].ndim == 2 else "hard",
            "lr": syn.lr,
            "method": syn.method,
            "preset": syn.preset,
            "iterations": syn.iterations,
            "iterations_target": int(syn.config.get("iterations", 0)) if isinstance(syn.config.get("iterations"), int) else 0,
            "evaluations": syn.evaluations,
            "has_checkpoint": "checkpoint" in g,
            "grad": syn.grad,
            "image_grad_units": clean_text(str(syn.config.get("step_units", "exact"))),  # before step_units: exact
            # The levers that change what the stored images and labels are (absent: off, as in earlier files).
            "learned_labels": syn.config.get("learn_labels") is True,
            "ema": _positive(syn.config.get("ema")),
        }
        if syn.best is not None:
            entry["best"] = {"iteration": syn.best.iteration, "lr": syn.best.lr, "selected_on": syn.best.selected_on,
                             "score": syn.best.score}
        rows.append(entry)
    return rows


def _positive(value: Any) -> float:
    """A config number that is on when positive (a decay), else 0.0 (absent, off or not a number)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and float(value) > 0 and np.isfinite(value):
        return float(value)
    return 0.0


def _mean_known(values: np.ndarray) -> float | None:
    """Mean of the recorded (non-NaN) values; None when none is (imported experts record none)."""
    known = values[~np.isnan(values)]
    return float(known.mean()) if known.size else None


def summarize(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Everything `inspect` reports about one artifact, as JSON-ready data."""
    p = Path(path)
    with open_artifact(p) as f, reading(p):
        root = Fields(p, f)
        out: dict[str, Any] = {
            "file": shown(p),  # control characters removed: it is printed
            "size_bytes": p.stat().st_size,
            # Row storage is allocated up front and written as experts finish (a sparse file): the
            # blocks on disk, not the apparent size, say what the file costs.
            "disk_bytes": getattr(p.stat(), "st_blocks", 0) * 512 or p.stat().st_size,
            "format": root.str("format"),
            "format_version": root.int("format_version"),
            "mctool_version": root.str("mctool_version", default=""),
            "created": root.str("created", default=""),
            "artifact_id": root.str("artifact_id", default=""),
            "dataset": None,
            "model": None,
        }
        if any(name in f for name in ("model", "experts", "convex", "synsets")):
            require_group(p, f, "dataset")  # every product needs the data's description ...
            require_group(p, f, "model")  # ... and the network's
        data = read_dataset(p, f) if "dataset" in f else None
        layout: Layout = []
        if data is not None:
            out["dataset"] = {
                # A summary is for showing: the names' display form (stored as they are).
                "name": clean_text(data.name), "num_classes": data.num_classes, "channels": data.channels, "height": data.height,
                "width": data.width, "zca": data.zca, "zca_eps": data.zca_eps, "mean": list(data.mean),
                "std": list(data.std), "class_names": [clean_text(n) for n in data.class_names], "train_fingerprint": data.train_fingerprint,
            }
        num_params = num_layers = None
        if "model" in f:
            spec, layout = read_model(p, f, data)
            num_params, num_layers = sum(int(np.prod(s)) for _, s in layout), len(layout)
            out["model"] = {**spec.to_dict(), "num_params": num_params, "num_layers": num_layers,
                            "layers": [{"name": n, "shape": list(s)} for n, s in layout]}
        elif "experts" in f or "convex" in f:
            read_model(p, f, data)  # raises: a buffer needs /model
        out["experts"] = _experts_facts(p, f, layout)
        epochs = out["experts"]["epochs"] if out["experts"] else None
        out["convex"] = _convex_facts(p, f, layout, epochs)
        out["synsets"] = _synset_facts(p, f, data)
        out["storage"] = _storage(out, num_params, num_layers)
    return out


def _storage(s: dict[str, Any], num_params: int | None, num_layers: int | None) -> dict[str, Any] | None:
    """Bytes per expert: full trajectory vs convexified (waypoints + β), and their ratio."""
    e, c = s["experts"], s["convex"]
    if not e or not num_params or not num_layers or not e["epochs"]:
        return None
    k1 = e["epochs"] + 1
    full = k1 * num_params * 4
    # Per finished expert: the file's size, and the blocks allocated on disk (`file_bytes_per_expert`,
    # its name since 0.1.0): rows are allocated up front, so a buffer still training is a sparse
    # file (allocated < size), while filesystem blocks round a small file up (allocated > size).
    out: dict[str, Any] = {"full_bytes_per_expert": full, "file_bytes_per_expert": None,
                           "file_size_per_expert": None}
    if e["done"]:
        out["file_bytes_per_expert"] = s["disk_bytes"] / e["done"]
        out["file_size_per_expert"] = s["size_bytes"] / e["done"]
    if c and c.get("positions"):
        convex = len(c["positions"]) * num_params * 4 + k1 * num_layers * 4
        out["convex_bytes_per_expert"] = convex
        out["ratio"] = full / convex
    return out


set_whole_file_check(summarize)
