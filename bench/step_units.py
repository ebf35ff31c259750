"""Image updates of one distillation iteration per `--grad` mode, on a real buffer, same seed.

Checks the claim of docs/method.md ("Step units"): under `--method mct` with the default
`--step-units released`, switching `--grad` changes the direction and exactness of the image
gradient, not the size of the step. For each mode it runs the first iteration of the same
distillation (same expert, start, batches and augmentation draws: same seed) and prints the
norm of the image update lr_img · scale · ∇, the cosine between modes' updates, and the same
for `--step-units exact` (twice the released step).

    OMP_NUM_THREADS=1 python bench/step_units.py BUFFER [--ipc 10] [--syn-steps 20] [--seed 0]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mctool import store  # noqa: E402
from mctool.distill import Distiller, ExpertSource, initial_state, resolve_config  # noqa: E402
from mctool.data.prepared import prepare_like  # noqa: E402


def first_update(buf: store.Buffer, prepared, cfg) -> torch.Tensor:
    """The image update of iteration 0 (before momentum has anything to add)."""
    state = initial_state(cfg, prepared, torch.Generator().manual_seed(cfg.seed))
    state.queues = [[]]
    d = Distiller(cfg, buf.spec, ExpertSource(buf, cfg.method, prepared.train_x.device), prepared, state,
                  torch.Generator().manual_seed(cfg.seed + 1))
    before = state.images.clone()
    result = d.step()
    assert result is not None and d.apply_update(result.grads)
    return d.state.images - before


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("buffer", type=Path)
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--syn-steps", type=int, default=20)
    ap.add_argument("--lr-img", type=float, default=100.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    with store.open_buffer(args.buffer) as buf:
        k = buf.convex.meta.epochs
        base = resolve_config(None, {"ipc": args.ipc, "syn_steps": args.syn_steps, "lr_img": args.lr_img,
                                     "expert_epochs": max(1.0, k / 4), "max_start_epoch": max(0.0, k / 2 - 1),
                                     "seed": args.seed}, buf)
        prepared = prepare_like(buf.data, None, torch.device("cpu"))
        rows, updates = [], {}
        for units in ("released", "exact"):
            for mode in ("constant", "adjoint", "unrolled"):
                cfg = dataclasses.replace(base, grad=mode, step_units=units)
                t = time.perf_counter()
                u = first_update(buf, prepared, cfg)
                updates[(units, mode)] = u
                rows.append({"units": units, "grad": mode, "update_norm": float(u.norm()),
                             "update_rms": float(u.pow(2).mean().sqrt()), "seconds": time.perf_counter() - t})
    ref = updates[("released", "constant")].flatten()
    for r in rows:
        u = updates[(r["units"], r["grad"])].flatten()
        r["cosine_vs_released_constant"] = float(torch.dot(u, ref) / (u.norm() * ref.norm()))
        r["norm_ratio_vs_released_constant"] = float(u.norm() / ref.norm())
    print(f"buffer {args.buffer}: {buf.data.name}, K = {k}, ipc {args.ipc}, syn_steps {args.syn_steps}, "
          f"lr_img {args.lr_img:g}, seed {args.seed}")
    print(f"{'units':9} {'grad':9} {'|update|':>10} {'ratio':>7} {'cosine':>7}")
    for r in rows:
        print(f"{r['units']:9} {r['grad']:9} {r['update_norm']:10.4g} {r['norm_ratio_vs_released_constant']:7.3f} "
              f"{r['cosine_vs_released_constant']:7.4f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
