"""Borrowed settings vs the buffer's defaults vs `--tune` vs random real, on one buffer.

    python bench/tune.py --buffer BUFFER --ipc 10 --iterations 200 [--borrow fashion-mnist-ipc10]
                         [--tune-minutes 20] [--runs 5] [--epochs 300] [--only borrowed,defaults,tuned]

Runs the real commands (`python -m mctool distill …`, `… evaluate … --baseline random`) in
subprocesses, in this order: the borrowed preset's values given as options (a new user's
first attempt on a dataset no preset is for), no preset at all (the buffer's defaults,
mctool/distill/autoconfig.py), `--tune` (search, then distil with the winner). Every synthetic set is
distilled for the same --iterations and evaluated with the same protocol (--runs networks ×
--epochs, lr = the set's learned step size) against random real images of the same ipc
(`--baseline random`: same seeds, same lr). Prints a table; writes JSON to
bench/results/tune-<name>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO))  # this tree's mctool, not an installed one
from _common import RESULTS_DIR, machine_info  # noqa: E402

KEYS = ("syn_steps", "expert_epochs", "max_start_epoch", "lr_img", "lr_lr", "lr_init")


def mctool(*args: str) -> dict:
    """Run one mctool command with --json; its document (stderr goes to ours)."""
    cmd = [sys.executable, "-m", "mctool", *map(str, args), "--json"]
    print("$", " ".join(cmd[2:]), file=sys.stderr, flush=True)
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ}, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}")
    return json.loads(done.stdout)


def main() -> None:
    """Distil and evaluate each variant; print and save the comparison."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--buffer", type=Path, required=True)
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--borrow", default="fashion-mnist-ipc10", help="preset whose values are borrowed as options")
    p.add_argument("--tune-minutes", type=float, default=20.0)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default="borrowed,defaults,tuned")
    p.add_argument("--workdir", type=Path, default=None, help="where synsets go (default: beside the buffer)")
    p.add_argument("--name", default=None, help="result name (default: the buffer's folder name)")
    a = p.parse_args()
    from mctool.distill import load_preset

    work = a.workdir or a.buffer.parent
    name = a.name or a.buffer.resolve().parent.name
    common = ["--buffer", a.buffer, "--ipc", a.ipc, "--iterations", a.iterations, "--seed", a.seed]
    borrowed = load_preset(a.borrow).values
    variants = {
        "borrowed": [f"--{k.replace('_', '-')}={borrowed[k]}" for k in KEYS],
        "defaults": [],
        "tuned": ["--tune", "--tune-minutes", a.tune_minutes, "--tune-out", work / f"tuned-{name}-ipc{a.ipc}.toml"],
    }
    import torch

    info = machine_info(torch.device("cpu"))
    rows = []
    for variant in a.only.split(","):
        out = work / f"bench-{variant}-ipc{a.ipc}.h5"
        out.unlink(missing_ok=True)
        t = time.perf_counter()
        doc = mctool("distill", *common, "-o", out, "--name", variant, *variants[variant])
        seconds = time.perf_counter() - t
        dres = doc["distill"] if variant == "tuned" else doc
        ev = mctool("evaluate", out, "--name", variant, "--baseline", "random", "--runs", a.runs,
                    "--epochs", a.epochs, "--seed", a.seed)
        # The images the run returns: its best ones when it kept them (runs without a preset and
        # --tune's final run select on validation, the starting images included), else the final.
        target = "best" if any(r.get("target") == "best" for r in ev["results"]) else "final"
        syn = next(r for r in ev["results"] if r["kind"] == "synset" and r.get("target", "final") == target)
        score = next(x for x in ev["scores"] if x["target"] == target)
        real = next(r for r in ev["results"] if r["kind"] == "random-real")
        row = {"variant": variant, "settings": {k: dres["config"][k] for k in KEYS},
               "synset": [syn["mean"], syn["std"]], "random_real": [real["mean"], real["std"]],
               "gain": score["gain"], "images": target, "runs": a.runs, "epochs": a.epochs, "lr": syn["lr"],
               "seconds_distill": seconds, "accuracies": syn["accuracies"], "random_accuracies": real["accuracies"]}
        if variant == "tuned":
            row["tune"] = {k: doc["tune"][k] for k in ("iterations", "horizons", "plan", "val_images", "skipped",
                                                       "notes", "seconds", "random_real", "probe")}
            row["tune"]["candidates"] = doc["tune"]["candidates"]
        rows.append(row)
        print(f"{variant:9s} {100 * syn['mean']:.2f} ± {100 * syn['std']:.2f}  random real "
              f"{100 * real['mean']:.2f} ± {100 * real['std']:.2f}  ({seconds:.0f} s)  {row['settings']}", flush=True)
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"tune-{name}-ipc{a.ipc}-{a.only.replace(',', '-')}.json"
    path.write_text(json.dumps({"machine": info, "args": {k: str(v) for k, v in vars(a).items()}, "rows": rows},
                               indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
