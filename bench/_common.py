"""Shared helpers of the bench/ scripts: options, machine info, timing, tables, JSON output.

Not part of the library. Each script in bench/ imports this module by path (the script's own
directory is first on sys.path when it is run as `python bench/NAME.py`).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """--device, --quick, --threads, --out: the options every script has."""
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    parser.add_argument("--quick", action="store_true", help="small sizes, about 30 s to a few minutes")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's own choice)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON output path (default: bench/results/<name>.json)")
    parser.add_argument("--system-malloc", action="store_true",
                        help="keep glibc's default malloc (the CLI tunes it: mctool/core/allocator.py)")


def setup(args: argparse.Namespace) -> torch.device:
    """Apply --threads and --system-malloc, resolve --device (same rules as the CLI's)."""
    from mctool.core.allocator import tune_malloc
    from mctool.core.device import resolve_device
    from mctool.core.errors import UsageError

    if not args.system_malloc:
        tune_malloc()  # as the CLI does, so the numbers are the ones users get
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return resolve_device(args.device)
    except UsageError as exc:
        raise SystemExit(f"error: {exc}") from None


def loadavg() -> list[float] | None:
    """1/5/15-minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def contention_probe() -> dict[str, float]:
    """Median and min time (µs) of a small multi-threaded CPU op (256×256 matmul + log_softmax).

    On an idle machine this is tens of µs; when other processes hold the cores, torch's
    OpenMP threads wait for each other and it grows by orders of magnitude. Recorded at the
    start and end of every run so a reader can tell a slow machine from a busy one.
    """
    a = torch.randn(256, 256)
    ts = []
    for _ in range(60):
        t0 = time.perf_counter()
        torch.log_softmax(a @ a, dim=1)
        ts.append((time.perf_counter() - t0) * 1e6)
    return {"median_us": round(statistics.median(ts), 1), "min_us": round(min(ts), 1)}


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on; goes into every JSON file."""
    from mctool.core.allocator import malloc_tuned

    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "device": str(device),
        "cpu_count": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
        "malloc_tuned": malloc_tuned(),
        "loadavg_at_start": loadavg(),
        "contention_probe_at_start": contention_probe(),
        "argv": sys.argv,
    }
    try:
        import mctool

        info["mctool"] = mctool.__version__
    except Exception:  # pragma: no cover - the bench still runs against an odd install
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["cuda_device"] = props.name
        info["cuda_memory_bytes"] = props.total_memory
        info["cuda_version"] = torch.version.cuda
    return info


def sync(device: torch.device) -> None:
    """Wait for queued kernels, so wall-clock times cover the work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """(seconds, result) of one call, synchronised on CUDA before and after."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def repeat(fn: Callable[[], Any], device: torch.device, reps: int) -> dict[str, float]:
    """min/median/max seconds over `reps` calls. On a shared CPU the min is the least disturbed."""
    ts = [timed(fn, device)[0] for _ in range(max(1, reps))]
    return {"min": min(ts), "median": statistics.median(ts), "max": max(ts), "reps": len(ts)}


def reset_peak(device: torch.device) -> None:
    """Start a fresh CUDA peak-memory window (CPU peak comes from ru_maxrss, see rss_peak_bytes)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def cuda_peak_bytes(device: torch.device) -> int | None:
    """torch.cuda.max_memory_allocated since the last reset_peak (None on CPU)."""
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def rss_peak_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss; KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def anon_rss_bytes() -> int | None:
    """Anonymous resident memory now (resident minus file-backed pages; Linux /proc/self/statm), else None."""
    try:
        fields = Path("/proc/self/statm").read_text().split()
        return (int(fields[1]) - int(fields[2])) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class AnonPeak:
    """Peak of anon_rss_bytes while the block runs, sampled every millisecond by a thread.

    Unlike ru_maxrss it ignores library pages, which the kernel drops and faults back in under
    memory pressure, and unlike a ru_maxrss difference it sees memory the heap already held.
    """

    def __init__(self, interval: float = 0.001) -> None:
        import threading

        self.interval = interval
        self.base = self.peak = anon_rss_bytes() or 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, anon_rss_bytes() or 0)
            time.sleep(self.interval)

    def __enter__(self) -> "AnonPeak":
        self.base = self.peak = anon_rss_bytes() or 0
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, anon_rss_bytes() or 0)

    @property
    def delta(self) -> int:
        return self.peak - self.base


def fmt_bytes(n: float | None) -> str:
    """Human-readable byte count (binary units)."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> None:
    """A plain fixed-width table on stdout (no Rich: output must survive pipes and logs)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    if title:
        print(f"\n{title}")
    line = "  ".join("-" * w for w in widths)
    print("  ".join(h.rjust(w) for h, w in zip(cells[0], widths)))
    print(line)
    for r in cells[1:]:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    sys.stdout.flush()


def write_json(name: str, payload: dict[str, Any], out: Path | None = None) -> Path:
    """Write bench/results/<name>.json (or `out`); returns the path."""
    path = out or RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(payload)
    machine = payload.setdefault("machine", {})
    machine["loadavg_at_end"] = loadavg()
    machine["contention_probe_at_end"] = contention_probe()
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def note_load(info: dict[str, Any]) -> None:
    """Print the load average so readers of the table know how shared the CPU was."""
    la = info.get("loadavg_at_start")
    probe = info.get("contention_probe_at_start", {})
    print(f"device {info['device']}, torch {info['torch']}, {info['cpu_count']} CPUs, "
          f"{info['torch_num_threads']} torch threads, load average at start {la}, "
          f"contention probe {probe.get('median_us')} µs (idle: well under 1000)")
    # The load average lags (it still counts finished processes), so the probe decides.
    busy = probe.get("median_us", 0) > 1000
    if busy and info["device"] == "cpu":
        print("note: the CPU is shared with other processes; timings are noisy and can be many times slower "
              "(try --threads 1 on a busy machine)")
