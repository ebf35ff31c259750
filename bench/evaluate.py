"""Seconds per evaluation run of a synthetic set (`mctool.evaluate.evaluation.evaluate_set`).

Protocol of `mctool evaluate` (method.md §8): a fresh ConvNet-3 width 128 trained on the
synthetic set with SGD momentum 0.9, weight decay 5e-4, lr × 0.1 at the midpoint, DSA, batch
256, then tested on the real test split. Here the synthetic set is random CIFAR-shaped images
(ipc 1, 10, 50 → 10, 100, 500 images) and the Prepared data set is built directly from
synthetic tensors ('normalize' preprocessing with mean 0 and std 1).

The real protocol trains 1,000 epochs; this script trains a reduced number (default 20) and
EXTRAPOLATES linearly to 1,000 epochs (per-epoch cost × 1000 + one test pass). The test pass
(accuracy on a 10,000-image random test set, batches of 1,000) is timed separately, so the
evaluate_set call itself is given a tiny 10-image test split. `mctool evaluate` runs 5 such
runs per model by default; the table shows that total too.

    python bench/evaluate.py               # ipc 1,10,50, 20 epochs
    python bench/evaluate.py --quick       # ipc 1,10, 5 epochs
    python bench/evaluate.py --epochs 1000 --ipc 10    # a real, unextrapolated run

--together R compares instead R runs trained together (`mctool.training.ensemble`, stacked parameters
and grouped convolutions) with the same R runs one after another, both through evaluate_set
with the same seeds, measured interleaved (sequential, together, sequential, together …) in
one process, on a CIFAR-10-shaped set with width 128 and a Fashion-MNIST-shaped set (1×28×28,
no flip) with width 32. At ipc ≥ 50 it trains a fifth of --epochs (at least 2). Both modes'
per-epoch cost is extrapolated to --target-epochs; the accuracies of both are compared too.

    python bench/evaluate.py --together 5 --ipc 1,10,50 --epochs 10 --reps 2

--kernels R times one SGD step of R ConvNets three ways, interleaved: R modules one after
another; torch.func.vmap over functional_call with stacked parameters; mctool.training.ensemble's
StackedNet (grouped convolutions). Batches 10 and 100 per network (--kernel-batches); widths
128 and 32.

    python bench/evaluate.py --kernels 5 --reps 3
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from mctool.store import DatasetMeta  # noqa: E402
from mctool.data.datasets import Dataset, Preprocessing  # noqa: E402
from mctool.training.ensemble import plan_groups  # noqa: E402
from mctool.evaluate.evaluation import EvaluateConfig, evaluate_set  # noqa: E402
from mctool.models import ModelSpec, build_model  # noqa: E402
from mctool.data.prepared import Prepared  # noqa: E402
from mctool.training.train import accuracy  # noqa: E402

CLASSES = 10


def synthetic_prepared(test_images: int, device: torch.device, seed: int = 0) -> Prepared:
    """A CIFAR-10-shaped Prepared made of random tensors (valid Dataset, Preprocessing, DatasetMeta)."""
    return shaped_prepared(3, 32, True, device, test_images, seed)


def shaped_prepared(channels: int, size: int, flip: bool, device: torch.device, test_images: int = 10,
                    seed: int = 0) -> Prepared:
    """A Prepared of random images of one shape (channels×size×size, 10 classes)."""
    gen = torch.Generator().manual_seed(seed)
    ds = Dataset(
        name=f"random-{channels}x{size}x{size}",
        train_images=torch.randint(0, 256, (100, channels, size, size), generator=gen, dtype=torch.uint8),
        train_labels=torch.arange(100) % CLASSES,
        test_images=torch.randint(0, 256, (test_images, channels, size, size), generator=gen, dtype=torch.uint8),
        test_labels=torch.arange(test_images) % CLASSES,
        class_names=[f"class{i}" for i in range(CLASSES)],
        mean=(0.0,) * channels, std=(1.0,) * channels, flip=flip,
    )
    prep = Preprocessing(kind="normalize", mean=torch.zeros(channels), std=torch.ones(channels))
    meta = DatasetMeta(name=ds.name, num_classes=CLASSES, channels=channels, height=size, width=size, zca=False,
                       zca_eps=0.0, mean=ds.mean, std=ds.std, class_names=tuple(ds.class_names),
                       train_fingerprint=ds.fingerprint(), flip=flip)
    return Prepared(dataset=ds, prep=prep, meta=meta,
                    train_x=prep.apply(ds.train_images, device=device), train_y=ds.train_labels.to(device),
                    test_x=prep.apply(ds.test_images, device=device), test_y=ds.test_labels.to(device))


# (name, channels, size, flip, width) of the --together comparison.
TOGETHER_SHAPES = [("cifar10-shaped", 3, 32, True, 128), ("fashion-mnist-shaped", 1, 28, False, 32)]


def compare_together(args: argparse.Namespace, device: torch.device, ipcs: list[int],
                     info: dict[str, Any]) -> int:
    """R runs together vs one after another, interleaved, per shape and ipc."""
    runs = args.together
    results: list[dict[str, Any]] = []
    rows = []
    gen = torch.Generator().manual_seed(1)
    for name, channels, size, flip, width in TOGETHER_SHAPES:
        width = args.together_width or width
        prepared = shaped_prepared(channels, size, flip, device)
        spec = ModelSpec(width=width, channels=channels, im_size=(size, size), num_classes=CLASSES)
        warm = EvaluateConfig(runs=2, epochs=1)
        for together in (False, True):  # thread pools, allocator, first-call costs of both paths
            evaluate_set(torch.randn(10, channels, size, size, generator=gen), torch.arange(10), 0.01, prepared,
                         spec, dataclasses.replace(warm, together=together))
        for ipc in ipcs:
            n = ipc * CLASSES
            epochs = args.epochs if ipc < 50 else max(2, args.epochs // 5)
            images = torch.randn(n, channels, size, size, generator=gen)
            labels = torch.arange(CLASSES).repeat_interleave(ipc)
            cfg = EvaluateConfig(runs=runs, epochs=epochs)
            # How train_many splits the runs on this device (its memory guard may split them).
            groups = plan_groups([build_model(spec)] * runs, images.to(device), cfg.schedule(0.01), True)
            secs: dict[bool, list[float]] = {False: [], True: []}
            accs: dict[bool, list[float]] = {}
            for _ in range(max(1, args.reps)):
                for together in (False, True):
                    _common.reset_peak(device)
                    run_cfg = dataclasses.replace(cfg, together=together)
                    s, res = _common.timed(lambda: evaluate_set(images, labels, 0.01, prepared, spec, run_cfg), device)
                    secs[together].append(s)
                    accs[together] = res[0].accuracies
            seq, tog = min(secs[False]), min(secs[True])
            r = {"data": name, "width": width, "ipc": ipc, "images": n, "runs": runs, "groups": groups,
                 "epochs_trained": epochs,
                 "seconds_sequential": secs[False], "seconds_together": secs[True],
                 "speedup": seq / tog, "extrapolated_sequential_seconds": seq / epochs * args.target_epochs,
                 "extrapolated_together_seconds": tog / epochs * args.target_epochs,
                 "accuracies_sequential": accs[False], "accuracies_together": accs[True],
                 "cuda_peak_bytes_last_together": _common.cuda_peak_bytes(device)}
            results.append(r)
            rows.append([name, width, ipc, n, epochs, "+".join(map(str, groups)), f"{seq / epochs * 1e3:.0f}",
                         f"{tog / epochs * 1e3:.0f}",
                         f"{seq / tog:.2f}x", f"{seq / epochs * args.target_epochs / 60:.1f}",
                         f"{tog / epochs * args.target_epochs / 60:.1f}",
                         "yes" if accs[False] == accs[True] else "NO"])
            print(f"  {name} ipc {ipc}: {runs} runs one after another {seq / epochs * 1e3:.0f} ms/epoch, "
                  f"together {tog / epochs * 1e3:.0f} ms/epoch ({seq / tog:.2f}x)", flush=True)
    _common.print_table(
        ["data", "width", "ipc", "images", "epochs", "groups", f"{runs} seq ms/epoch", f"{runs} together ms/epoch",
         "speed-up", f"seq min @{args.target_epochs} ep", f"together min @{args.target_epochs} ep",
         "same accuracies"],
        rows, title=f"{runs} evaluation runs together vs one after another on {device} (min of {args.reps} "
                    f"interleaved; SGD mom 0.9 wd 5e-4, DSA, batch 256; minutes EXTRAPOLATED, no test pass)")
    path = _common.write_json("evaluate-together", {"machine": info, "args": vars(args), "results": results},
                              args.out)
    print(f"wrote {path}")
    return 0


def compare_kernels(args: argparse.Namespace, device: torch.device, info: dict[str, Any]) -> int:
    """One SGD step of R networks: one after another, vmap(functional_call), grouped (StackedNet)."""
    import copy

    import torch.nn.functional as F
    from torch.func import functional_call, stack_module_state, vmap

    from mctool.training.ensemble import StackedNet

    R = args.kernels
    results, rows = [], []
    for name, channels, size, _, width in TOGETHER_SHAPES:
        width = args.together_width or width
        spec = ModelSpec(width=width, channels=channels, im_size=(size, size), num_classes=CLASSES)
        for batch in (int(b) for b in args.kernel_batches.split(",") if b.strip()):
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(batch, R, channels, size, size, generator=gen).to(device)
            y = torch.randint(0, CLASSES, (R, batch), generator=gen).to(device)
            single = [build_model(spec, seed=r).to(device) for r in range(R)]
            opts = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in single]
            params, _ = stack_module_state([build_model(spec, seed=r).to(device) for r in range(R)])
            leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
            template = copy.deepcopy(single[0]).to("meta")
            vmapped = vmap(lambda p, xx: functional_call(template, p, (xx,)), in_dims=(0, 1))
            opt_v = torch.optim.SGD(leaves.values(), lr=0.01, momentum=0.9)
            stacked = StackedNet([build_model(spec, seed=r).to(device) for r in range(R)])
            opt_g = torch.optim.SGD(stacked.params, lr=0.01, momentum=0.9)

            def joint_step(logits: torch.Tensor, opt: torch.optim.Optimizer) -> None:
                loss = F.cross_entropy(logits.reshape(-1, CLASSES), y.reshape(-1), reduction="none")
                opt.zero_grad(set_to_none=True)
                loss.view(R, -1).mean(1).sum().backward()
                opt.step()

            def one_after_another() -> None:
                for r, (m, opt) in enumerate(zip(single, opts)):
                    loss = F.cross_entropy(m(x[:, r]), y[r])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()

            ways = {"one after another": one_after_another,
                    "vmap": lambda: joint_step(vmapped(leaves, x), opt_v),
                    "grouped": lambda: joint_step(stacked(x), opt_g)}
            times: dict[str, list[float]] = {k: [] for k in ways}
            for fn in ways.values():
                fn()  # warm-up
            for _ in range(max(1, args.reps)):
                for k, fn in ways.items():
                    times[k].append(_common.timed(fn, device)[0])
            best = {k: min(v) for k, v in times.items()}
            base = best["one after another"]
            results.append({"data": name, "width": width, "batch": batch, "networks": R, "seconds": times,
                            "speedup": {k: base / v for k, v in best.items()}})
            rows.append([name, width, batch, *(f"{best[k] * 1e3:.1f}" for k in ways),
                         *(f"{base / best[k]:.2f}x" for k in ("vmap", "grouped"))])
            print(f"  {name} width {width} batch {batch}: " +
                  ", ".join(f"{k} {best[k] * 1e3:.1f} ms" for k in ways), flush=True)
    _common.print_table(["data", "width", "batch/network", "one after another ms", "vmap ms", "grouped ms",
                         "vmap speed-up", "grouped speed-up"], rows,
                        title=f"One SGD step of {R} ConvNets on {device} (min of {args.reps} interleaved)")
    path = _common.write_json("evaluate-kernels", {"machine": info, "args": vars(args), "results": results},
                              args.out)
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_common_args(parser)
    parser.add_argument("--ipc", default="1,10,50", help="comma-separated images per class")
    parser.add_argument("--epochs", type=int, default=20, help="epochs actually trained (extrapolated to --target)")
    parser.add_argument("--target-epochs", type=int, default=1000, help="the protocol's epochs (extrapolation)")
    parser.add_argument("--runs", type=int, default=1, help="timed runs per ipc (min and median shown)")
    parser.add_argument("--protocol-runs", type=int, default=5, help="runs `mctool evaluate` does per model")
    parser.add_argument("--test-images", type=int, default=10000)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--test-reps", type=int, default=2, help="repetitions of the test-set pass (min shown)")
    parser.add_argument("--together", type=int, default=0, metavar="R",
                        help="compare R runs trained together with R runs one after another instead")
    parser.add_argument("--kernels", type=int, default=0, metavar="R",
                        help="time one step of R networks: one after another, vmap, grouped (StackedNet)")
    parser.add_argument("--kernel-batches", default="10,100",
                        help="--kernels: comma-separated images per network and step (256 needs ~10 GB at R=5)")
    parser.add_argument("--reps", type=int, default=2,
                        help="--together/--kernels: interleaved repetitions (min shown)")
    parser.add_argument("--together-width", type=int, default=None,
                        help="--together: one width for both shapes (default 128 for CIFAR-10, 32 for Fashion-MNIST)")
    args = parser.parse_args(argv)
    device = _common.setup(args)
    if args.quick:  # shrink what the user did not set explicitly
        if args.ipc == parser.get_default("ipc"):
            args.ipc = "1,10"
        args.epochs = min(args.epochs, 5)
        args.test_reps = 1
        args.test_images = min(args.test_images, 2000)
    ipcs = [int(x) for x in args.ipc.split(",") if x.strip()]
    info = _common.machine_info(device)
    _common.note_load(info)
    if args.kernels:
        return compare_kernels(args, device, info)
    if args.together:
        return compare_together(args, device, ipcs, info)

    spec = ModelSpec(width=args.width)
    prepared = synthetic_prepared(10, device)  # evaluate_set's own test pass: negligible
    test = synthetic_prepared(args.test_images, device)
    gen = torch.Generator().manual_seed(1)

    # Test-set pass of a trained network: accuracy() in eval mode, batches of 1,000.
    model = build_model(spec, seed=0).to(device)
    accuracy(model, test.test_x[:1000], test.test_y[:1000])  # warm-up
    test_t = _common.repeat(lambda: accuracy(model, test.test_x, test.test_y), device, args.test_reps)
    print(f"test pass on {args.test_images:,} images: {test_t['min']:.1f} s (min of {test_t['reps']})", flush=True)

    # Warm-up of the training path (thread pools, allocator).
    warm = EvaluateConfig(runs=1, epochs=1)
    evaluate_set(torch.randn(10, 3, 32, 32, generator=gen), torch.arange(10), 0.01, prepared, spec, warm)

    results: list[dict[str, Any]] = []
    rows = []
    for ipc in ipcs:
        n = ipc * CLASSES
        images = torch.randn(n, 3, 32, 32, generator=gen)
        labels = torch.arange(CLASSES).repeat_interleave(ipc)
        cfg = EvaluateConfig(runs=1, epochs=args.epochs)
        secs = []
        for _ in range(max(1, args.runs)):
            _common.reset_peak(device)
            s, _ = _common.timed(lambda: evaluate_set(images, labels, 0.01, prepared, spec, cfg), device)
            secs.append(s)
        per_epoch = min(secs) / args.epochs
        per_epoch_med = statistics.median(secs) / args.epochs
        batches = -(-n // 256)
        run_target = per_epoch * args.target_epochs + test_t["min"]
        r = {"ipc": ipc, "images": n, "batches_per_epoch": batches, "epochs_trained": args.epochs,
             "seconds": secs, "seconds_per_epoch": per_epoch, "seconds_per_epoch_median": per_epoch_med,
             "images_per_s": n / per_epoch, "test_pass_seconds": test_t["min"],
             "extrapolated_run_seconds": run_target,
             "extrapolated_protocol_seconds": run_target * args.protocol_runs,
             "cuda_peak_bytes": _common.cuda_peak_bytes(device)}
        results.append(r)
        rows.append([ipc, n, batches, f"{min(secs):.1f}", f"{per_epoch * 1e3:.0f}", f"{n / per_epoch:.0f}",
                     f"{run_target / 60:.1f}", f"{run_target * args.protocol_runs / 60:.1f}"])
        print(f"  ipc {ipc}: {per_epoch * 1e3:.0f} ms/epoch", flush=True)

    _common.print_table(
        ["ipc", "images", "batches/epoch", f"{args.epochs} epochs s", "ms/epoch", "images/s",
         f"1 run @{args.target_epochs} ep, minutes (extrapolated)", f"{args.protocol_runs} runs, minutes"],
        rows, title=f"Evaluation on {device}: ConvNet-3 width {args.width}, SGD mom 0.9 wd 5e-4, DSA, batch 256; "
                    f"{args.epochs} epochs measured, {args.target_epochs} EXTRAPOLATED "
                    f"(+ {test_t['min']:.1f} s test pass on {args.test_images:,} images)")
    path = _common.write_json("evaluate", {"machine": info, "args": vars(args), "test_pass": test_t,
                                           "results": results}, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
