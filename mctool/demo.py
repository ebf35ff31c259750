"""`mctool demo`: the whole pipeline at small scale on real Fashion-MNIST, with the same
library calls the real commands make (experts -> convexify -> distill -> evaluate)."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mctool import store
from mctool.convexify.runner import ConvexifyConfig, convexify_file
from mctool.distill import resolve_config, run_prepared
from mctool.evaluate.evaluation import EvaluateConfig, Evaluation, evaluate_set, random_real
from mctool.experts import ExpertsConfig, run_prepared as run_experts
from mctool.plots import synset_picture, synset_png_path
from mctool.data.prepared import prepare, prepare_like
from mctool.core.progress import SILENT, Reporter

DEMO_PRESET = "fashion-mnist-ipc10"
# What an interrupted demo keeps: its experts (a later stage starts over on the next run, which
# reuses them), not a distillation to --resume nor "nothing".
_AGAIN = "the finished experts are kept: run the demo again (it reuses them and redoes the later stages)"


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of each stage; `fast()` is the small version."""

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
        """Smaller everything: about 1–4 minutes on 2 CPU cores (measured on two machines)."""
        return cls(experts=1, epochs=4, width=16, iterations=60, eval_runs=2, eval_epochs=150, seed=seed)


@dataclass
class DemoResult:
    """The demo's final table."""

    out: str
    config: dict[str, Any]
    preset: str
    ipc: int
    distilled: Evaluation
    random_real: Evaluation
    experts_accuracy: float
    experts_reused: int
    storage: dict[str, Any]
    distill: dict[str, Any]
    seconds: dict[str, float]
    png: str
    files: dict[str, str]


def run(demo: DemoConfig, out_dir: Path, data_dir: Path | None, device: str = "auto",
        reporter: Reporter = SILENT) -> DemoResult:
    """Run every stage into `out_dir`; returns the final table's numbers."""
    from mctool.core.device import resolve_device

    dev = resolve_device(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    buffer, small, synset = out_dir / "buffer.h5", out_dir / "convex.h5", out_dir / "synset.h5"
    times: dict[str, float] = {}

    t = time.perf_counter()
    reporter.log(f"[1/4] experts: {demo.experts} ConvNet(s) (width {demo.width}) x {demo.epochs} epochs on Fashion-MNIST")
    ecfg = ExpertsConfig(dataset="fashion-mnist", num_experts=demo.experts, epochs=demo.epochs, width=demo.width,
                         depth=3, seed=demo.seed)
    ecfg.validate()
    reporter.log("loading Fashion-MNIST and fitting ZCA (cached after the first time)")
    prepared = prepare("fashion-mnist", data_dir, ecfg.zca, ecfg.zca_eps, dev)
    reused = run_experts(ecfg, buffer, prepared, reporter).already_done
    times["experts"] = time.perf_counter() - t

    t = time.perf_counter()
    reporter.log(f"[2/4] convexify: {demo.interior} interior waypoints -> {small.name}")
    conv = convexify_file(buffer, ConvexifyConfig(interior=demo.interior), small, reporter)
    times["convexify"] = time.perf_counter() - t

    t = time.perf_counter()
    reporter.log(f"[3/4] distill: preset {DEMO_PRESET}, {demo.iterations} iterations")
    if synset.exists():
        synset.unlink()  # the demo starts over; real runs use --resume instead
    with store.open_buffer(small) as buf:
        cfg = resolve_config(DEMO_PRESET, {"iterations": demo.iterations, "seed": demo.seed}, buf)
        prepared = prepare_like(buf.data, data_dir, dev)
        dres = run_prepared(cfg, buf, synset, prepared, reporter=reporter, resume_hint=_AGAIN)
        reference = buf.reference()
    with store.open_synsets(synset) as sf:
        syn = sf.read(dres.synset)
        spec = sf.spec
    png = synset_picture(syn, prepared.meta, prepared.prep, synset_png_path(synset, dres.synset))
    times["distill"] = time.perf_counter() - t

    t = time.perf_counter()
    reporter.log(f"[4/4] evaluate: {demo.eval_runs} runs x {demo.eval_epochs} epochs, distilled vs random real")
    # One draw of random real images for all runs (the record says so: baseline_draws one).
    ev = EvaluateConfig(runs=demo.eval_runs, epochs=demo.eval_epochs, seed=demo.seed, baseline_draws="one")
    results = evaluate_set(syn.images, syn.labels, syn.lr, prepared, spec, ev, "synset", reporter, stop_hint=_AGAIN)
    for r in results:
        r.iteration = syn.iterations
    rx, ry = random_real(prepared, cfg.ipc, demo.seed)
    results += evaluate_set(rx, ry, syn.lr, prepared, spec, ev, "random-real", reporter, stop_hint=_AGAIN)
    store.add_evaluations(synset, dres.synset, [r.to_dict() for r in results])
    times["evaluate"] = time.perf_counter() - t

    return DemoResult(
        out=str(out_dir), config=dataclasses.asdict(demo), preset=DEMO_PRESET, ipc=cfg.ipc,
        distilled=results[0], random_real=results[1],
        experts_accuracy=reference.mean if reference is not None else float("nan"), experts_reused=reused,
        storage={"full_bytes_per_expert": conv.bytes_per_expert_full,
                 "convex_bytes_per_expert": conv.bytes_per_expert_convex, "ratio": conv.ratio,
                 "buffer_file_bytes": buffer.stat().st_size, "convex_file_bytes": small.stat().st_size},
        distill={"loss_first": dres.loss_first, "loss_last_mean": dres.loss_last_mean, "alpha": dres.alpha},
        seconds=times, png=str(png), files={"buffer": str(buffer), "convex": str(small), "synset": str(synset)},
    )
