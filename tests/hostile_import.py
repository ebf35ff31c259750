"""Hostile and unlucky inputs for `mctool import` and the `folder:` dataset reader (issue 24 items
8, 9, 13-17, 19), each built from nothing and run as the issue wrote it: the CLI in a child
process, with a time limit (a hang is a failure, not a stuck test run) and its peak memory read.

Each Case says what a clean end is: a refusal (exit 2, one `mctool: error:` line, the output never
created) or a success (exit 0, and the output checked). Used by tests/test_import_hostile.py and
bench/faults.py --hostile, which tallies tried / clean / problems.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tests import torchzip as tz
from tests.interop_fixtures import (
    flat, make_experts, tiny_spec, write_ablation_pair, write_authors_pair, write_replay_buffer,
)

REPO = Path(__file__).resolve().parent.parent
K = 3


@dataclass
class Case:
    """One hostile input: `build(root, data_dir)` makes it and returns (argv, output path)."""

    name: str
    item: int
    build: Callable[[Path, Path], tuple[list[str], Path]]
    refused: bool = True  # else: it must succeed
    says: str = ""  # a refusal's line must hold this
    max_rss_mb: int | None = None  # peak resident memory the command may reach
    check: Callable[[Path, Path], None] | None = None  # a success: (root, output) -> assert
    timeout: float = 120.0


@dataclass
class Outcome:
    """What one case did."""

    name: str
    clean: bool
    why: str = ""
    seconds: float = 0.0
    max_rss_mb: float = 0.0
    lines: list[str] = field(default_factory=list)


def _import(folder: Path, out: Path, data_dir: Path, *extra: str) -> list[str]:
    return ["import", str(folder), "-o", str(out), "--dataset", "mnist", "--no-zca", "--data-dir", str(data_dir),
            "--accuracy", "none", "--quiet", *extra]


def _experts(n: int = 2, seed: int = 0) -> list:
    return make_experts(tiny_spec(), n, K, seed=seed)


# --------------------------------------------------------------------------- item 8: NaN / Inf


def nan_in_replay(root: Path, data: Path) -> tuple[list[str], Path]:
    experts = _experts(3)
    experts[2][1][4][0, 0, 0, 0] = float("nan")  # the last expert: two rows are written before it
    write_replay_buffer(root / "b", 0, experts)
    return _import(root / "b", root / "o.h5", data), root / "o.h5"


def inf_in_waypoint(root: Path, data: Path) -> tuple[list[str], Path]:
    experts = _experts()
    experts[1][-1][0][0, 0, 0, 0] = float("inf")
    write_authors_pair(root / "b", 0, experts, 2)
    return _import(root / "b", root / "o.h5", data), root / "o.h5"


def nan_step_value(root: Path, data: Path) -> tuple[list[str], Path]:
    write_authors_pair(root / "b", 0, _experts(), 2)
    steps = torch.load(root / "b" / "step_buffer_0.pt")
    steps[1][2][3] = torch.tensor(float("nan"))
    torch.save(steps, root / "b" / "step_buffer_0.pt")
    return _import(root / "b", root / "o.h5", data), root / "o.h5"


# --------------------------------------------------------------------------- item 9: the authors' variants


def _frozen(experts: list) -> list:
    for e in experts:
        for snap in e[1:]:
            snap[1] = e[0][1].clone()  # conv1's bias never moves (zero gradient before instance norm)
    return experts


def _variant(kind: str) -> Callable[[Path, Path], tuple[list[str], Path]]:
    def build(root: Path, data: Path) -> tuple[list[str], Path]:
        experts = _frozen(make_experts(tiny_spec(), 2, 6, seed=5))
        if kind.startswith("ip"):
            write_authors_pair(root / "b", 0, experts, int(kind[2:]))
        else:
            write_ablation_pair(root / "b", 0, experts, kind)
        return _import(root / "b", root / "o.h5", data), root / "o.h5"

    return build


def _inspect_reads(root: Path, out: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "mctool", "inspect", str(out)], capture_output=True, text=True,
                       timeout=120, env=_env(), cwd=REPO)
    assert r.returncode == 0, r.stderr[-500:]


# --------------------------------------------------------------------------- item 13: pickles that never end


def _self_list() -> list:
    a: list = [torch.zeros(2)]
    a.append(a)
    return a


def _dag(levels: int = 60) -> list:
    node: list = [torch.zeros(2)]
    for _ in range(levels):
        node = [node, node]
    return node


def _pickle_case(make: Callable[[], list], legacy: bool) -> Callable[[Path, Path], tuple[list[str], Path]]:
    def build(root: Path, data: Path) -> tuple[list[str], Path]:
        (root / "b").mkdir()
        torch.save(make(), root / "b" / "replay_buffer_0.pt", _use_new_zipfile_serialization=not legacy)
        return _import(root / "b", root / "o.h5", data), root / "o.h5"

    return build


# --------------------------------------------------------------------------- item 14: a slice of a huge storage


def slice_of_2gib_storage(root: Path, data: Path) -> tuple[list[str], Path]:
    """A 2 GiB storage of zeros, deflated to a few MB; the first tensor of the first snapshot views
    its first elements. Every other tensor is an ordinary one."""
    experts = _experts(1)
    snaps = []
    for k, snap in enumerate(experts[0]):
        leaves = [tz.tensor(t, f"{k}_{i}") for i, t in enumerate(snap)]
        snaps.append(leaves)
    first = experts[0][0][0]
    big = tz.Storage("big", (2 << 30) // 4, deflate=True)
    snaps[0][0] = tz.Tensor(big, tuple(first.shape))
    experts[0][0][0] = torch.zeros_like(first)
    (root / "b").mkdir()
    tz.write(root / "b" / "replay_buffer_0.pt", [snaps])
    torch.save(experts, root / "expected.pt")
    return _import(root / "b", root / "o.h5", data), root / "o.h5"


def _trajectories_equal(root: Path, out: Path) -> None:
    import h5py

    experts = torch.load(root / "expected.pt")
    with h5py.File(out) as f:
        got = torch.from_numpy(f["experts/trajectories"][()])
    for e, expert in enumerate(experts):
        assert torch.equal(got[e], flat(expert)), f"expert {e} differs"


# --------------------------------------------------------------------------- item 15: a huge ConvNet in 5 KB


def _wide(width: int) -> Callable[[Path, Path], tuple[list[str], Path]]:
    def build(root: Path, data: Path) -> tuple[list[str], Path]:
        (root / "b").mkdir()
        tz.write(root / "b" / "replay_buffer_0.pt", tz.stride0_experts(tz.Net(width), experts=1, snapshots=K + 1))
        assert (root / "b" / "replay_buffer_0.pt").stat().st_size < 20_000
        return _import(root / "b", root / "o.h5", data), root / "o.h5"

    return build


# --------------------------------------------------------------------------- item 16: a huge gap


def huge_gap(root: Path, data: Path) -> tuple[list[str], Path]:
    experts = _experts(1)
    write_replay_buffer(root / "b", 0, experts)
    write_replay_buffer(root / "b", 99999999999, experts)
    return _import(root / "b", root / "o.h5", data), root / "o.h5"


def huge_gap_compressed(root: Path, data: Path) -> tuple[list[str], Path]:
    experts = _experts(1)
    write_authors_pair(root / "b", 0, experts, 2)
    write_authors_pair(root / "b", 99999999999, experts, 2)
    return _import(root / "b", root / "o.h5", data), root / "o.h5"


# --------------------------------------------------------------------------- item 17: huge PNGs


def huge_pngs(root: Path, data: Path) -> tuple[list[str], Path]:
    """Six PNGs of 9000x9000 pixels (80 KB each) in a folder: dataset."""
    from PIL import Image

    one = root / "one.png"
    Image.new("L", (9000, 9000), 7).save(one, optimize=False)
    n = 0
    for split, per in (("train", 2), ("test", 1)):
        for cls in ("a", "b"):
            d = root / "pets" / split / cls
            d.mkdir(parents=True)
            for i in range(per):
                os.link(one, d / f"{i}.png")
                n += 1
    assert n == 6
    out = root / "o.h5"
    return ["experts", f"folder:{root / 'pets'}", "--n", "1", "--epochs", "1", "--width", "8", "-o", str(out),
            "--quiet"], out


# --------------------------------------------------------------------------- item 19: slices that do not overlap


def disjoint_slices(root: Path, data: Path) -> tuple[list[str], Path]:
    """Each expert's snapshots are slices of one flat storage (a user's packed save), not aliases."""
    experts = _experts(2, seed=3)
    packed = []
    for expert in experts:
        whole = flat(expert).reshape(-1).clone()
        shapes = [t.shape for t in expert[0]]
        P = sum(t.numel() for t in expert[0])
        snaps = []
        for k in range(K + 1):
            row, a, views = whole[k * P:(k + 1) * P], 0, []
            for s in shapes:
                n = int(torch.Size(s).numel())
                views.append(row[a:a + n].view(s))
                a += n
            snaps.append(views)
        packed.append(snaps)
    (root / "b").mkdir()
    torch.save(packed, root / "b" / "replay_buffer_0.pt")
    torch.save(experts, root / "expected.pt")
    return _import(root / "b", root / "o.h5", data), root / "o.h5"


def overlapping_slices(root: Path, data: Path) -> tuple[list[str], Path]:
    """The scripts on a CPU: every snapshot is the live weights (one storage, same bytes)."""
    experts = _experts(1)
    live = experts[0][-1]
    (root / "b").mkdir()
    torch.save([[live for _ in range(K + 1)]], root / "b" / "replay_buffer_0.pt")
    return _import(root / "b", root / "o.h5", data), root / "o.h5"


CASES: list[Case] = [
    Case("nan-in-replay-buffer", 8, nan_in_replay, says="NaN or infinite"),
    Case("inf-in-waypoint", 8, inf_in_waypoint, says="NaN or infinite"),
    Case("nan-step-value", 8, nan_step_value, says="NaN or infinite"),
    *[Case(f"authors-{v}-frozen-layer", 9, _variant(v), refused=False, check=_inspect_reads)
      for v in ("ip2", "ip3", "ip4")],
    *[Case(f"authors-{v}", 9, _variant(v), refused=False, check=_inspect_reads) for v in ("uni", "dec", "proj")],
    Case("zip-self-referencing-list", 13, _pickle_case(_self_list, False), says="contains itself", timeout=60),
    Case("zip-60-level-dag", 13, _pickle_case(_dag, False), says="lists deep", timeout=60),
    Case("legacy-self-referencing-list", 13, _pickle_case(_self_list, True), says="contains itself", timeout=60),
    Case("legacy-60-level-dag", 13, _pickle_case(_dag, True), says="lists deep", timeout=60),
    Case("slice-of-2gib-deflated-storage", 14, slice_of_2gib_storage, refused=False, max_rss_mb=1500,
         check=_trajectories_equal),
    Case("width-6000-stride-0", 15, _wide(6000), says="repeats stored values"),
    Case("width-100000-stride-0", 15, _wide(100000), says="would take"),
    Case("gap-to-99999999999", 16, huge_gap, says="numbers of the series are missing"),
    Case("pair-gap-to-99999999999", 16, huge_gap_compressed, says="numbers of the series are missing"),
    Case("six-9000px-pngs", 17, huge_pngs, says="9000x9000 pixels"),
    Case("disjoint-slices-of-one-storage", 19, disjoint_slices, refused=False, check=_trajectories_equal),
    Case("snapshots-alias-the-live-weights", 19, overlapping_slices, says="alias the live weights"),
]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "NO_COLOR": "1", "COLUMNS": "200"}


# The child's peak memory, measured by a small launcher between the caller and mctool: a process's
# ru_maxrss includes the memory of the process it was forked from (the copied or shared address
# space counts until exec), so measured straight from a long test session the case would be
# charged the session's own ~1 GB. The launcher (python -S, a few MB) forks, execs mctool, writes
# the child's own ru_maxrss (KiB) to argv[1] and ends as the child ended (its code or its signal).
_LAUNCHER = """
import os, signal, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.executable, [sys.executable, "-m", "mctool", *sys.argv[2:]])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as fh:
    fh.write(str(usage.ru_maxrss))
if os.WIFSIGNALED(status):
    signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
    os.kill(os.getpid(), os.WTERMSIG(status))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_case(case: Case, root: Path, data_dir: Path) -> Outcome:
    """Build the case under `root`, run it as a child process, judge how it ended."""
    root.mkdir(parents=True, exist_ok=True)
    argv, out = case.build(root, data_dir)
    started = time.perf_counter()
    with open(root / "stdout.txt", "w") as so, open(root / "stderr.txt", "w") as se:
        proc = subprocess.Popen([sys.executable, "-S", "-c", _LAUNCHER, str(root / "maxrss.txt"), *argv], stdout=so,
                                stderr=se, text=True, env=_env(), cwd=root, start_new_session=True)
    while True:
        pid, status, _ = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() - started > case.timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            os.wait4(proc.pid, 0)
            proc.returncode = -9
            return Outcome(case.name, False, f"still running after {case.timeout:.0f} s (hang)",
                           time.perf_counter() - started)
        time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    stderr = (root / "stderr.txt").read_text()
    peak = root / "maxrss.txt"
    rss = int(peak.read_text()) / 1024 if peak.exists() else 0.0  # KiB on Linux
    lines = stderr.strip().splitlines()
    outcome = Outcome(case.name, False, "", seconds, rss, lines)
    if "internal error" in stderr or "Traceback" in stderr:
        outcome.why = f"exit {proc.returncode}: {lines[-1] if lines else ''}"
        return outcome
    if case.refused:
        if proc.returncode != 2 or len(lines) != 1 or not lines[0].startswith("mctool: error: "):
            outcome.why = f"exit {proc.returncode}, {len(lines)} stderr line(s): {' | '.join(lines)[:300]}"
        elif case.says not in lines[0]:
            outcome.why = f"the line does not say {case.says!r}: {lines[0]}"
        elif out.exists():
            outcome.why = f"{out.name} was left behind"
        else:
            outcome.clean = True
        return outcome
    if proc.returncode != 0:
        outcome.why = f"exit {proc.returncode}: {' | '.join(lines)[:300]}"
        return outcome
    if case.max_rss_mb is not None and outcome.max_rss_mb > case.max_rss_mb:
        outcome.why = f"peak memory {outcome.max_rss_mb:.0f} MB > {case.max_rss_mb} MB"
        return outcome
    try:
        if case.check is not None:
            case.check(root, out)
    except AssertionError as exc:
        outcome.why = f"wrong output: {exc}"
        return outcome
    outcome.clean = True
    return outcome


def tally(outcomes: list[Outcome]) -> dict[str, int]:
    """tried / clean / problems."""
    clean = sum(o.clean for o in outcomes)
    return {"tried": len(outcomes), "clean": clean, "problems": len(outcomes) - clean}
