"""Time per distillation iteration of each lever setting (issue 22: accuracy per hour, not per iteration).

For each setting it builds the run `mctool distill` would (preset <- buffer <- the setting's
options), then times `--iterations` iterations (the match and the update, as the loop does)
in this process: CPU seconds of this process (robust on a shared machine with
OMP_NUM_THREADS=1: the work, not the wait for a core) and wall seconds. The first iteration
includes one-time costs (both are listed).

    OMP_NUM_THREADS=1 python bench/lever_speed.py BUFFER --preset fashion-mnist-ipc50 \\
        --setting batch_syn=0 --setting batch_syn=250 --setting batch_syn=100 [--iterations 2] [--data-dir D]
    OMP_NUM_THREADS=1 python bench/lever_speed.py BUFFER --preset P --lever ema --lever window

A setting is `key=value,key=value` in DistillConfig keys (the options' names with '_'), or a
named lever from LEVERS (the hook where a new lever adds its row). Results: a table, and JSON
with --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mctool import store  # noqa: E402
from mctool.distill import Distiller, ExpertSource, initial_state, resolve_config  # noqa: E402
from mctool.data.prepared import prepare_like  # noqa: E402
from mctool.training.labels import expert_predictor  # noqa: E402

# Named lever settings (DistillConfig overrides); a new lever adds one line.
LEVERS: dict[str, dict[str, Any]] = {
    "mct": {},
    "window": {"min_start_epoch": 0.0, "start_upper_init": 1.0, "start_upper_iterations": 1000},
    "ema": {"ema": 0.999},
    "batch-syn-100": {"batch_syn": 100},
    "batch-syn-250": {"batch_syn": 250},
    "labels": {"learn_labels": True},
    "all": {"min_start_epoch": 0.0, "start_upper_init": 1.0, "start_upper_iterations": 1000, "ema": 0.999,
            "learn_labels": True},
}


def parse_setting(text: str) -> dict[str, Any]:
    """`key=value,...` (values parsed as JSON where they parse, else kept as text)."""
    out: dict[str, Any] = {}
    for part in filter(None, text.split(",")):
        key, sep, value = part.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected key=value, got {part!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value.strip()
    return out


def time_setting(buf: store.Buffer, prepared: Any, preset: str | None, overrides: dict[str, Any],
                 iterations: int) -> dict[str, Any]:
    """CPU and wall seconds of each of `iterations` iterations of this setting."""
    cfg = resolve_config(preset, overrides, buf)
    expert = expert_predictor(buf, cfg.method, prepared.train_x.device) if cfg.learn_labels else None  # as distill
    state = initial_state(cfg, prepared, torch.Generator().manual_seed(cfg.seed), expert=expert)
    state.queues = [[]]
    d = Distiller(cfg, buf.spec, ExpertSource(buf, cfg.method, prepared.train_x.device), prepared, state,
                  torch.Generator().manual_seed(cfg.seed + 1))
    cpu, wall = [], []
    for _ in range(iterations):
        c, w = time.process_time(), time.perf_counter()
        result = d.step()
        if result is not None:
            d.apply_update(result.grads)
        d.state.iteration += 1
        cpu.append(round(time.process_time() - c, 2))
        wall.append(round(time.perf_counter() - w, 2))
    n = cfg.ipc * buf.data.num_classes
    return {"setting": overrides, "ipc": cfg.ipc, "images": n, "batch": cfg.batch_syn or n, "syn_steps": cfg.syn_steps,
            "cpu_s": cpu, "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("buffer", type=Path)
    ap.add_argument("--preset", default=None)
    ap.add_argument("--setting", type=parse_setting, action="append", default=[], metavar="KEY=VALUE,...")
    ap.add_argument("--lever", action="append", default=[], choices=sorted(LEVERS))
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    settings = [*args.setting, *(LEVERS[name] for name in args.lever)] or [{}]
    rows = []
    with store.open_buffer(args.buffer) as buf:
        prepared = prepare_like(buf.data, args.data_dir, torch.device("cpu"))
        for overrides in settings:
            rows.append(time_setting(buf, prepared, args.preset, overrides, args.iterations))
            r = rows[-1]
            print(f"{json.dumps(r['setting']):40s} batch {r['batch']:4d}/{r['images']}  cpu s/it {r['cpu_s']}  "
                  f"wall s/it {r['wall_s']}", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"argv": sys.argv, "torch_threads": torch.get_num_threads(), "rows": rows},
                                       indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
