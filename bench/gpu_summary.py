"""Collect bench/gpu.sh's step statuses and bench JSON files into gpu.json and summary.md.

    python bench/gpu_summary.py --work DIR --out DIR --mode gpu|smoke --commit C --budget S --seconds S

Reads DIR/steps.jsonl (one line per step: step, status, seconds, why) and DIR/<step>.json (the
JSON each bench script wrote); writes OUT/gpu.json (all of it) and OUT/summary.md (markdown
tables, ready for bench/README.md's GPU section). Exits 1 when a step failed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path
from typing import Any


def fmt_bytes(n: float | None) -> str:
    """Human-readable byte count, '-' for none (as _common.fmt_bytes, which imports torch: this
    summary must run, and report, even where torch is broken)."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def experts_rows(d: dict[str, Any]) -> str:
    rows = [[r["data"], r["width"], "DSA" if r["augment"] else "none", f"{r['images']:,}",
             f"{r['images_per_s_best']:,.0f}", f"{r['images_per_s_median']:,.0f}", fmt_bytes(r["cuda_peak_bytes"])]
            for r in d["results"]]
    return table(["data", "width", "augment", "images", "images/s (best)", "median", "cuda peak"], rows)


def distill_rows(d: dict[str, Any]) -> str:
    rows = []
    for r in d["results"]:
        if "error" in r:
            rows.append([r["mode"], r["steps"], "FAILED", "", "", r["error"][:80]])
            continue
        ratio = r.get("time_ratio_vs_plain")
        rows.append([r["mode"], r["steps"], f"{r['seconds']:.3f}", f"{r['seconds_per_step'] * 1e3:.1f}",
                     f"{ratio:.2f}" if ratio else "-", fmt_bytes(r.get("cuda_peak_bytes") or r.get("rss_peak_bytes"))])
    text = table(["mode", "N", "s/iteration", "ms/step", "time / plain", "peak memory"], rows)
    skipped = d.get("skipped") or []
    if skipped:
        text += "\n\nSkipped: " + "; ".join(f"{s['mode']} N={s['steps']} ({s['why']})" for s in skipped)
    return text


def evaluate_rows(d: dict[str, Any]) -> str:
    rows = [[r["ipc"], r["images"], r["epochs_trained"], f"{r['seconds_per_epoch'] * 1e3:.1f}",
             f"{r['test_pass_seconds']:.2f}", f"{r['extrapolated_run_seconds'] / 60:.2f}",
             f"{r['extrapolated_protocol_seconds'] / 60:.2f}", fmt_bytes(r["cuda_peak_bytes"])]
            for r in d["results"]]
    target = d["args"]["target_epochs"]
    return table(["ipc", "images", "epochs timed", "ms/epoch", "test pass s", f"1 run @{target} ep, min (extrapolated)",
                  f"{d['args']['protocol_runs']} runs, min", "cuda peak"], rows)


def together_rows(d: dict[str, Any]) -> str:
    rows = [[r["data"], r["width"], r["ipc"], r["images"], r["epochs_trained"], "+".join(map(str, r["groups"])),
             f"{min(r['seconds_sequential']) / r['epochs_trained'] * 1e3:.1f}",
             f"{min(r['seconds_together']) / r['epochs_trained'] * 1e3:.1f}", f"**{r['speedup']:.2f}×**",
             "yes" if r["accuracies_sequential"] == r["accuracies_together"] else "no",
             fmt_bytes(r["cuda_peak_bytes_last_together"])]
            for r in d["results"]]
    runs = d["args"]["together"]
    return table(["data", "width", "ipc", "images", "epochs timed", "groups", f"{runs} one after another, ms/epoch",
                  f"{runs} together, ms/epoch", "speed-up", "same accuracies", "cuda peak (together)"], rows)


def parallel_rows(d: dict[str, Any]) -> str:
    rows = [[r["data"], r["width"], r["experts"], f"{r['images']:,}", f"{r['images_per_s_sequential']:,.0f}",
             f"{r['images_per_s_together']:,.0f}", f"**{r['speedup']:.2f}×**",
             fmt_bytes(r["cuda_peak_bytes_last_together"])] for r in d["results"]]
    return table(["data", "width", "experts", "images", "one after another, images/s", "together, images/s",
                  "speed-up", "cuda peak (together)"], rows)


def large_rows(d: dict[str, Any]) -> str:
    rows = [[r["shape"], r["kind"], r["n"], r["micro"] or "whole",
             "skipped" if "skipped" in r else f"{r['seconds']:.2f}",
             "-" if "skipped" in r else fmt_bytes(r["measured_bytes"]), fmt_bytes(r["estimated_bytes"])]
            for r in d["rows"] if "error" not in r]
    text = table(["shape", "row", "images", "micro-batch", "s/iter", "measured peak", "estimated"], rows)
    if d.get("overhead"):
        text += "\n\n" + table(["shape", "images", "micro-batch", "median chunked/whole time"],
                                [[o["shape"], o["n"], o["micro"], f"**{o['median_ratio']:.3f}**"] for o in d["overhead"]])
    return text


SECTIONS = [
    ("experts", "Expert training (CIFAR-10 shape, batch 256)", experts_rows),
    ("distill-cifar10-ipc10", "One distillation iteration, CIFAR-10 ipc 10 (constant vs constant-autograd: "
                              "the second-order step through fastgrad vs autograd's double backward)", distill_rows),
    ("distill-cifar100-ipc50", "One distillation iteration, CIFAR-100 ipc 50 (batch_syn = all 5,000 images)",
     distill_rows),
    ("distill-large", "Micro-batched iterations: Tiny ImageNet ipc 10 and CIFAR-100 ipc 50 (--micro-batch auto vs "
                      "whole steps; peak memory; chunking overhead)", large_rows),
    ("evaluate", "One evaluation run per ipc (ConvNet-3, CIFAR-10 shape)", evaluate_rows),
    ("evaluate-together", "Evaluation: runs together vs one after another", together_rows),
    ("experts-parallel", "Experts together vs one after another", parallel_rows),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--mode", default="gpu")
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--budget", type=int, default=0)
    parser.add_argument("--seconds", type=int, default=0)
    args = parser.parse_args(argv)

    steps = [json.loads(line) for line in (args.work / "steps.jsonl").read_text().splitlines() if line.strip()]
    bench: dict[str, Any] = {}
    for s in steps:
        path = args.work / f"{s['step']}.json"
        if path.exists():
            bench[s["step"]] = json.loads(path.read_text())
    machine = next((d["machine"] for d in bench.values() if "machine" in d), {})
    device = machine.get("cuda_device") or machine.get("device") or "unknown"
    date = dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()
    summary = {"mode": args.mode, "commit": args.commit, "date": date, "device": device,
               "torch": machine.get("torch"), "cuda": machine.get("cuda_version"), "budget_seconds": args.budget,
               "seconds": args.seconds, "steps": steps, "bench": bench}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")

    md = [f"# bench/gpu.sh ({args.mode})", "",
          f"Device **{device}**, torch {machine.get('torch')}, CUDA {machine.get('cuda_version')}, {date}, "
          f"commit {args.commit}; {args.seconds} s of a {args.budget} s budget.", "",
          "## Steps", "",
          table(["step", "status", "seconds", "note"],
                [[s["step"], s["status"], s["seconds"], s["why"]] for s in steps])]
    for key, title, render in SECTIONS:
        if key in bench:
            md += ["", f"## {title}", "", render(bench[key])]
    (args.out / "summary.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    failed = [s["step"] for s in steps if s["status"] == "failed"]
    if failed:
        print(f"failed steps: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
