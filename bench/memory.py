"""Calibrate mctool/matching/memory.py's per-image activation factors on this device, and check the model.

For each network shape and each kind of step, one `mctool.matching.loss.match` call (or one plain
gradient step, kind "first") runs in a FRESH subprocess at two micro-batch sizes m1 < m2 with
n = B = m images, and the peak memory above the baseline (everything built, nothing run) is
read: CPU the anonymous resident memory (RSS less file-backed pages), sampled every millisecond,
above its value just before (malloc tuned as the CLI does, free heap trimmed first), CUDA torch.cuda.max_memory_allocated. The
slope (peak(m2) − peak(m1)) / (m2 − m1), less the image gradient's I·s per image, divided by
A·s (A = activation elements per image, mctool.matching.memory.profile_network) is the factor of that
kind; ``unrolled`` runs N = 1 and 3 and fits m·N (the graph kept per step, "unrolled") and m
(the final backward's temporaries, "unrolled-backward") together. The intercept shows the fixed
overhead (libraries' workspaces, P-vectors). The machine's heap makes single points noisy
(±30 %): the table takes the larger factor of the two shapes.

Kinds: first (a plain gradient step: pass 1), constant and adjoint through fastgrad and
through autograd (second-order steps without / with the Hessian-vector product), unrolled.

    python bench/memory.py               # CIFAR (3x32x32, depth 3) and Tiny ImageNet (3x64x64, depth 4) shapes
    python bench/memory.py --quick       # CIFAR shape only
    python bench/memory.py --device cuda # on a GPU: paste the printed table into mctool/matching/memory.py

A last table runs whole iterations (constant and adjoint, micro-batched, N = 3, DSA on) and
compares their measured peak with mctool.matching.memory.estimate_peak_bytes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from mctool.core.allocator import release_free_memory, tune_malloc  # noqa: E402
from mctool.data.augment import DSA, AugParams, StepAugment  # noqa: E402
from mctool.models.functional import FlatNet  # noqa: E402
from mctool.matching.loss import _Inputs, _plain_grad, match  # noqa: E402
from mctool.matching.memory import (ACTIVATION_FACTORS, VECTOR_FACTOR, Workload, estimate_peak_bytes,  # noqa: E402
                           profile_network)
from mctool.models import ModelSpec, build_model, default_depth  # noqa: E402

MARK = "BENCH-RESULT "
KINDS = {  # kind -> (match mode or "first", fast_path, steps for the slope)
    "first": ("first", "fastgrad", (1,)),
    "fastgrad": ("constant", "fastgrad", (1,)),
    "fastgrad-hvp": ("adjoint", "fastgrad", (1,)),
    "autograd": ("constant", "autograd", (1,)),
    "autograd-hvp": ("adjoint", "autograd", (1,)),
    "unrolled": ("unrolled", "fastgrad", (1, 3)),
}
SHAPES = {"cifar": (32, 10), "tiny": (64, 200)}  # image size, classes


def rotate_augment(n: int, size: int, steps: int, device: torch.device, seed: int) -> StepAugment:
    """DSA with the rotate op at every step (grid_sample: the op with the largest temporaries)."""
    dsa = DSA("rotate")
    gen = torch.Generator().manual_seed(seed)
    draws: list[AugParams] = [dsa.sample(n, size, size, gen).to(device) for _ in range(steps)]
    return StepAugment(dsa, draws)


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One (shape, kind, m, N, micro) measurement in this fresh process."""
    if not spec.get("system_malloc"):
        tune_malloc()
    device = torch.device(spec["device"])
    size, classes = SHAPES[spec["shape"]]
    n, steps, micro = spec["n"], spec["steps"], spec.get("micro")
    model_spec = ModelSpec(width=spec["width"], depth=default_depth(size), num_classes=classes, im_size=(size, size))
    module = build_model(model_spec, seed=0).to(device)
    net = FlatNet(module)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, size, size, generator=gen).to(device)
    labels = (torch.arange(n) % classes).to(device)
    theta_s = net.flatten().to(device)
    theta_t = theta_s + 0.01 * torch.randn(theta_s.shape, generator=gen).to(device)
    batches = [torch.randperm(n, generator=gen).to(device) for _ in range(steps)]
    augment = rotate_augment(n, size, steps, device, 0)
    mode, fast = spec["mode"], spec["fast"]
    _common.sync(device)
    release_free_memory()  # freed heap pages would otherwise be reused unseen by the step
    rss_before = _common.rss_peak_bytes()
    cuda_before = int(torch.cuda.memory_allocated(device)) if device.type == "cuda" else None
    _common.reset_peak(device)
    with _common.AnonPeak() as anon:
        if mode == "first":
            _plain_grad(_Inputs(net, images, labels, augment, micro), theta_s, batches[0], 0)
        else:
            match(net, images, labels, theta_s, theta_t, 0.01, batches, augment, mode, fast_path=fast,
                  micro_batch=micro)
        _common.sync(device)
    if device.type == "cuda":
        delta = _common.cuda_peak_bytes(device) - cuda_before
    else:
        delta = anon.delta
    return {**spec, "delta_bytes": delta, "rss_before": rss_before, "cuda_before": cuda_before,
            "num_params": net.num_params}


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    err = proc.stderr.strip().splitlines()[-3:]
    raise SystemExit(f"child {spec} failed: exit {proc.returncode}: {' | '.join(err)}")


def calibrate(args: argparse.Namespace, device: torch.device, shape: str) -> list[dict[str, Any]]:
    """Factor per kind for one network shape."""
    size, classes = SHAPES[shape]
    sizes = [int(v) for v in args.sizes.split(",")]
    sizes = sizes if shape == "cifar" else [max(1, v // 2) for v in sizes]
    profile = profile_network(build_model(ModelSpec(width=args.width, depth=default_depth(size),
                                                    num_classes=classes, im_size=(size, size))), (3, size, size))
    s = 4
    rows = []
    for kind in args.kinds.split(","):
        mode, fast, step_list = KINDS[kind]
        base = {"device": str(device), "shape": shape, "width": args.width, "kind": kind, "mode": mode,
                "fast": fast, "system_malloc": args.system_malloc}
        pts = [(m, n_steps, run_child({**base, "n": m, "steps": n_steps})["delta_bytes"])
               for n_steps in step_list for m in sizes]
        # Least squares of delta on m (and, for unrolled, on m·N: the graph kept per step) with an intercept.
        ys = torch.tensor([float(d) for _, _, d in pts], dtype=torch.float64)
        cols = [[float(m) for m, _, _ in pts], [1.0] * len(pts)]
        if kind == "unrolled":
            cols.insert(0, [float(m * ns) for m, ns, _ in pts])
        sol = torch.linalg.lstsq(torch.tensor(cols, dtype=torch.float64).T, ys[:, None]).solution.flatten().tolist()
        fits = [("unrolled", sol[0]), ("unrolled-backward", sol[1])] if kind == "unrolled" else [(kind, sol[0])]
        intercept = sol[-1]
        for name, slope in fits:
            # The image gradient (I·s per image) is counted separately by the model.
            per_image = slope - (profile.in_elems * s if name != "unrolled" else 0)
            factor = per_image / (profile.act_elems * s)
            rows.append({"shape": shape, "kind": name, "points": pts, "slope_bytes_per_image": slope,
                         "intercept_bytes": intercept, "factor": factor, "act_elems": profile.act_elems,
                         "num_params": profile.num_params})
            print(f"  {shape:5s} {name:17s} slope {_common.fmt_bytes(slope)}/image -> factor {factor:.2f}; "
                  f"intercept {_common.fmt_bytes(intercept)}", flush=True)
    return rows


def validate(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """Whole micro-batched iterations: measured peak (above baseline) vs the model's transient estimate."""
    out = []
    size, classes = SHAPES["cifar"]
    module = build_model(ModelSpec(width=args.width, num_classes=classes, im_size=(size, size)))
    profile = profile_network(module, (3, size, size))
    for mode, fast in (("constant", "fastgrad"), ("adjoint", "fastgrad"), ("constant", "autograd"),
                       ("unrolled", "fastgrad")):
        n, micro, steps = args.validate_n, args.validate_micro, 3
        r = run_child({"device": str(device), "shape": "cifar", "width": args.width, "mode": mode, "fast": fast,
                       "n": n, "steps": steps, "micro": micro, "system_malloc": args.system_malloc})
        work = Workload(n_images=n, batch=n, syn_steps=steps, num_classes=classes)
        est = estimate_peak_bytes(profile, work, mode, micro, device, impl=fast)
        ratio = r["delta_bytes"] / est.transient_bytes
        out.append({"mode": mode, "impl": fast, "n": n, "micro": micro, "steps": steps,
                    "measured_bytes": r["delta_bytes"], "estimated_bytes": est.transient_bytes, "ratio": ratio})
        print(f"  {mode:8s} {fast:8s} n={n} micro={micro}: measured {_common.fmt_bytes(r['delta_bytes'])}, "
              f"estimated {_common.fmt_bytes(est.transient_bytes)} (measured/estimated {ratio:.2f})", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--one":  # hidden: child process
        print(MARK + json.dumps(child(json.loads(sys.argv[2]))), flush=True)
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_common_args(parser)
    parser.add_argument("--shapes", default="cifar,tiny", help="comma-separated: cifar (32 px), tiny (64 px)")
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated kinds to calibrate")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--sizes", default="32,64,128", help="micro-batch sizes fitted (halved at 64 px)")
    parser.add_argument("--validate-n", type=int, default=96, help="images in the validation iterations")
    parser.add_argument("--validate-micro", type=int, default=40, help="their micro-batch")
    parser.add_argument("--no-validate", action="store_true")
    parser.add_argument("--validate-only", action="store_true", help="only the estimate-vs-measured table")
    args = parser.parse_args(argv)
    device = _common.setup(args)
    if args.quick:
        args.shapes = "cifar"
    info = _common.machine_info(device)
    _common.note_load(info)
    rows: list[dict[str, Any]] = []
    for shape in [] if args.validate_only else args.shapes.split(","):
        rows += calibrate(args, device, shape.strip())
    table = {}
    for kind in [*KINDS, "unrolled-backward"]:
        fs = [r["factor"] for r in rows if r["kind"] == kind]
        if fs:
            table[kind] = max(fs)  # the larger shape's factor: estimates err on the safe side
    _common.print_table(["shape", "kind", "bytes/image", "factor", "intercept"],
                        [[r["shape"], r["kind"], _common.fmt_bytes(r["slope_bytes_per_image"]), f"{r['factor']:.2f}",
                          _common.fmt_bytes(r["intercept_bytes"])] for r in rows],
                        title=f"Activation factors on {device} (bytes per image / (A·4)); current table: "
                              f"{ {k: v for (d, k), v in ACTIVATION_FACTORS.items() if d == device.type} }, "
                              f"vectors {VECTOR_FACTOR}")
    print("\nFor mctool/matching/memory.py ACTIVATION_FACTORS (max over shapes):")
    for kind, f in table.items():
        print(f'    ("{device.type}", "{kind}"): {f:.2f},')
    checks = [] if args.no_validate else validate(args, device)
    path = _common.write_json(f"memory-{device.type}", {"machine": info, "args": vars(args), "calibration": rows,
                                                         "factors": table, "validation": checks}, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
