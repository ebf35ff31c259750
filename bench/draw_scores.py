"""Which split sees a bad starting draw? Validation against the training images outside the draw.

    python bench/draw_scores.py --buffer BUFFER [--draws 16] [--ipc 10] [--lr 0.01] [--data-dir DIR]

For each seed s < --draws, the starting draw a `mctool distill --ipc IPC --seed s` run makes
(its validation split and its real images per class, drawn as the run draws them) is scored
four ways by networks trained on it (300 epochs at --lr, hard labels): on the run's validation
split with 1 and 3 networks, and on the training images outside the draw and the validation
split (what `distill --init-draws` scores on) with 1 and 3 networks; and on the test split with
5 other networks, the reference. Prints one JSON line per draw and each score's correlation with
the test score; writes bench/results/draw-scores-<buffer folder>-<buffer name>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO))  # this tree's mctool, not an installed one
from _common import RESULTS_DIR, machine_info  # noqa: E402

from mctool import store  # noqa: E402
from mctool.data.prepared import auto_val_size, prepare_like, sample_per_class, split_validation  # noqa: E402
from mctool.evaluate.evaluation import EvaluateConfig, evaluate_set  # noqa: E402


def main() -> None:
    """Score every draw on each split; print and save the correlations with the test split."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--buffer", type=Path, required=True)
    p.add_argument("--draws", type=int, default=16)
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.01, help="the networks' lr (distill's lr_init)")
    p.add_argument("--data-dir", type=Path, default=None)
    a = p.parse_args()
    with store.open_buffer(a.buffer) as buf:
        meta, spec = buf.data, buf.spec
    prepared = prepare_like(meta, a.data_dir, torch.device("cpu"))
    x, y, classes = prepared.train_x, prepared.train_y, meta.num_classes
    rows = []
    for s in range(a.draws):
        keep, held = split_validation(y, classes, auto_val_size(y.numel()), s)
        picks = keep[sample_per_class(y[keep], classes, a.ipc, torch.Generator().manual_seed(s))]
        outside = torch.ones(y.numel(), dtype=torch.bool)
        outside[picks] = False
        outside[held] = False
        images, labels = x[picks], y[picks]

        def score(runs: int, on: tuple[torch.Tensor, torch.Tensor] | None, seed: int) -> float:
            cfg = EvaluateConfig(runs=runs, epochs=300, seed=seed)
            return float(evaluate_set(images, labels, a.lr, prepared, spec, cfg, score_on=on)[0].mean)

        val, rest = (x[held], y[held]), (x[outside], y[outside])
        rows.append({"seed": s, "validation": score(1, val, s), "validation_3": score(3, val, s),
                     "outside": score(1, rest, s), "outside_3": score(3, rest, s), "test": score(5, None, 1000 + s),
                     "validation_images": int(held.numel()), "outside_images": int(outside.sum())})
        print(json.dumps(rows[-1]), flush=True)
    test = np.array([r["test"] for r in rows])
    correlations = {k: float(np.corrcoef([r[k] for r in rows], test)[0, 1])
                    for k in ("validation", "validation_3", "outside", "outside_3")}
    for k, c in correlations.items():
        print(f"{k}: correlation with the test split {c:.3f}")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"draw-scores-{a.buffer.resolve().parent.name}-{a.buffer.stem}.json"
    out.write_text(json.dumps({"machine": machine_info(torch.device("cpu")), "args": {k: str(v) for k, v in vars(a).items()},
                               "rows": rows, "correlations": correlations}, indent=1))


if __name__ == "__main__":
    main()
