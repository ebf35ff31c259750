"""Storage of a full expert buffer vs its convexified form, through mctool's real writers.

Builds CIFAR-10-shaped buffers (ConvNet-3 width 128 on 3x32x32, 10 classes: P = 320,010
parameters in L = 14 tensors, K = 50 epochs) holding 1 and E experts whose trajectories are
random walks (file size does not depend on the values: no compression), written exactly as
`mctool experts` writes them (atomic_write + DatasetMeta.write + write_model + ExpertRows +
finish). Then runs the real `mctool.convexify.runner.convexify_file(buffer, ConvexifyConfig(interior=I),
out=compact)` for each I and compares file sizes with the design's arithmetic (§3):

    full per expert     (K+1)·P·4 bytes
    convex per expert   (I+2)·P·4 + (K+1)·L·4 bytes

The per-expert cost is measured as size(E experts) − size(1 expert) over E − 1, so the fixed
per-file overhead (metadata, attributes, HDF5 headers) is separated out.

    python bench/storage.py                    # E=2, I in 1,2,3,8
    python bench/storage.py --experts 4 --interior 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from mctool import store  # noqa: E402
from mctool.convexify.runner import ConvexifyConfig, convexify_file  # noqa: E402
from mctool.models import ModelSpec, build_model, layer_sizes, param_layout  # noqa: E402

AUTHORS_PICKLE_RATIO = 12.3  # the MCT authors' reported full/convex ratio (pickled tensors)


def build_buffer(path: Path, experts: int, epochs: int, spec: ModelSpec, seed: int = 0) -> tuple[int, int]:
    """Write a buffer of `experts` random-walk trajectories through the store, as `mctool experts`
    does (rows allocated at creation, written and marked done one by one); returns (P, L)."""
    layout = param_layout(build_model(spec, seed=0))
    p_total = sum(layer_sizes(layout))
    meta = store.DatasetMeta(
        name="cifar10-shaped-random", num_classes=spec.num_classes, channels=spec.channels,
        height=spec.im_size[0], width=spec.im_size[1], zca=True, zca_eps=0.1,
        mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010),
        class_names=tuple(f"class{i}" for i in range(spec.num_classes)), train_fingerprint="0" * 16,
    )
    cfg = {"dataset": "cifar10-shaped-random", "epochs": epochs, "lr": 0.01, "batch_size": 256}
    attrs = {"epochs": epochs, "lr": 0.01, "momentum": 0.0, "weight_decay": 0.0, "batch_size": 256,
             "augmentation": "color_crop_cutout_flip_scale_rotate", "seed": seed,
             **store.provenance(cfg, seed, {"dataset_fingerprint": meta.train_fingerprint})}
    rows_layout = store.RowLayout(epochs, p_total, len(layout), trajectories=True, num_waypoints=None)
    store.create_buffer(path, meta, spec, layout, experts, rows_layout, attrs, None)
    gen = torch.Generator().manual_seed(seed)
    with store.append(path) as f:
        rows = store.ExpertRows(f)
        for e in range(experts):
            theta = torch.randn(p_total, generator=gen) * 0.05
            rows.write_snapshot(e, 0, theta)
            for k in range(1, epochs + 1):
                theta = theta + torch.randn(p_total, generator=gen) * 1e-3
                rows.write_snapshot(e, k, theta)
            rows.finish(e, seed + e, [0.1] * (epochs + 1), [float("nan")] + [1.0] * epochs)
    return p_total, len(layout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_common_args(parser)
    parser.add_argument("--experts", type=int, default=2, help="E, experts in the larger buffer (>= 2)")
    parser.add_argument("--epochs", type=int, default=50, help="K (snapshots K+1)")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--interior", default="1,2,3,8", help="comma-separated interior waypoint counts I")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the buffers (default: a temp dir)")
    args = parser.parse_args(argv)
    device = _common.setup(args)  # storage is device-independent; recorded for completeness
    if args.quick and args.interior == parser.get_default("interior"):
        args.interior = "2"
    experts = max(2, args.experts)
    interiors = [int(x) for x in args.interior.split(",") if x.strip()]
    spec = ModelSpec(width=args.width)
    info = _common.machine_info(device)
    _common.note_load(info)

    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="mctool-bench-storage-") as tmp:
        tmpdir = Path(tmp)
        sizes: dict[int, int] = {}
        build_s: dict[int, float] = {}
        for n in (1, experts):
            path = tmpdir / f"buffer-E{n}.h5"
            t0 = time.perf_counter()
            p_total, n_layers = build_buffer(path, n, args.epochs, spec)
            build_s[n] = time.perf_counter() - t0
            sizes[n] = path.stat().st_size
        k1 = args.epochs + 1
        full_theory = k1 * p_total * 4
        full_per_expert = (sizes[experts] - sizes[1]) / (experts - 1)
        full_fixed = sizes[1] - full_per_expert
        result: dict[str, Any] = {
            "P": p_total, "L": n_layers, "K": args.epochs, "E": experts,
            "full": {
                "file_bytes": {str(n): s for n, s in sizes.items()},
                "bytes_per_expert_file_over_E": sizes[experts] / experts,
                "bytes_per_expert_marginal": full_per_expert,
                "bytes_per_expert_theory": full_theory,
                "overhead_marginal_vs_theory": full_per_expert / full_theory,
                "fixed_file_bytes": full_fixed,
                "build_seconds": build_s,
            },
            "convex": [],
            "authors_pickle_ratio": AUTHORS_PICKLE_RATIO,
        }
        rows = []
        for interior in interiors:
            csizes: dict[int, int] = {}
            secs: dict[int, float] = {}
            report: dict[str, Any] = {}
            for n in (1, experts):
                out = tmpdir / f"convex-E{n}-I{interior}.h5"
                t0 = time.perf_counter()
                report = convexify_file(tmpdir / f"buffer-E{n}.h5", ConvexifyConfig(interior=interior), out=out)
                secs[n] = time.perf_counter() - t0
                csizes[n] = out.stat().st_size
            theory = (interior + 2) * p_total * 4 + k1 * n_layers * 4
            marginal = (csizes[experts] - csizes[1]) / (experts - 1)
            fixed = csizes[1] - marginal
            over_e = csizes[experts] / experts
            entry = {
                "interior": interior, "positions": report.positions,
                "file_bytes": {str(n): s for n, s in csizes.items()},
                "bytes_per_expert_file_over_E": over_e,
                "bytes_per_expert_marginal": marginal,
                "bytes_per_expert_theory": theory,
                "library_reported_bytes_per_expert": report.bytes_per_expert_convex,
                "overhead_marginal_vs_theory": marginal / theory,
                "fixed_file_bytes": fixed,
                "ratio_full_over_convex_theory": full_theory / theory,
                "ratio_full_over_convex_marginal": full_per_expert / marginal,
                "ratio_files_E": sizes[experts] / csizes[experts],
                "floor_ratio": k1 / (interior + 2),
                "convexify_seconds": secs,
            }
            result["convex"].append(entry)
            rows.append([
                interior, ",".join(map(str, report.positions)), f"{over_e:,.0f}", f"{marginal:,.0f}",
                f"{theory:,}", f"{marginal / theory:.4f}", f"{fixed:,.0f}",
                f"{full_per_expert / marginal:.2f}x", f"{sizes[experts] / csizes[experts]:.2f}x",
                f"{k1 / (interior + 2):.2f}x", f"{secs[experts]:.1f}",
            ])

    f = result["full"]
    _common.print_table(
        ["E", "file bytes", "bytes/expert (file/E)", "bytes/expert (marginal)", "theory (K+1)·P·4",
         "marginal/theory", "fixed file overhead"],
        [[experts, f"{sizes[experts]:,}", f"{f['bytes_per_expert_file_over_E']:,.0f}", f"{full_per_expert:,.0f}",
          f"{full_theory:,}", f"{full_per_expert / full_theory:.4f}", f"{full_fixed:,.0f}"]],
        title=f"Full buffer: P={p_total:,}, L={n_layers}, K={args.epochs} (marginal = (size(E)-size(1))/(E-1))",
    )
    _common.print_table(
        ["I", "positions", "B/expert file/E", "B/expert marginal", "theory (I+2)P·4+(K+1)L·4",
         "marginal/theory", "fixed overhead", "full/convex (marginal)", "full/convex (files, E)", "floor (K+1)/(I+2)",
         "convexify s"],
        rows,
        title=f"Convexified (compact file from convexify_file(..., out=...)), E={experts}",
    )
    print(f"\nFloor at I=2: {k1}/4 = {k1 / 4:.2f}x; the MCT authors' pickled buffers: {AUTHORS_PICKLE_RATIO}x.")
    path = _common.write_json("storage", {"machine": info, "args": vars(args), "result": result}, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
