"""Seconds per distillation iteration and peak memory of `mctool.matching.loss.match`, by gradient mode.

Setting: CIFAR-10 shape at ipc 10 — 100 synthetic images 3x32x32, ConvNet-3 width 128
(P = 320,010), batch_syn = 100 (every image in every inner step: batches = [randperm(100)] * N),
DSA on (one op per inner step, drawn in advance and replayed as mctool/distill/loop.py's
Distiller.augmentation does), α = 0.01, random θ_start and θ_target = θ_start + noise.

For each mode (constant, adjoint, unrolled; "constant-autograd" is constant with autograd's
double backward instead of mctool/matching/fastgrad.py's hand-written ConvNet sweep) and syn_steps N
one `match` call (= one
distillation iteration minus the image/α update, which is negligible) is timed in a FRESH
subprocess, so that its peak memory can be read: on CPU ru_maxrss of the child after the run
(the child's baseline ru_maxrss before the run is reported too, and the difference); on CUDA
torch.cuda.max_memory_allocated. The baseline is read after the problem is built and before a
one-step plain warm-up (thread pools, allocator) and the timed call; the warm-up's footprint is
one step's, which no mode stays below, so it does not raise the peak.

The reference point "plain" is N ordinary training steps of an nn.Module on the same
100-image batch with the same DSA draws (forward + backward + SGD update). Reported goals:
constant/plain time ratio ≤ 3.5 and constant memory at the largest N / at the smallest N
≤ 1.10 (memory flat in N).

A second table ("per-op") times, for each DSA op alone and without augmentation, one
plain gradient step (pass 1 of constant/adjoint) and one second-order step (pass 2 as match
runs it, including the backward through the augmentation) — to locate augmentation hot spots.

Both the children and the parent tune glibc malloc as the CLI does (mctool/core/allocator.py);
--system-malloc measures with the default allocator instead.

Default: constant at N = 10,20,40,80; adjoint, unrolled and constant-autograd at N ≤ 20
(--max-exact-steps).
--full runs every mode at every N (unrolled at 80 holds all 80 steps' graphs: several GB and
a long run on a 2-core CPU). An unrolled run whose memory, extrapolated linearly from a
smaller N, would exceed 60 % of the available RAM is skipped.

    python bench/distill.py                 # default (CPU here: ~10 min, longer under load)
    python bench/distill.py --quick         # N = 10,20, all modes, no per-op table
    python bench/distill.py --system-malloc # the same with glibc's default malloc
    python bench/distill.py --full
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from mctool.data.augment import DSA, AugParams, StepAugment  # noqa: E402
from mctool.models.functional import FlatNet  # noqa: E402
from mctool.core.allocator import release_free_memory, tune_malloc  # noqa: E402
from mctool.matching.loss import _Inputs, _second_order_step, match  # noqa: E402
from mctool.matching.memory import Workload, auto_micro_batch, estimate_peak_bytes, free_bytes, profile_network  # noqa: E402
from mctool.models import ModelSpec, build_model, default_depth  # noqa: E402
from mctool.matching.secondorder import SecondOrder  # noqa: E402

MARK = "BENCH-RESULT "


def model_spec(classes: int, width: int, size: int) -> ModelSpec:
    """The presets' ConvNet for `size`-pixel RGB images (`default_depth`: 3 up to 64 px)."""
    return ModelSpec(width=width, num_classes=classes, im_size=(size, size), depth=default_depth(size))


def make_problem(ipc: int, classes: int, width: int, steps: int, device: torch.device, seed: int,
                 augment: bool, size: int = 32) -> dict[str, Any]:
    """Images, labels, θ_s, θ_T, batches and the replayable augmentation of one iteration."""
    gen = torch.Generator().manual_seed(seed)
    module = build_model(model_spec(classes, width, size), seed=seed).to(device)
    net = FlatNet(module)
    n = ipc * classes
    images = torch.randn(n, 3, size, size, generator=gen).to(device)
    labels = torch.arange(classes).repeat_interleave(ipc).to(device)
    theta_s = net.flatten().to(device)
    theta_t = theta_s + 0.01 * torch.randn(theta_s.shape, generator=gen).to(device)
    batches = [torch.randperm(n, generator=gen).to(device)] * steps
    params: list[AugParams] = []
    dsa = DSA() if augment else None
    if dsa is not None:
        params = [dsa.sample(n, size, size, gen).to(device) for _ in batches]
    aug = StepAugment(dsa, params) if dsa is not None else None  # as Distiller.augmentation replays them
    return {"module": module, "net": net, "images": images, "labels": labels, "theta_s": theta_s,
            "theta_t": theta_t, "batches": batches, "augment": aug, "ops": [p.op for p in params]}


def plain_steps(pb: dict[str, Any], steps: int) -> float:
    """N ordinary SGD steps of the nn.Module on the batch (the cost match is compared against)."""
    module = pb["module"]
    opt = torch.optim.SGD(module.parameters(), lr=0.01)
    loss = torch.zeros(())
    for k in range(steps):
        idx = pb["batches"][k]
        x = pb["images"][idx]
        if pb["augment"] is not None:
            x = pb["augment"](x, k)
        loss = F.cross_entropy(module(x), pb["labels"][idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return float(loss)


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One configuration, run in its own process: time one call and read the peak memory."""
    if not spec.get("system_malloc"):
        tune_malloc()
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    pb = make_problem(spec["ipc"], spec["classes"], spec["width"], spec["steps"], device, spec["seed"],
                      spec["augment"], spec.get("size", 32))
    mode, _, impl = spec["mode"].partition("-")  # "constant-autograd": fast_path off
    _common.sync(device)
    # Baseline: interpreter, libraries, model, images, θ vectors — everything but the run itself.
    rss_before = _common.rss_peak_bytes()
    release_free_memory()  # freed heap pages would otherwise be reused unseen by the run
    cuda_before = int(torch.cuda.memory_allocated(device)) if device.type == "cuda" else None
    # Warm-up: one plain step (thread pools, allocator); its footprint is one step's, which no
    # mode stays below, so it does not raise the peak read after the run.
    if mode == "plain":
        plain_steps(pb, 1)
    elif not spec.get("no_warmup"):
        w = pb["theta_s"].clone().requires_grad_(True)
        x = pb["images"] if pb["augment"] is None else pb["augment"](pb["images"], 0)
        torch.autograd.grad(F.cross_entropy(pb["net"](w, x), pb["labels"]), w)
        del w, x
    _common.sync(device)
    _common.reset_peak(device)
    anon = _common.AnonPeak(0.005) if spec.get("sample_memory") else contextlib.nullcontext()
    with anon:
        if mode == "plain":
            seconds, loss = _common.timed(lambda: plain_steps(pb, spec["steps"]), device)
            extra: dict[str, Any] = {"loss": loss}
        else:
            seconds, r = _common.timed(
                lambda: match(pb["net"], pb["images"], pb["labels"], pb["theta_s"], pb["theta_t"], 0.01,
                              pb["batches"], pb["augment"], mode, fast_path=impl != "autograd",
                              micro_batch=spec.get("micro")), device)
            extra = {"loss": r.loss, "grad_alpha": r.grad_alpha, "grad_images_norm": float(r.grad_images.norm())}
    if isinstance(anon, _common.AnonPeak):
        extra["anon_growth_bytes"] = anon.delta
    return {**spec, **extra, "seconds": seconds, "seconds_per_step": seconds / spec["steps"],
            "rss_baseline_bytes": rss_before, "rss_peak_bytes": _common.rss_peak_bytes(),
            "rss_delta_bytes": _common.rss_peak_bytes() - rss_before,
            "cuda_baseline_bytes": cuda_before, "cuda_peak_bytes": _common.cuda_peak_bytes(device),
            "ops": pb["ops"], "torch_num_threads": torch.get_num_threads()}


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Run `child(spec)` in a fresh interpreter; parse its result line."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    err = proc.stderr.strip().splitlines()[-3:]
    return {**spec, "error": f"exit {proc.returncode}: {' | '.join(err)}"}


def mem_available() -> int | None:
    """MemAvailable from /proc/meminfo (bytes), None elsewhere."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def per_op_table(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """Plain-gradient step and second-order step of match's inner loop, per DSA op (min over reps)."""
    pb = make_problem(args.ipc, args.classes, args.width, 1, device, args.seed, False)
    net, images, labels = pb["net"], pb["images"], pb["labels"]
    dsa = DSA()
    gen = torch.Generator().manual_seed(args.seed + 1)
    draws: dict[str, AugParams | None] = {"none": None}
    while len(draws) < len(dsa.ops) + 1:
        p = dsa.sample(images.shape[0], 32, 32, gen)
        draws.setdefault(p.op, p.to(device))
    v = torch.randn(pb["theta_s"].shape, generator=gen).to(device) * 1e-3

    def first(p: AugParams | None) -> None:
        w = pb["theta_s"].clone().requires_grad_(True)
        x = images if p is None else dsa.apply(images, p)
        torch.autograd.grad(F.cross_entropy(net(w, x), labels), w)

    so = SecondOrder(net, "fastgrad")
    everything = torch.arange(images.shape[0], device=device)
    grad_x = torch.zeros_like(images)

    def second(p: AugParams | None) -> None:  # what constant mode's pass 2 does per step
        inp = _Inputs(net, images, labels, None if p is None else StepAugment(dsa, [p]), None)
        _second_order_step(inp, so, pb["theta_s"], v, everything, 0, False, grad_x, 1.0)

    def apply_only(p: AugParams | None) -> None:
        if p is not None:
            dsa.apply(images, p)

    first(None)  # warm-up
    out = []
    # Interleave ops within each repetition so a burst of outside load hits all of them alike.
    times: dict[str, dict[str, list[float]]] = {k: {"apply": [], "first": [], "second": []} for k in draws}
    for _ in range(args.op_reps):
        for op, p in draws.items():
            times[op]["apply"].append(_common.timed(lambda: apply_only(p), device)[0])
            times[op]["first"].append(_common.timed(lambda: first(p), device)[0])
            times[op]["second"].append(_common.timed(lambda: second(p), device)[0])
    for op, t in times.items():
        x = images if draws[op] is None else dsa.apply(images, draws[op])
        out.append({"op": op, "apply_s": min(t["apply"]), "first_s": min(t["first"]), "second_s": min(t["second"]),
                    "first_s_all": t["first"], "second_s_all": t["second"],
                    "output_channels_last": bool(not x.is_contiguous()
                                                 and x.is_contiguous(memory_format=torch.channels_last))})
    return out


# Large rows (issue 13): name -> (ipc, classes, image size). Depth follows the presets (3 at 64 px).
LARGE = {"tiny-ipc10": (10, 200, 64), "cifar100-ipc50": (50, 100, 32)}
LARGE_SMALL_IPC = {"tiny-ipc10": 2, "cifar100-ipc50": 10}  # same micro-batch, fewer images


def _gib(x: float | None) -> str:
    return _common.fmt_bytes(x)


def _mem(r: dict[str, Any], device: torch.device) -> int:
    """Peak above the baseline: CUDA peak − allocated before; CPU anonymous resident memory, sampled."""
    if device.type == "cuda":
        return int(r["cuda_peak_bytes"] - r["cuda_baseline_bytes"])
    return int(r["anon_growth_bytes"])


def resolve_micro(value: str | None, profile, work: Workload, device: torch.device, budget: int | None) -> int | None:
    """--micro-batch N|auto for one problem (auto: mctool.matching.memory within `budget` bytes)."""
    if value in (None, "", "0", "none"):
        return None
    if value != "auto":
        return int(value)
    free = free_bytes(device)
    safety = None
    if budget is not None:
        free, safety = budget, 1.0
    return auto_micro_batch(profile, work, "constant", device, free=free, safety=safety, impl="fastgrad").micro_batch


def large_table(args: argparse.Namespace, device: torch.device, base: dict[str, Any]) -> dict[str, Any]:
    """Tiny ImageNet ipc 10 and CIFAR-100 ipc 50 shapes: micro-batched iterations, estimate vs measured,
    the same micro-batch at a smaller ipc, and chunked/unchunked time from interleaved runs."""
    free = free_bytes(device)
    budget = None if args.budget_gib is None else int(args.budget_gib * 2**30)
    cap = budget if budget is not None else (None if free is None else int(0.6 * free))
    steps = args.large_steps
    rows: list[dict[str, Any]] = []
    overhead: list[dict[str, Any]] = []
    print(f"large rows: free memory {_gib(free)}, budget for auto {_gib(cap)}, N = {steps}", flush=True)

    def one(name: str, ipc: int, micro: int | None, kind: str) -> dict[str, Any]:
        _, classes, size = LARGE[name]
        r = run_child({**base, "ipc": ipc, "classes": classes, "size": size, "steps": steps, "mode": "constant",
                       "micro": micro, "no_warmup": True, "sample_memory": True})
        profile = profile_network(build_model(model_spec(classes, args.width, size)), (3, size, size))
        n = ipc * classes
        est = estimate_peak_bytes(profile, Workload(n, n, steps, classes), "constant", micro, device, "fastgrad")
        r.update({"shape": name, "kind": kind, "n": n, "micro": micro, "estimated_bytes": est.transient_bytes})
        if "error" not in r:
            r["measured_bytes"] = _mem(r, device)
            r["measured_over_estimated"] = r["measured_bytes"] / est.transient_bytes
            print(f"  {name:15s} {kind:10s} n={n:5d} micro={micro or '-'}: {r['seconds']:.1f} s, measured "
                  f"{_gib(r['measured_bytes'])}, estimated {_gib(est.transient_bytes)}", flush=True)
        else:
            print(f"  {name} {kind} n={n} micro={micro}: FAILED {r['error']}", flush=True)
        return r

    for name in [x.strip() for x in args.large_shapes.split(",") if x.strip()]:
        ipc, classes, size = LARGE[name]
        n = ipc * classes
        profile = profile_network(build_model(model_spec(classes, args.width, size)), (3, size, size))
        work = Workload(n, n, steps, classes)
        whole = estimate_peak_bytes(profile, work, "constant", None, device, "fastgrad")
        micro = resolve_micro(args.micro_batch or "auto", profile, work, device, cap)
        rows.append(one(name, ipc, micro, "micro"))
        rows.append(one(name, LARGE_SMALL_IPC[name], micro, "micro, small ipc"))
        if cap is not None and whole.transient_bytes <= cap:
            rows.append(one(name, ipc, None, "whole"))
        else:
            rows.append({"shape": name, "kind": "whole", "n": n, "micro": None, "estimated_bytes": whole.transient_bytes,
                         "skipped": f"estimated {_gib(whole.transient_bytes)} > budget {_gib(cap)}"})
            print(f"  {name:15s} whole      n={n:5d}: skipped, estimated {_gib(whole.transient_bytes)} > "
                  f"budget {_gib(cap)}", flush=True)
        # Overhead of chunking, where the whole batch fits: the largest ipc whose unchunked estimate is
        # within the budget, in 4 chunks (smaller chunks than the row above: a conservative overhead).
        per_ipc = [i for i in range(1, ipc + 1)
                   if estimate_peak_bytes(profile, Workload(i * classes, i * classes, steps, classes), "constant",
                                          None, device, "fastgrad").transient_bytes <= (cap or 0)]
        if not per_ipc:
            continue
        o_ipc = max(per_ipc)
        o_micro = math.ceil(o_ipc * classes / 4)
        pairs = []
        for _ in range(args.overhead_reps):  # interleaved: a burst of outside load hits both alike
            c = one(name, o_ipc, o_micro, "overhead-chunked")
            u = one(name, o_ipc, None, "overhead-whole")
            if "error" not in c and "error" not in u:
                pairs.append({"chunked_s": c["seconds"], "whole_s": u["seconds"], "ratio": c["seconds"] / u["seconds"],
                              "chunked_bytes": c["measured_bytes"], "whole_bytes": u["measured_bytes"]})
        if pairs:
            overhead.append({"shape": name, "ipc": o_ipc, "n": o_ipc * classes, "micro": o_micro, "pairs": pairs,
                             "median_ratio": statistics.median(p["ratio"] for p in pairs)})

    ok = [r for r in rows if "error" not in r and "skipped" not in r]
    _common.print_table(
        ["shape", "row", "images", "micro-batch", "s/iter", "s/step", "measured peak", "estimated", "meas/est"],
        [[r["shape"], r["kind"], r["n"], r["micro"] or "whole", f"{r['seconds']:.1f}", f"{r['seconds_per_step']:.1f}",
          _gib(r["measured_bytes"]), _gib(r["estimated_bytes"]), f"{r['measured_over_estimated']:.2f}"] for r in ok]
        + [[r["shape"], r["kind"], r["n"], "whole", "-", "-", "-", _gib(r["estimated_bytes"]), "skipped"]
           for r in rows if "skipped" in r],
        title=f"constant mode, N = {steps}, DSA {'off' if args.no_augment else 'on'}, {device}: peak above the "
              "baseline (problem built), estimate = mctool.matching.memory transient terms")
    if overhead:
        _common.print_table(
            ["shape", "images", "micro-batch", "chunked s (each)", "whole s (each)", "median chunked/whole"],
            [[o["shape"], o["n"], o["micro"], " ".join(f"{p['chunked_s']:.1f}" for p in o["pairs"]),
              " ".join(f"{p['whole_s']:.1f}" for p in o["pairs"]), f"{o['median_ratio']:.3f}"] for o in overhead],
            title="Chunking overhead, interleaved runs (goal: <= 1.10)")
    return {"free_bytes": free, "budget_bytes": cap, "steps": steps, "rows": rows, "overhead": overhead}



def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--one":  # hidden: child process
        print(MARK + json.dumps(child(json.loads(sys.argv[2]))), flush=True)
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_common_args(parser)
    parser.add_argument("--steps", default="10,20,40,80", help="comma-separated syn_steps N")
    parser.add_argument("--modes", default="constant,constant-autograd,adjoint,unrolled",
                        help="comma-separated gradient modes; MODE-autograd runs MODE without the "
                             "hand-written ConvNet sweep (fast_path=False)")
    parser.add_argument("--max-exact-steps", type=int, default=20,
                        help="largest N for adjoint and unrolled unless --full (default 20)")
    parser.add_argument("--full", action="store_true", help="every mode at every N (slow on CPU)")
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--no-augment", action="store_true", help="DSA off")
    parser.add_argument("--no-ops", action="store_true", help="skip the per-DSA-op table")
    parser.add_argument("--op-reps", type=int, default=3, help="repetitions of each per-op timing (min shown)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--micro-batch", default=None,
                        help="N or auto: compute each inner step in micro-batches of N images (auto: the largest "
                             "that mctool.matching.memory estimates to fit); default whole batches (--large: auto)")
    parser.add_argument("--large", action="store_true",
                        help="instead of the CIFAR-10 table: the Tiny ImageNet ipc 10 and CIFAR-100 ipc 50 shapes "
                             "micro-batched, estimate vs measured peak, and chunked/unchunked time")
    parser.add_argument("--large-shapes", default=",".join(LARGE), help=f"comma-separated, from {', '.join(LARGE)}")
    parser.add_argument("--large-steps", type=int, default=1, help="syn_steps N of the large rows (default 1)")
    parser.add_argument("--budget-gib", type=float, default=None,
                        help="memory (GiB) micro-batch auto may plan for in the large rows, and the limit for "
                             "running a whole batch (default: 60%% of free memory; this shared machine: pass 4)")
    parser.add_argument("--overhead-reps", type=int, default=3, help="interleaved chunked/whole pairs (large rows)")
    args = parser.parse_args(argv)
    device = _common.setup(args)
    if args.quick:  # shrink what the user did not set explicitly
        if args.steps == parser.get_default("steps"):
            args.steps = "10,20"
        args.no_ops = True
    steps = sorted({int(s) for s in args.steps.split(",") if s.strip()})
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    info = _common.machine_info(device)
    _common.note_load(info)

    base = {"device": str(device), "threads": args.threads, "ipc": args.ipc, "classes": args.classes,
            "width": args.width, "seed": args.seed, "augment": not args.no_augment,
            "system_malloc": args.system_malloc}
    if args.large:
        out = large_table(args, device, base)
        path = _common.write_json("distill-large", {"machine": info, "args": vars(args), **out}, args.out)
        print(f"wrote {path}")
        return 0
    if args.micro_batch:
        n_img = args.ipc * args.classes
        profile = profile_network(build_model(model_spec(args.classes, args.width, 32)), (3, 32, 32))
        work = Workload(n_img, n_img, max(steps), args.classes)
        base["micro"] = resolve_micro(args.micro_batch, profile, work, device, None)
        print(f"micro-batch {base['micro']} ({args.micro_batch})", flush=True)
    results: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for n in steps:
        for mode in ["plain", *modes]:
            slow = mode in ("adjoint", "unrolled") or mode.endswith("-autograd")
            if slow and not args.full and n > args.max_exact_steps:
                skipped.append({"mode": mode, "steps": n, "why": f"N > --max-exact-steps {args.max_exact_steps} "
                                                                 "(use --full)"})
                continue
            if mode == "unrolled" and device.type == "cpu":
                done = [r for r in results if r["mode"] == "unrolled" and "error" not in r]
                avail = mem_available()
                if done and avail:
                    est = done[-1]["rss_delta_bytes"] * n / done[-1]["steps"]
                    if est > 0.6 * avail:
                        skipped.append({"mode": mode, "steps": n, "why": f"estimated {_common.fmt_bytes(est)} > 60% "
                                                                         f"of available {_common.fmt_bytes(avail)}"})
                        continue
            r = run_child({**base, "mode": mode, "steps": n})
            results.append(r)
            if "error" in r:
                print(f"  {mode:8s} N={n:3d}: FAILED {r['error']}", flush=True)
            else:
                mem = (_common.fmt_bytes(r["cuda_peak_bytes"]) if device.type == "cuda"
                       else f"rss peak {_common.fmt_bytes(r['rss_peak_bytes'])} "
                            f"(+{_common.fmt_bytes(r['rss_delta_bytes'])})")
                print(f"  {mode:8s} N={n:3d}: {r['seconds']:7.1f} s ({r['seconds_per_step']:.2f} s/step), {mem}",
                      flush=True)

    ok = [r for r in results if "error" not in r]
    plain = {r["steps"]: r for r in ok if r["mode"] == "plain"}
    rows = []
    for r in ok:
        p = plain.get(r["steps"])
        ratio = r["seconds"] / p["seconds"] if p else None
        r["time_ratio_vs_plain"] = ratio
        rows.append([r["mode"], r["steps"], f"{r['seconds']:.1f}", f"{r['seconds_per_step']:.2f}",
                     f"{ratio:.2f}" if ratio else "-",
                     _common.fmt_bytes(r["rss_baseline_bytes"]), _common.fmt_bytes(r["rss_peak_bytes"]),
                     _common.fmt_bytes(r["rss_delta_bytes"]),
                     _common.fmt_bytes(r["cuda_peak_bytes"]) if device.type == "cuda" else "-"])
    _common.print_table(
        ["mode", "N", "s/iter", "s/step", "time / plain", "rss before", "rss peak", "peak - before", "cuda peak"],
        rows, title=f"One matching iteration on {device}: {args.ipc * args.classes} images 3x32x32, ConvNet-3 "
                    f"width {args.width}, batch_syn = all, DSA {'off' if args.no_augment else 'on'}, "
                    f"micro-batch {base.get('micro') or 'none (whole batches)'}")
    for s in skipped:
        print(f"  skipped {s['mode']} N={s['steps']}: {s['why']}")

    summary: dict[str, Any] = {}
    const = {r["steps"]: r for r in ok if r["mode"] == "constant"}
    if const:
        ratios = {n: const[n]["time_ratio_vs_plain"] for n in const if const[n].get("time_ratio_vs_plain")}
        summary["constant_time_over_plain"] = ratios
        lo, hi = min(const), max(const)
        if hi > lo:
            mem_key = "cuda_peak_bytes" if device.type == "cuda" else "rss_peak_bytes"
            summary["constant_memory_ratio"] = {
                "steps": [lo, hi],
                "peak_ratio": const[hi][mem_key] / const[lo][mem_key],
            }
            if device.type == "cpu":
                summary["constant_memory_ratio"]["delta_ratio"] = (const[hi]["rss_delta_bytes"]
                                                                   / max(1, const[lo]["rss_delta_bytes"]))
        auto = {r["steps"]: r["time_ratio_vs_plain"] for r in ok
                if r["mode"] == "constant-autograd" and r.get("time_ratio_vs_plain")}
        if auto:
            summary["constant_autograd_time_over_plain"] = auto
        print("\nGoals (measured, not asserted):")
        for n, q in ratios.items():
            extra = f"; with autograd's double backward {auto[n]:.2f}" if n in auto else ""
            print(f"  constant / plain time at N={n}: {q:.2f}  (goal <= 3.5){extra}")
        if "constant_memory_ratio" in summary:
            m = summary["constant_memory_ratio"]
            extra = f", peak-minus-baseline ratio {m['delta_ratio']:.2f}" if "delta_ratio" in m else ""
            print(f"  constant memory N={hi} / N={lo}: peak ratio {m['peak_ratio']:.3f}{extra}  (goal <= 1.10)")

    ops: list[dict[str, Any]] = []
    if not args.no_ops:
        ops = per_op_table(args, device)
        none = next(o for o in ops if o["op"] == "none")
        _common.print_table(
            ["DSA op", "apply ms", "plain grad step s", "vs no aug", "2nd-order step s", "vs no aug",
             "output channels_last"],
            [[o["op"], f"{o['apply_s'] * 1e3:.1f}", f"{o['first_s']:.3f}", f"{o['first_s'] / none['first_s']:.2f}x",
              f"{o['second_s']:.3f}", f"{o['second_s'] / none['second_s']:.2f}x",
              "yes" if o["output_channels_last"] else "no"] for o in ops],
            title=f"Per inner step of match, by DSA op (min of {args.op_reps}; first = pass 1, "
                  "2nd-order = pass 2 / reverse step)")

    path = _common.write_json("distill", {"machine": info, "args": vars(args), "results": results,
                                          "skipped": skipped, "summary": summary, "per_op": ops}, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
