"""Evaluate a synthetic set: train fresh networks on it, test on the real test split (method.md §8)."""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mctool.artifact import now_iso
from mctool.augment import DEFAULT_STRATEGY, DSA
from mctool.ensemble import train_many
from mctool.nets import ModelSpec, build_model, spec_for
from mctool.prepared import Prepared, sample_per_class
from mctool.progress import SILENT, Reporter
from mctool.train import Schedule, accuracy


@dataclass(frozen=True)
class EvaluateConfig:
    """The evaluation protocol: SGD(lr, momentum 0.9, wd 5e-4), lr × 0.1 at the midpoint, DSA."""

    models: tuple[str, ...] = ("ConvNet",)
    runs: int = 5
    epochs: int = 1000
    lr: float | None = None  # None: the synset's learned step size
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    augment: str = DEFAULT_STRATEGY
    seed: int = 0

    def schedule(self, lr: float) -> Schedule:
        """One run's SGD schedule (building it checks the values: one usage line if bad)."""
        return Schedule(epochs=self.epochs, lr=lr, momentum=self.momentum, weight_decay=self.weight_decay,
                        batch_size=self.batch_size, decay_epoch=self.epochs // 2)


def run_seed(seed: int, model_index: int, run: int) -> int:
    """Seed of one evaluation run (network init, shuffles, augmentation)."""
    return int(np.random.SeedSequence([seed, 0xE7A1, model_index, run]).generate_state(1, np.uint32)[0])


def evaluate_set(images: torch.Tensor, labels: torch.Tensor, lr: float, prepared: Prepared, base: ModelSpec,
                 cfg: EvaluateConfig, kind: str = "synset", reporter: Reporter = SILENT,
                 together: bool | None = None) -> list[dict[str, Any]]:
    """Train cfg.runs fresh networks of every model on (images, labels); one result dict per model.

    The runs of a model train together where `mctool.ensemble.train_many` decides so
    (`together`: None = on GPUs), with the same results as one after another.
    """
    device = prepared.train_x.device
    images, labels = images.to(device), labels.to(device)
    dsa = DSA(cfg.augment, flip=prepared.meta.flip) if cfg.augment != "none" else None
    schedule = cfg.schedule(lr)
    results = []
    for mi, name in enumerate(cfg.models):
        spec = spec_for(name, base)
        started = time.perf_counter()
        seeds = [run_seed(cfg.seed, mi, r) for r in range(cfg.runs)]
        models = [build_model(spec, seed=seed).to(device) for seed in seeds]
        gens = [torch.Generator().manual_seed(seed) for seed in seeds]
        keys = [f"eval-{name}-{r}" for r in range(cfg.runs)]
        for r, key in enumerate(keys):
            reporter.task(key, f"evaluate {kind} {name} run {r + 1}/{cfg.runs}", total=cfg.epochs)
        train_many(models, images, labels, schedule, dsa, gens, together=together,
                   on_epoch=lambda r, e, loss: reporter.update(keys[r], advance=1, loss=loss))
        accs = []
        for r, model in enumerate(models):
            reporter.done(keys[r])
            accs.append(accuracy(model, prepared.test_x, prepared.test_y))
            reporter.log(f"{kind} {name} run {r + 1}/{cfg.runs}: test accuracy {accs[-1]:.4f}")
        del models  # before the next model's networks are built
        results.append({
            "kind": kind, "model": name, "accuracies": accs, "mean": statistics.fmean(accs),
            "std": statistics.pstdev(accs), "runs": cfg.runs, "epochs": cfg.epochs, "lr": lr, "seeds": seeds,
            "seed": cfg.seed, "images": int(images.shape[0]), "date": now_iso(),
            "seconds_per_run": (time.perf_counter() - started) / max(1, cfg.runs),
            "config": dataclasses.asdict(cfg),
        })
    return results


def random_real(prepared: Prepared, ipc: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`ipc` random real training images per class (the baseline every paper compares against)."""
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, 0xBA5E]).generate_state(1)[0]))
    sel = sample_per_class(prepared.train_y, prepared.meta.num_classes, ipc, gen).to(prepared.train_x.device)
    return prepared.train_x[sel], prepared.train_y[sel]
