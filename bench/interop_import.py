"""Peak memory of `mctool import` on a folder of replay buffers larger than the memory it uses.

Writes a folder of MTT-layout replay_buffer_{n}.pt files (random-walk experts of the default
ConvNet — width 128, depth 3 — on Fashion-MNIST's 1×28×28 images: P = 317,706, K = 50, ~65 MB per
expert) of at least --gb gigabytes, then imports it in a child process under `/usr/bin/time -f %M`
(peak resident set size). Two controls, also child processes: the same import of a folder with
ONE expert (what the program and the dataset cost by themselves), and `torch.load(weights_only=True)`
of one of the files (what the scripts' readers need per file). Everything written is deleted
afterwards unless --keep. Fashion-MNIST must be on the machine (it is found automatically).

    /work/venv/bin/python bench/interop_import.py [--gb 2.5] [--experts-per-file 8] [--dir /tmp] [--keep]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mctool.models import ModelSpec, build_model  # noqa: E402

SPEC = ModelSpec(depth=3, width=128, channels=1, num_classes=10, im_size=(28, 28))
K = 50

CHILD_IMPORT = """
import sys, json, torch
from pathlib import Path
from mctool.interop.importer import ImportConfig, resolve_source, plan_replay, import_replay
from mctool.data.prepared import prepare
folder, out = Path(sys.argv[1]), Path(sys.argv[2])
cfg = ImportConfig(dataset="fashion-mnist", zca=False, accuracy="none")
source = resolve_source(folder, cfg)
prepared = prepare(source.dataset, None, False, 0.1, torch.device("cpu"))
plan = plan_replay(folder, cfg, source, prepared.meta)
result = import_replay(plan, out, cfg, prepared)
print(json.dumps({k: result[k] for k in ("experts", "bytes_read", "seconds", "source_bytes")}))
"""

CHILD_TORCH_LOAD = """
import sys, torch
obj = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
print(len(obj))
"""


def write_folder(folder: Path, files: int, per_file: int, seed: int = 0) -> int:
    """Random-walk experts in the scripts' layout; returns the bytes written."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    total = 0
    for n in range(files):
        experts = []
        for i in range(per_file):
            params = [p.detach().clone() for p in build_model(SPEC, seed=n * 1000 + i).parameters()]
            snaps = [[p.clone() for p in params]]
            for _ in range(K):
                params = [p + 0.001 * torch.randn(p.shape, generator=gen) for p in params]
                snaps.append([p.clone() for p in params])
            experts.append(snaps)
        path = folder / f"replay_buffer_{n}.pt"
        torch.save(experts, path)
        total += path.stat().st_size
        del experts
    return total


def measured(args: list[str]) -> tuple[int, float, str]:
    """(peak RSS bytes, seconds, stdout) of a child process under /usr/bin/time -f %M."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "MAXRSS_KB %M", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, check=False)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    kb = int(next(line for line in proc.stderr.splitlines() if line.startswith("MAXRSS_KB")).split()[1])
    return kb * 1024, seconds, proc.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=2.5, help="size of the folder to import, in 1e9 bytes")
    parser.add_argument("--experts-per-file", type=int, default=8, help="experts per replay_buffer file")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="where to write (deleted)")
    parser.add_argument("--keep", action="store_true", help="keep the generated folder and buffers")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "interop_import.json")
    args = parser.parse_args()
    torch.set_num_threads(1)

    P = sum(p.numel() for p in build_model(SPEC).parameters())
    expert_bytes = (K + 1) * P * 4
    files = max(1, math.ceil(args.gb * 1e9 / (expert_bytes * args.experts_per_file)))
    work = Path(tempfile.mkdtemp(prefix="mctool-interop-bench-", dir=args.dir))
    try:
        big, small = work / "big", work / "small"
        t0 = time.perf_counter()
        size = write_folder(big, files, args.experts_per_file)
        write_folder(small, 1, 1, seed=1)
        gen_s = time.perf_counter() - t0
        rows = {}
        for name, cmd in (
            ("import 1 expert (program + dataset)", [sys.executable, "-c", CHILD_IMPORT, str(small), str(work / "s.h5")]),
            (f"import {files} files x {args.experts_per_file} experts",
             [sys.executable, "-c", CHILD_IMPORT, str(big), str(work / "b.h5")]),
            ("torch.load(weights_only=True) of 1 file", [sys.executable, "-c", CHILD_TORCH_LOAD,
                                                         str(big / "replay_buffer_0.pt")]),
        ):
            rss, seconds, out = measured(cmd)
            rows[name] = {"peak_rss_bytes": rss, "seconds": round(seconds, 1), "stdout": out}
        report = {
            "folder_bytes": size, "files": files, "experts_per_file": args.experts_per_file, "K": K, "P": P,
            "bytes_per_expert": expert_bytes, "file_bytes": size // files, "generate_seconds": round(gen_s, 1),
            "output_bytes": (work / "b.h5").stat().st_size, "runs": rows,
            "machine": {"cpus": os.cpu_count(), "loadavg": os.getloadavg(), "torch": torch.__version__,
                        "note": "shared machine: timings are contended; RSS is not"},
        }
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"folder: {files} files, {size / 1e9:.2f} GB ({size / 2**30:.2f} GiB), {expert_bytes / 1e6:.1f} MB per expert")
    for name, r in rows.items():
        print(f"  {name:45s} peak RSS {r['peak_rss_bytes'] / 2**20:8.0f} MiB   {r['seconds']:7.1f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}" + ("" if args.keep else f"; deleted {work}"))


if __name__ == "__main__":
    main()
