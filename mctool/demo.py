"""`mctool demo`: the whole pipeline at small scale on real Fashion-MNIST, with the same
library calls the real commands make (experts -> convexify -> distill -> evaluate)."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mctool import artifact
from mctool.convex import ConvexifyConfig, convexify_file
from mctool.distill import DistillConfig, config_from_preset, run as run_distill
from mctool.evaluate import EvaluateConfig, evaluate_set, random_real
from mctool.experts import ExpertsConfig, run as run_experts
from mctool.plots import synset_grid, synset_png_path
from mctool.prepared import prepare, prepare_like
from mctool.progress import SILENT, Reporter

DEMO_PRESET = "fashion-mnist-ipc10"


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of each stage; `fast()` is the ~3-minute version."""

    experts: int = 3
    epochs: int = 6
    width: int = 16
    interior: int = 2
    iterations: int = 200
    eval_runs: int = 3
    eval_epochs: int = 300
    seed: int = 0

    @classmethod
    def fast(cls, seed: int = 0) -> "DemoConfig":
        """Smaller everything: about 70 s on 2 CPU cores (measured)."""
        return cls(experts=1, epochs=4, width=16, iterations=60, eval_runs=2, eval_epochs=150, seed=seed)


def distill_config(demo: DemoConfig) -> DistillConfig:
    """The demo preset, with the iteration count of this demo size."""
    return config_from_preset(DEMO_PRESET, {"iterations": demo.iterations, "seed": demo.seed})


def run(demo: DemoConfig, out_dir: Path, data_dir: Path | None, device: torch.device,
        reporter: Reporter = SILENT) -> dict[str, Any]:
    """Run every stage into `out_dir`; returns the final table's numbers."""
    out_dir.mkdir(parents=True, exist_ok=True)
    buffer, small, synset = out_dir / "buffer.h5", out_dir / "convex.h5", out_dir / "synset.h5"
    times: dict[str, float] = {}
    dcfg = distill_config(demo)

    t = time.perf_counter()
    reporter.log(f"[1/4] experts: {demo.experts} ConvNet(s) (width {demo.width}) x {demo.epochs} epochs on Fashion-MNIST")
    prepared = prepare("fashion-mnist", data_dir, True, 0.1, device)
    ecfg = ExpertsConfig(dataset="fashion-mnist", num_experts=demo.experts, epochs=demo.epochs, width=demo.width,
                         depth=3, seed=demo.seed)
    reused = run_experts(ecfg, buffer, prepared, reporter)["already_done"]
    times["experts"] = time.perf_counter() - t

    t = time.perf_counter()
    reporter.log(f"[2/4] convexify: {demo.interior} interior waypoints -> {small.name}")
    conv = convexify_file(buffer, ConvexifyConfig(interior=demo.interior), small, reporter)
    times["convexify"] = time.perf_counter() - t

    t = time.perf_counter()
    reporter.log(f"[3/4] distill: preset {DEMO_PRESET}, {demo.iterations} iterations")
    if synset.exists():
        synset.unlink()  # the demo starts over; real runs use --resume instead
    prepared = prepare_like(_meta(small), data_dir, device)
    dres = run_distill(dcfg, small, synset, prepared, reporter=reporter)
    with artifact.open_artifact(synset) as f:
        g = artifact.pick_synset(synset, f, dres["synset"])
        images, labels = torch.from_numpy(g["images"][()]), torch.from_numpy(g["labels"][()])
        spec, _ = artifact.read_model(synset, f)
    png = synset_grid(images, prepared.prep, dcfg.ipc, synset_png_path(synset, dres["synset"]))
    times["distill"] = time.perf_counter() - t

    t = time.perf_counter()
    reporter.log(f"[4/4] evaluate: {demo.eval_runs} runs x {demo.eval_epochs} epochs, distilled vs random real")
    ev = EvaluateConfig(runs=demo.eval_runs, epochs=demo.eval_epochs, seed=demo.seed)
    results = evaluate_set(images, labels, dres["alpha"], prepared, spec, ev, "synset", reporter)
    rx, ry = random_real(prepared, dcfg.ipc, demo.seed)
    results += evaluate_set(rx, ry, dres["alpha"], prepared, spec, ev, "random-real", reporter)
    with artifact.atomic_write(synset) as f:
        f["synsets"][dres["synset"]].attrs["evaluations"] = json.dumps(results)
    times["evaluate"] = time.perf_counter() - t

    with artifact.open_artifact(buffer) as f:
        acc = f["experts/test_accuracy"][()]
    return {
        "out": str(out_dir), "config": dataclasses.asdict(demo), "preset": DEMO_PRESET, "ipc": dcfg.ipc,
        "distilled": results[0], "random_real": results[1],
        "experts_accuracy": float(acc[:, -1].mean()), "experts_reused": reused,
        "storage": {"full_bytes_per_expert": conv["bytes_per_expert_full"],
                    "convex_bytes_per_expert": conv["bytes_per_expert_convex"], "ratio": conv["ratio"],
                    "buffer_file_bytes": buffer.stat().st_size, "convex_file_bytes": small.stat().st_size},
        "distill": {"loss_first": dres["loss_first"], "loss_last_mean": dres["loss_last_mean"],
                    "alpha": dres["alpha"]},
        "seconds": times, "png": str(png),
        "files": {"buffer": str(buffer), "convex": str(small), "synset": str(synset)},
    }


def _meta(path: Path) -> artifact.DatasetMeta:
    with artifact.open_artifact(path) as f:
        return artifact.DatasetMeta.read(path, f)
