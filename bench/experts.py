"""Expert-training throughput (images/s) of `mctool.training.train.train`, the loop `mctool experts` uses.

Protocol as `mctool experts`: default DSA (color_crop_cutout_flip_scale_rotate, one op per
batch), plain SGD lr 0.01, batch 256, ConvNet-3 with instance norm. Configurations:

* cifar-shaped: random 3x32x32 images, 10 classes (default 2,560 images, 1 epoch)
* fashion-mnist: the real data set (mctool.data.prepared.prepare, ZCA eps 0.1), the first 5,120
  training images, 1 epoch (no flip: the data set's meta says flip=False)

for widths 32 and 128. Before each timed epoch one warm-up batch is trained (thread pools,
allocator), so the reported images/s excludes it. Test accuracy is not part of the timing
(`mctool experts` also evaluates after every epoch; time that with bench/evaluate.py).

    python bench/experts.py
    python bench/experts.py --quick
    python bench/experts.py --widths 128 --cifar-images 5120 --epochs 2

--parallel E compares instead E experts trained together (`mctool.training.ensemble.train_many`,
stacked parameters and grouped convolutions; what `mctool experts --parallel E` would do)
with the same E experts one after another, measured interleaved in one process, same seeds.

    python bench/experts.py --parallel 4 --widths 32,128
"""

from __future__ import annotations

import argparse
import statistics
import dataclasses
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from mctool.data.augment import DSA  # noqa: E402
from mctool.models import ModelSpec, build_model  # noqa: E402
from mctool.training.train import Schedule, train  # noqa: E402


def measure(spec: ModelSpec, x: torch.Tensor, y: torch.Tensor, flip: bool, epochs: int, batch: int,
            device: torch.device, augment: bool, reps: int, seed: int = 0) -> dict[str, Any]:
    """Train a model for `epochs` on (x, y), `reps` times, after one warm-up batch; images/s of each rep."""
    model = build_model(spec, seed=seed).to(device)
    dsa = DSA(flip=flip) if augment else None
    gen = torch.Generator().manual_seed(seed)
    warm = Schedule(epochs=1, lr=0.01, batch_size=batch)
    _common.timed(lambda: train(model, x[:batch], y[:batch], warm, dsa, gen), device)
    _common.reset_peak(device)
    schedule = Schedule(epochs=epochs, lr=0.01, momentum=0.0, weight_decay=0.0, batch_size=batch)
    n = x.shape[0] * epochs
    secs, losses = [], []
    for _ in range(max(1, reps)):
        s, loss = _common.timed(lambda: train(model, x, y, schedule, dsa, gen), device)
        secs.append(s)
        losses.append(loss[-1])
    return {"images": n, "reps": len(secs), "seconds": secs, "images_per_s": [n / s for s in secs],
            "images_per_s_best": n / min(secs), "images_per_s_median": n / statistics.median(secs),
            "batches": epochs * -(-x.shape[0] // batch), "final_loss": losses[-1],
            "cuda_peak_bytes": _common.cuda_peak_bytes(device)}


def measure_parallel(spec: ModelSpec, x: torch.Tensor, y: torch.Tensor, flip: bool, epochs: int, batch: int,
                     device: torch.device, augment: bool, reps: int, experts: int) -> dict[str, Any]:
    """`experts` networks trained together vs one after another (interleaved); images/s of each."""
    from mctool.training.ensemble import train_many

    dsa = DSA(flip=flip) if augment else None
    schedule = Schedule(epochs=epochs, lr=0.01, momentum=0.0, weight_decay=0.0, batch_size=batch)

    def run(together: bool, images: torch.Tensor, labels: torch.Tensor, sched: Schedule) -> list[list[float]]:
        models = [build_model(spec, seed=e).to(device) for e in range(experts)]
        gens = [torch.Generator().manual_seed(e) for e in range(experts)]
        return train_many(models, images, labels, sched, dsa, gens, together=together)

    warm = Schedule(epochs=1, lr=0.01, batch_size=batch)
    for together in (False, True):  # warm-up batch of both paths
        run(together, x[:batch], y[:batch], warm)
    n = x.shape[0] * epochs * experts
    secs: dict[bool, list[float]] = {False: [], True: []}
    losses: dict[bool, list[float]] = {}
    for _ in range(max(1, reps)):
        for together in (False, True):
            _common.reset_peak(device)
            s, out = _common.timed(lambda: run(together, x, y, schedule), device)
            secs[together].append(s)
            losses[together] = [run_losses[-1] for run_losses in out]
    return {"experts": experts, "images": n, "seconds_sequential": secs[False], "seconds_together": secs[True],
            "images_per_s_sequential": n / min(secs[False]), "images_per_s_together": n / min(secs[True]),
            "speedup": min(secs[False]) / min(secs[True]),
            "final_loss_sequential": losses[False], "final_loss_together": losses[True],
            "cuda_peak_bytes_last_together": _common.cuda_peak_bytes(device)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_common_args(parser)
    parser.add_argument("--widths", default="32,128", help="comma-separated ConvNet widths")
    parser.add_argument("--cifar-images", type=int, default=2560, help="random CIFAR-shaped training images")
    parser.add_argument("--fmnist-images", type=int, default=5120,
                        help="first N Fashion-MNIST training images (0: skip)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--reps", type=int, default=2, help="timed epochs-runs per config (best and median shown)")
    parser.add_argument("--no-augment", action="store_true", help="measure without DSA instead of with it")
    parser.add_argument("--compare-augment", action="store_true",
                        help="measure each config with and without DSA (doubles the time)")
    parser.add_argument("--parallel", type=int, default=0, metavar="E",
                        help="compare E experts trained together with E one after another instead")
    args = parser.parse_args(argv)
    device = _common.setup(args)
    if args.quick:
        args.cifar_images = min(args.cifar_images, 768)
        args.fmnist_images = min(args.fmnist_images, 768)
        args.reps = 1
    widths = [int(w) for w in args.widths.split(",") if w.strip()]
    info = _common.machine_info(device)
    _common.note_load(info)
    aug_settings = [True, False] if args.compare_augment else [not args.no_augment]

    gen = torch.Generator().manual_seed(0)
    datasets: list[tuple[str, torch.Tensor, torch.Tensor, ModelSpec, bool]] = []
    if args.cifar_images:
        x = torch.randn(args.cifar_images, 3, 32, 32, generator=gen).to(device)
        y = torch.randint(0, 10, (args.cifar_images,), generator=gen).to(device)
        datasets.append(("cifar-shaped (random)", x, y, ModelSpec(), True))
    if args.fmnist_images:
        from mctool.data.prepared import prepare

        t, prepared = _common.timed(
            lambda: prepare("fashion-mnist", None, zca=True, zca_eps=0.1, device=device), device)
        print(f"prepared fashion-mnist (load + ZCA, cached after the first run) in {t:.1f} s")
        m = prepared.meta
        n = min(args.fmnist_images, prepared.train_x.shape[0])
        spec = ModelSpec(channels=m.channels, num_classes=m.num_classes, im_size=(m.height, m.width))
        datasets.append(("fashion-mnist (real, ZCA)", prepared.train_x[:n].contiguous(),
                         prepared.train_y[:n].contiguous(), spec, m.flip))

    if args.parallel:
        return parallel_table(args, device, datasets, widths, aug_settings, info)

    results, rows = [], []
    for name, x, y, base, flip in datasets:
        for width in widths:
            spec = dataclasses.replace(base, width=width)
            for aug in aug_settings:
                r = measure(spec, x, y, flip, args.epochs, args.batch, device, aug, args.reps)
                r.update({"data": name, "width": width, "augment": aug, "shape": list(x.shape[1:]),
                          "params": sum(p.numel() for p in build_model(spec, seed=0).parameters())})
                results.append(r)
                rows.append([name, width, "DSA" if aug else "none", f"{r['params']:,}", r["images"],
                             f"{min(r['seconds']):.1f}", f"{r['images_per_s_best']:.0f}",
                             f"{r['images_per_s_median']:.0f}",
                             _common.fmt_bytes(r["cuda_peak_bytes"]) if device.type == "cuda" else "-"])
                print(f"  {name} width {width} {'DSA' if aug else 'no aug'}: "
                      f"{r['images_per_s_best']:.0f} images/s (best of {r['reps']})", flush=True)

    _common.print_table(["data", "width", "augment", "params", "images", "best s", "images/s best", "images/s median",
                         "cuda peak"], rows,
                        title=f"Expert training on {device} (SGD lr 0.01, batch {args.batch}, {args.epochs} epoch(s), "
                              "warm-up batch excluded)")
    path = _common.write_json("experts", {"machine": info, "args": vars(args), "results": results}, args.out)
    print(f"wrote {path}")
    return 0


def parallel_table(args: argparse.Namespace, device: torch.device, datasets: list[Any], widths: list[int],
                   aug_settings: list[bool], info: dict[str, Any]) -> int:
    """The --parallel comparison over every data set, width and augmentation setting."""
    results, rows = [], []
    for name, x, y, base, flip in datasets:
        for width in widths:
            spec = dataclasses.replace(base, width=width)
            for aug in aug_settings:
                r = measure_parallel(spec, x, y, flip, args.epochs, args.batch, device, aug, args.reps,
                                     args.parallel)
                r.update({"data": name, "width": width, "augment": aug, "shape": list(x.shape[1:])})
                results.append(r)
                rows.append([name, width, "DSA" if aug else "none", r["experts"], r["images"],
                             f"{r['images_per_s_sequential']:.0f}", f"{r['images_per_s_together']:.0f}",
                             f"{r['speedup']:.2f}x",
                             _common.fmt_bytes(r["cuda_peak_bytes_last_together"]) if device.type == "cuda" else "-"])
                print(f"  {name} width {width}: {args.parallel} experts one after another "
                      f"{r['images_per_s_sequential']:.0f} images/s, together {r['images_per_s_together']:.0f} "
                      f"({r['speedup']:.2f}x)", flush=True)
    _common.print_table(["data", "width", "augment", "experts", "images", "seq images/s", "together images/s",
                         "speed-up", "cuda peak"], rows,
                        title=f"{args.parallel} experts together vs one after another on {device} (SGD lr 0.01, "
                              f"batch {args.batch}, {args.epochs} epoch(s), best of {args.reps} interleaved)")
    path = _common.write_json("experts-parallel", {"machine": info, "args": vars(args), "results": results},
                              args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
