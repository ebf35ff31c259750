"""The facts `mctool inspect` shows, as plain data (the --json document; keys in docs/format.md)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from mctool import artifact


def _stored_bytes(ds: h5py.Dataset) -> int:
    return int(ds.id.get_storage_size())


def _experts(f: h5py.File) -> dict[str, Any] | None:
    if "experts" not in f:
        return None
    g = f["experts"]
    done = g["done"][()] if "done" in g else np.zeros(0, dtype=bool)
    idx = np.flatnonzero(done)
    acc = g["test_accuracy"][()][idx] if "test_accuracy" in g and idx.size else np.zeros((0, 0))
    seeds = g["seeds"][()][idx].tolist() if "seeds" in g else []
    out: dict[str, Any] = {
        "rows": int(done.shape[0]),
        "done": int(idx.size),
        "epochs": int(g.attrs.get("epochs", 0)),
        "lr": float(g.attrs.get("lr", 0.0)),
        "batch_size": int(g.attrs.get("batch_size", 0)),
        "seed": int(g.attrs.get("seed", -1)),
        "seeds": [int(s) for s in seeds],
        "has_trajectories": "trajectories" in g,
        "test_accuracy_first": float(acc[:, 0].mean()) if acc.size else None,
        "test_accuracy_last": float(acc[:, -1].mean()) if acc.size else None,
        "test_accuracy_mean_curve": [float(v) for v in acc.mean(0)] if acc.size else [],
        "per_expert": [
            {"index": int(e), "seed": int(s), "test_accuracy_first": float(a[0]), "test_accuracy_last": float(a[-1])}
            for e, s, a in zip(idx, seeds, acc)
        ],
    }
    if "trajectories" in g and idx.size:
        out["trajectory_bytes_stored"] = _stored_bytes(g["trajectories"])
    return out


def _convex(f: h5py.File, path: Path, num_params: int | None, num_layers: int | None) -> dict[str, Any] | None:
    if "convex" not in f:
        return None
    g = f["convex"]
    complete = bool(g.attrs.get("complete", False))
    out: dict[str, Any] = {
        "complete": complete,
        "positions": [int(p) for p in g.attrs.get("positions", [])],
        "interior": max(0, len(g.attrs.get("positions", [])) - 2),
        "strategy": artifact.str_attr(g, "strategy"),
        "smoothing": artifact.str_attr(g, "smoothing"),
    }
    if complete and "done" in g:
        idx = np.flatnonzero(g["done"][()])
        out["experts"] = int(idx.size)
        if idx.size:
            beta = g["beta"][()][idx]
            out["beta_min"], out["beta_max"] = float(beta.min()), float(beta.max())
        out["stored_bytes"] = _stored_bytes(g["waypoints"]) + _stored_bytes(g["beta"])
    return out


def _synsets(f: h5py.File) -> list[dict[str, Any]]:
    rows = []
    for name in artifact.synset_names(f):
        g = f["synsets"][name]
        labels = g["labels"]
        rows.append({
            "name": name,
            "ipc": int(g.attrs.get("ipc", 0)),
            "images_shape": list(g["images"].shape),
            "labels": "soft" if labels.ndim == 2 else "hard",
            "lr": float(g.attrs.get("lr", float("nan"))),
            "method": artifact.str_attr(g, "method"),
            "preset": artifact.str_attr(g, "preset"),
            "iterations": int(g.attrs.get("iterations", 0)),
            "iterations_target": int(artifact.json_attr(g, "config", {}).get("iterations", 0)),
            "evaluations": artifact.json_attr(g, "evaluations", []),
            "has_checkpoint": "checkpoint" in g,
        })
    return rows


def summarize(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Everything `inspect` reports about one artifact, as JSON-ready data."""
    p = Path(path)
    with artifact.open_artifact(p) as f:
        out: dict[str, Any] = {
            "file": str(p),
            "size_bytes": p.stat().st_size,
            "format": artifact.str_attr(f, "format"),
            "format_version": int(f.attrs["format_version"]),
            "mctool_version": artifact.str_attr(f, "mctool_version"),
            "created": artifact.str_attr(f, "created"),
            "artifact_id": artifact.str_attr(f, "artifact_id"),
            "dataset": None,
            "model": None,
        }
        num_params = num_layers = None
        if "dataset" in f:
            d = artifact.DatasetMeta.read(p, f)
            out["dataset"] = {
                "name": d.name, "num_classes": d.num_classes, "channels": d.channels, "height": d.height,
                "width": d.width, "zca": d.zca, "zca_eps": d.zca_eps, "mean": list(d.mean), "std": list(d.std),
                "class_names": list(d.class_names), "train_fingerprint": d.train_fingerprint,
            }
        if "model" in f:
            spec, layout = artifact.read_model(p, f)
            num_params, num_layers = sum(artifact.layer_sizes(layout)), len(layout)
            out["model"] = {**spec.to_dict(), "num_params": num_params, "num_layers": num_layers,
                            "layers": [{"name": n, "shape": list(s)} for n, s in layout]}
        out["experts"] = _experts(f)
        out["convex"] = _convex(f, p, num_params, num_layers)
        out["synsets"] = _synsets(f)
        out["storage"] = _storage(out, num_params, num_layers)
    return out


def _storage(s: dict[str, Any], num_params: int | None, num_layers: int | None) -> dict[str, Any] | None:
    """Bytes per expert: full trajectory vs convexified (waypoints + β), and their ratio."""
    e, c = s["experts"], s["convex"]
    if not e or not num_params or not num_layers or not e["epochs"]:
        return None
    k1 = e["epochs"] + 1
    full = k1 * num_params * 4
    out: dict[str, Any] = {"full_bytes_per_expert": full, "file_bytes_per_expert": None}
    if e["done"]:
        out["file_bytes_per_expert"] = s["size_bytes"] / e["done"]
    if c and c.get("positions"):
        convex = len(c["positions"]) * num_params * 4 + k1 * num_layers * 4
        out["convex_bytes_per_expert"] = convex
        out["ratio"] = full / convex
    return out
