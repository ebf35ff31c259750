"""Kill mctool's writers with SIGKILL at random points and check what they leave (issue 14).

Used by tests/test_faults.py (a small sample in CI) and bench/faults.py (≥ 50 kills per writer).

A *zygote* process imports mctool, torch and h5py once and forks one child per run, which runs
the CLI exactly as the console script does; the zygote SIGKILLs the child after a drawn delay.
So the kills land in the commands' work (loading, training, writing), not in Python's imports.
A third of the kills come at a uniform instant of a reference run's duration; the others just
after (0–3 ms) the n-th file write in the target's folder, n drawn over the writes the
reference run made (inotify: every write, create, rename and close), so they land inside the
write phases however much the timing of the shared machine varies.

After every kill the file (if present) must open and validate through the store, and hold the
old content, the new content, or — where the format allows it — a consistent step between
(expert rows done so far, a distillation checkpoint), each bit-identical to the reference; then
the same command run again must finish with the reference result.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------- the zygote (child side)

_IN_MODIFY, _IN_CLOSE_WRITE, _IN_CREATE, _IN_MOVED_TO = 0x2, 0x8, 0x100, 0x80


def _zygote_main() -> None:
    """Serve run requests (one JSON line each on stdin, one JSON answer on stdout)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    import h5py  # noqa: F401  (imported before any fork; never used here, so no HDF5 state)
    import torch

    torch.set_num_threads(1)
    from mctool.cli import main  # noqa: F401
    import mctool.convexify.runner, mctool.distill, mctool.evaluate.evaluation, mctool.experts, mctool.plots  # noqa: E401,F401

    libc = ctypes.CDLL(None, use_errno=True)
    out = sys.stdout
    for line in sys.stdin:
        req = json.loads(line)
        out.write(json.dumps(_serve(req, libc)) + "\n")
        out.flush()


def _events(ino: int, skip: set[str]) -> int:
    """How many file writes (modify, create, rename into, close after writing) inotify reports
    now, apart from the files named in `skip` (the command's own log)."""
    import struct

    n = 0
    while True:
        try:
            buf = os.read(ino, 65536)
        except BlockingIOError:
            return n
        if not buf:
            return n
        at = 0
        while at + 16 <= len(buf):
            _, _, _, size = struct.unpack_from("iIII", buf, at)
            name = buf[at + 16:at + 16 + size].rstrip(b"\0").decode(errors="replace")
            at += 16 + size
            if name not in skip:
                n += 1


def _serve(req: dict[str, Any], libc: Any) -> dict[str, Any]:
    """Fork a child running the CLI; kill it `kill_after` seconds after the fork, or `plus`
    seconds after the `kill_at_event`-th file write in the watched folder."""
    ino = -1
    skip = {Path(req["log"]).name}
    if req.get("watch"):
        ino = libc.inotify_init1(os.O_NONBLOCK)
        libc.inotify_add_watch(ino, req["watch"].encode(), _IN_MODIFY | _IN_CLOSE_WRITE | _IN_CREATE | _IN_MOVED_TO)
    log = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child: the CLI, as the console script runs it
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.chdir(req["cwd"])
        code = 70
        if req.get("trip") is not None:
            _tripwire(int(req["trip"]))
        try:
            from mctool.cli import main

            sys.argv = ["mctool", *req["argv"]]
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: BLE001 - reported through the exit code
            import traceback

            traceback.print_exc()
            code = 71
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            if req.get("trip") is not None and req.get("count_file"):
                Path(req["count_file"]).write_text(str(_TRIP["calls"]))
            os._exit(code)
    os.close(log)
    kill_at = req.get("kill_after")
    kill_event = req.get("kill_at_event")
    events = 0
    killed = False
    status = None
    while status is None:
        now = time.monotonic() - t0
        if kill_at is not None and not killed and now >= kill_at:
            os.kill(pid, signal.SIGKILL)
            killed = True
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            status = st
            break
        wait = 0.001 if kill_at is None or killed else max(0.0, min(0.001, kill_at - now))
        if ino >= 0:
            ready, _, _ = select.select([ino], [], [], wait)
            if ready:
                events += _events(ino, skip)
                if kill_event is not None and kill_at is None and events >= kill_event:
                    kill_at = time.monotonic() - t0 + req.get("plus", 0.0)
        else:
            time.sleep(wait)
    if ino >= 0:
        events += _events(ino, skip)
        os.close(ino)
    seconds = time.monotonic() - t0
    signaled = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    return {"killed": bool(signaled), "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
            "seconds": seconds, "events": events}


# The file-system calls a writer's exact kill points are counted in (each os.* call through
# Python, and the folder swap's renameat2): every write, fsync, rename and removal of a writer
# goes through one of them, while HDF5's and torch's own writes in C do not count.
TRIP_CALLS = ("open", "fsync", "replace", "rename", "unlink", "rmdir", "mkdir", "chmod", "statvfs", "ftruncate")
_TRIP = {"calls": 0, "at": 0}


def _tripwire(at: int) -> None:
    """In the child: count the TRIP_CALLS; SIGKILL the process just before call number `at`
    (0: only count; the total is written at exit)."""
    import mctool.store.folders as folders

    _TRIP["at"] = at

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        def tripped(*args: Any, **kwargs: Any) -> Any:
            _TRIP["calls"] += 1
            if _TRIP["calls"] == _TRIP["at"]:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)

        return tripped

    for name in TRIP_CALLS:
        setattr(os, name, wrap(getattr(os, name)))
    folders._renameat2 = wrap(folders._renameat2)


class Zygote:
    """The forking server (parent side)."""

    def __init__(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen([sys.executable, "-c", "from tests.faultkit import _zygote_main; _zygote_main()"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO, env=env)

    def run(self, argv: list[str], log: Path, cwd: Path, kill_after: float | None = None,
            watch: Path | None = None, kill_at_event: int | None = None, plus: float = 0.0,
            trip: int | None = None, count_file: Path | None = None) -> dict[str, Any]:
        """Run `mctool ARGV` in a forked child, SIGKILLed `kill_after` seconds after the fork, or
        `plus` seconds after the `kill_at_event`-th file write in folder `watch` (if given), or
        by itself just before its `trip`-th file-system call (TRIP_CALLS; 0: count them into
        `count_file`)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        req = {"argv": [str(a) for a in argv], "log": str(log), "cwd": str(cwd), "kill_after": kill_after,
               "watch": str(watch) if watch else None, "kill_at_event": kill_at_event, "plus": plus,
               "trip": trip, "count_file": str(count_file) if count_file else None}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the zygote died")
        return json.loads(line)

    def close(self) -> None:
        """Stop the server."""
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --------------------------------------------------------------------------- what a file holds


def _h(*arrays: Any) -> str:
    d = hashlib.sha256()
    for a in arrays:
        if hasattr(a, "numpy"):
            a = a.numpy()
        a = np.ascontiguousarray(np.asarray(a))
        d.update(str((a.dtype, a.shape)).encode())
        d.update(a.tobytes())
    return d.hexdigest()[:16]


_VOLATILE = {"date", "seconds_per_run"}


def _stable(evaluations: list[dict[str, Any]]) -> str:
    return json.dumps([{k: v for k, v in ev.items() if k not in _VOLATILE} for ev in evaluations], sort_keys=True)


def contents(path: Path) -> dict[str, Any] | None:
    """What `path` holds, read and validated through the store (every value read, every check
    run): per-row hashes of experts and /convex, and per synset its images, labels, step size,
    loss, checkpoint and evaluations. None when there is no file."""
    from mctool import store

    if not path.exists():
        return None
    out: dict[str, Any] = {"summary": store.summarize(path)}
    with store.open_artifact(path) as f:
        buffer, synsets = "experts" in f or "convex" in f, "synsets" in f
    if buffer:
        with store.open_buffer(path) as buf:
            info = buf.experts
            if info is not None:
                idx = info.done_indices
                acc = buf.accuracy() if idx.size else np.zeros((0, info.epochs + 1))
                out["experts"] = {int(e): _h(buf.trajectory(int(e)) if info.has_trajectories else 0, info.seeds[e], a)
                                  for e, a in zip(idx, acc)}
                out["rows"] = info.rows
            out["convex_state"] = buf.convex_state
            if buf.convex_state == "complete":
                c = buf.convex
                out["convex"] = {"positions": list(c.meta.positions), "strategy": c.meta.strategy,
                                 "rows": {int(e): _h(*buf.convex_expert(int(e))) for e in c.done_indices}}
    if synsets:
        with store.open_synsets(path) as sf:
            out["synsets"] = {}
            for entry in out["summary"]["synsets"]:
                name = entry["name"]
                syn = sf.read(name, checkpoint=entry["has_checkpoint"])
                ck = syn.checkpoint
                out["synsets"][name] = {
                    "iterations": syn.iterations, "complete": syn.complete,
                    "state": _h(syn.images, syn.labels, np.float64(syn.lr), np.asarray(syn.loss, np.float64)),
                    "checkpoint": None if ck is None else _h(ck.images_velocity, np.float64(ck.alpha_velocity),
                                                             *ck.generators, np.asarray(sum(ck.queues, []))),
                    "evaluations": _stable(syn.evaluations),
                }
    return out


def same(a: dict[str, Any] | None, b: dict[str, Any] | None, keys: tuple[str, ...]) -> bool:
    """Whether two contents agree on `keys` (None: both absent)."""
    if a is None or b is None:
        return a is b
    return all(a.get(k) == b.get(k) for k in keys)


# --------------------------------------------------------------------------- writers


@dataclass
class Writer:
    """One writing command: how to set up its old state, run it, rerun it and judge a file."""

    name: str
    target: str  # file name in the work folder
    argv: Callable[[Path], list[str]]
    prepare: Callable[[Path], None]  # copies the old state into the work folder
    judge: Callable[[dict[str, Any] | None, dict[str, Any] | None, dict[str, Any]], str]
    rerun_argv: Callable[[Path, dict[str, Any] | None], list[str] | None] | None = None
    finished: Callable[..., bool] | None = None  # (old, got, final, new): the rerun's result is right


def judge_rows(old: dict[str, Any] | None, got: dict[str, Any] | None, new: dict[str, Any]) -> str:
    """Expert rows: the done rows of `got` are those of `old` plus a prefix of the new ones, each
    bit-identical (to `old`'s, else to `new`'s); anything else is corrupt."""
    if got is None:
        return "old" if old is None else "corrupt"
    rows, ref = got.get("experts", {}), new["experts"]
    before = old.get("experts", {}) if old else {}
    if any(rows.get(e) != h for e, h in before.items()):
        return "corrupt"
    if any(ref.get(e) != h for e, h in rows.items()):
        return "corrupt"
    if sorted(rows) != list(range(len(rows))):
        return "corrupt"
    convex = got.get("convex")
    if new.get("convex") is not None:  # streaming: /convex rows go with the expert rows
        if convex is None or set(convex["rows"]) != set(rows) or any(
                new["convex"]["rows"][e] != h for e, h in convex["rows"].items()):
            return "corrupt"
    if rows == ref:
        return "new"
    return "old" if old is not None and rows == before else "partial"


def judge_whole(old: dict[str, Any] | None, got: dict[str, Any] | None, new: dict[str, Any]) -> str:
    """A file replaced as a whole: exactly the old content or exactly the new one."""
    keys = ("experts", "convex", "convex_state", "synsets")
    if same(got, old, keys):
        return "old"
    if same(got, new, keys):
        return "new"
    return "corrupt"


def judge_distill(old: dict[str, Any] | None, got: dict[str, Any] | None, new: dict[str, Any]) -> str:
    """A distillation's output: absent, a checkpoint at some iteration (resumed later to the
    reference: see `finished`), or the reference itself."""
    if got is None:
        return "old"
    if same(got, new, ("synsets",)):
        return "new"
    names = list(got.get("synsets", {}))
    if names != list(new["synsets"]):
        return "corrupt"
    s = got["synsets"][names[0]]
    total = new["synsets"][names[0]]["iterations"]
    if not 1 <= s["iterations"] < total or s["complete"] or s["checkpoint"] is None:
        return "corrupt"
    return "partial"


# --------------------------------------------------------------------------- trials


@dataclass
class Tally:
    """Counts for one writer."""

    runs: int = 0
    kills: int = 0
    missed: int = 0  # the command finished before its kill
    opened: int = 0
    validated: int = 0
    states: dict[str, int] = field(default_factory=dict)
    temporaries: int = 0  # kills that left a temporary file (the kill landed inside a rewrite)
    reruns_ok: int = 0
    failures: list[str] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        """A JSON-ready row."""
        return {"runs": self.runs, "kills": self.kills, "missed": self.missed, "opened": self.opened,
                "validated": self.validated, "old": self.states.get("old", 0),
                "partial": self.states.get("partial", 0), "new": self.states.get("new", 0),
                "corrupt": self.states.get("corrupt", 0), "temporaries_left": self.temporaries,
                "reruns_ok": self.reruns_ok, "failures": self.failures[:10]}


def _try_contents(path: Path) -> tuple[dict[str, Any] | None, str | None, bool]:
    """(contents, error, opened)."""
    from mctool import store
    from mctool.core.errors import MctoolError

    if not path.exists():
        return None, None, True
    try:
        with store.open_artifact(path):
            pass
    except MctoolError as exc:
        return None, f"does not open: {exc}", False
    try:
        return contents(path), None, True
    except Exception as exc:  # noqa: BLE001 - any failure to validate is the finding
        return None, f"does not validate: {type(exc).__name__}: {exc}", True


@dataclass
class Reference:
    """An uninterrupted run from the old state: its result, duration and number of file writes."""

    old: dict[str, Any] | None
    new: dict[str, Any]
    seconds: float
    events: int


def reference(z: Zygote, w: Writer, work: Path) -> Reference:
    """Run `w` once without a kill."""
    _reset(work)
    w.prepare(work)
    old = contents(work / w.target)
    r = z.run(w.argv(work), work / "log.txt", work, watch=work)
    if r["code"] != 0:
        raise RuntimeError(f"{w.name}: the reference run failed: {(work / 'log.txt').read_text()[-3000:]}")
    new = contents(work / w.target)
    assert new is not None
    return Reference(old, new, r["seconds"], r["events"])


def _reset(work: Path) -> None:
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)


def trial(z: Zygote, w: Writer, ref: Reference, work: Path, rng: random.Random, tally: Tally) -> None:
    """One kill: set up the old state, kill the command at a drawn instant, judge the file, run the
    command again and check it finishes with the reference result."""
    from mctool import store

    _reset(work)
    w.prepare(work)
    if rng.random() < 1 / 3 or not ref.events:  # at a random instant
        delay, event, plus = rng.uniform(0.0, ref.seconds), None, 0.0
        when = f"{delay:.3f}s"
    else:  # just after a random one of the command's file writes (timing varies more than writes last)
        delay, event, plus = None, rng.randint(1, ref.events), rng.uniform(0.0, 0.003)
        when = f"write {event}/{ref.events} +{1000 * plus:.1f}ms"
    r = z.run(w.argv(work), work / "log.txt", work, kill_after=delay, watch=work, kill_at_event=event, plus=plus)
    tally.runs += 1
    if not r["killed"]:
        tally.missed += 1
        if r["code"] == 0 and r["seconds"] < ref.seconds:  # the first run was slower (cold): aim by this one
            ref.seconds = r["seconds"]
        if r["code"] != 0:
            tally.failures.append(f"{w.name}: exit {r['code']} without a kill: {(work / 'log.txt').read_text()[-500:]}")
        return
    tally.kills += 1
    target = work / w.target
    if store.temporaries(target):
        tally.temporaries += 1
    got, error, opened = _try_contents(target)
    tally.opened += opened
    if error is not None:
        tally.states["corrupt"] = tally.states.get("corrupt", 0) + 1
        tally.failures.append(f"{w.name} killed at {when}: {error}")
        return
    tally.validated += 1
    state = w.judge(ref.old, got, ref.new)
    tally.states[state] = tally.states.get(state, 0) + 1
    if state == "corrupt":
        tally.failures.append(f"{w.name} killed at {when}: neither old nor new")
        return
    argv = w.rerun_argv(work, got) if w.rerun_argv else w.argv(work)
    if argv is None:  # nothing left to do
        tally.reruns_ok += 1
        return
    r = z.run(argv, work / "rerun.txt", work)
    final, error, _ = _try_contents(target)
    ok = r["code"] == 0 and error is None and (
        w.finished(ref.old, got, final, ref.new) if w.finished else judge_whole(None, final, ref.new) == "new")
    if ok:
        tally.reruns_ok += 1
    else:
        tally.failures.append(f"{w.name} killed at {when} ({state}): the rerun exit {r['code']} "
                              f"{error or ''} {(work / 'rerun.txt').read_text()[-300:]}")


def run_writers(writers: list[Writer], kills: int, root: Path, seed: int = 0,
                report: Callable[[str], None] | None = None) -> dict[str, Tally]:
    """`kills` killed runs of each writer (runs whose command finished first are not counted)."""
    z = Zygote()
    out: dict[str, Tally] = {}
    try:
        for w in writers:
            rng = random.Random(f"{seed}-{w.name}")
            work = root / w.name
            ref = reference(z, w, work)
            tally = Tally()
            attempts = 0
            while tally.kills < kills and attempts < 4 * kills + 10:
                attempts += 1
                trial(z, w, ref, work, rng, tally)
            out[w.name] = tally
            if report:
                report(f"{w.name}: {json.dumps(tally.row())}")
    finally:
        z.close()
    return out


# --------------------------------------------------------------------------- the writers under test

EXPERTS = ["--epochs", "3", "--width", "8", "--batch-size", "32", "--lr", "0.05", "--quiet", "--seed", "1"]
DISTILL = ["--ipc", "1", "--syn-steps", "2", "--expert-epochs", "1", "--max-start-epoch", "1", "--lr-img", "100",
           "--lr-lr", "1e-5", "--lr-init", "0.01", "--checkpoint-every", "1", "--quiet"]


def build_templates(z: Zygote, root: Path, experts: int = 4) -> Path:
    """The old states the writers start from, made by the commands themselves (in `root`)."""
    from tests.conftest import make_tiny_mnist

    root.mkdir(parents=True, exist_ok=True)
    data = make_tiny_mnist(root / "data")
    d = ["--data-dir", str(data)]
    steps = [
        ["experts", "mnist", *d, "--n", str(experts), "-o", "buffer.h5", *EXPERTS],
        ["experts", "mnist", *d, "--n", "2", "-o", "buffer2.h5", *EXPERTS],
        ["convexify", "buffer.h5", "-o", "compact.h5", "--interior", "1", "--quiet"],
        ["distill", "--buffer", "compact.h5", "-o", "synset.h5", *d, "--iterations", "2", *DISTILL],
    ]
    for argv in steps:
        r = z.run(argv, root / "log.txt", root)
        if r["code"] != 0:
            raise RuntimeError(f"building {argv}: {(root / 'log.txt').read_text()[-3000:]}")
    shutil.copyfile(root / "buffer.h5", root / "buffer-convex.h5")
    r = z.run(["convexify", "buffer-convex.h5", "--interior", "1", "--quiet"], root / "log.txt", root)
    assert r["code"] == 0, (root / "log.txt").read_text()
    return root


def _copy(templates: Path, *names: tuple[str, str]) -> Callable[[Path], None]:
    def prepare(work: Path) -> None:
        for src, dst in names:
            shutil.copyfile(templates / src, work / dst)

    return prepare


def _rows_finished(old: dict[str, Any] | None, got: dict[str, Any] | None, final: dict[str, Any] | None,
                   new: dict[str, Any]) -> bool:
    return judge_rows(old, final, new) == "new"


def _distill_rerun(argv: list[str]) -> Callable[[Path, dict[str, Any] | None], list[str] | None]:
    def rerun(work: Path, got: dict[str, Any] | None) -> list[str] | None:
        if got is None:
            return argv
        s = next(iter(got["synsets"].values()))
        return None if s["complete"] else [*argv, "--resume"]

    return rerun


def _distill_finished(old: dict[str, Any] | None, got: dict[str, Any] | None, final: dict[str, Any] | None,
                      new: dict[str, Any]) -> bool:
    return final is not None and final.get("synsets") == new["synsets"]


def _evaluate_finished(old: dict[str, Any] | None, got: dict[str, Any] | None, final: dict[str, Any] | None,
                       new: dict[str, Any]) -> bool:
    """The rerun adds the reference's evaluations once more to whatever the kill left (old or new)."""
    if old is None or got is None or final is None:
        return False
    name = next(iter(new["synsets"]))
    before, after, first, ref = (json.loads(x["synsets"][name]["evaluations"]) for x in (got, final, old, new))
    added = ref[len(first):]
    rest = {k: v for k, v in final["synsets"][name].items() if k != "evaluations"}
    return after == before + added and rest == {k: v for k, v in new["synsets"][name].items() if k != "evaluations"}


def writers(templates: Path, names: list[str] | None = None) -> list[Writer]:
    """The writers of issue 14 on tiny inputs: experts (new buffer, appending, streaming
    --convexify), convexify in place (replacing a /convex) and -o (replacing a compact file),
    distill (a checkpoint every iteration) and evaluate (saving)."""
    d = ["--data-dir", str(templates / "data")]
    distill = ["distill", "--buffer", "compact.h5", "-o", "synset.h5", *d, "--iterations", "12", *DISTILL]
    all_writers = [
        Writer("experts-new", "buffer.h5", lambda w: ["experts", "mnist", *d, "--n", "4", "-o", "buffer.h5", *EXPERTS],
               lambda w: None, judge_rows, finished=_rows_finished),
        Writer("experts-append", "buffer.h5",
               lambda w: ["experts", "mnist", *d, "--n", "4", "-o", "buffer.h5", *EXPERTS],
               _copy(templates, ("buffer2.h5", "buffer.h5")), judge_rows, finished=_rows_finished),
        Writer("experts-convexify", "stream.h5",
               lambda w: ["experts", "mnist", *d, "--n", "4", "-o", "stream.h5", "--convexify", "--interior", "1",
                          *EXPERTS],
               lambda w: None, judge_rows, finished=_rows_finished),
        Writer("convexify-in-place", "buffer.h5", lambda w: ["convexify", "buffer.h5", "--interior", "2", "--quiet"],
               _copy(templates, ("buffer-convex.h5", "buffer.h5")), judge_whole),
        Writer("convexify-o", "compact.h5",
               lambda w: ["convexify", "buffer.h5", "-o", "compact.h5", "--interior", "2", "--quiet"],
               _copy(templates, ("buffer.h5", "buffer.h5"), ("compact.h5", "compact.h5")), judge_whole),
        Writer("distill", "synset.h5", lambda w: distill, _copy(templates, ("compact.h5", "compact.h5")),
               judge_distill, rerun_argv=_distill_rerun(distill), finished=_distill_finished),
        Writer("evaluate", "synset.h5",
               lambda w: ["evaluate", "synset.h5", *d, "--runs", "1", "--epochs", "2", "--quiet"],
               _copy(templates, ("synset.h5", "synset.h5")), judge_whole, finished=_evaluate_finished),
    ]
    return [w for w in all_writers if names is None or w.name in names]


# --------------------------------------------------------------------------- exact-point kills (issue 24)
#
# Random instants find the windows a writer leaves open by chance; these find every one: the
# reference run counts its file-system calls (TRIP_CALLS), then one run is killed just before
# each chosen call. After each kill the output must be the old one or the new one, and the same
# command run again must finish with the new one and leave nothing else beside it.

_VOLATILE_EXPORT = {"created"}


def export_contents(folder: Path) -> dict[str, Any] | None:
    """What an export folder holds: each file's sha256 (the description without its date); None
    when there is no folder; {'unreadable': ...} when it is not a complete export."""
    if not os.path.lexists(folder):
        return None
    if folder.is_symlink() or not folder.is_dir():
        return {"unreadable": "not a folder"}
    out: dict[str, Any] = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_symlink():
            out[rel] = "link"
        elif p.is_dir():
            out[rel] = "folder"
        elif p.name == "mctool_export.json":
            try:
                doc = json.loads(p.read_text())
            except ValueError as exc:
                return {"unreadable": f"{rel}: {exc}"}
            out[rel] = json.dumps({k: v for k, v in doc.items() if k not in _VOLATILE_EXPORT}, sort_keys=True)
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()[:16]
    return out


def judge_export(old: dict[str, Any] | None, got: dict[str, Any] | None, new: dict[str, Any]) -> str:
    """An export folder: exactly the old one (or none when there was none) or exactly the new one."""
    if got == new:
        return "new"
    if got == old:
        return "old"
    return "corrupt"


@dataclass
class ExactWriter:
    """A writer killed at exact points: its command, old state, output and what may lie beside it."""

    name: str
    target: str
    argv: list[str]
    prepare: Callable[[Path], None]
    read: Callable[[Path], dict[str, Any] | None]
    judge: Callable[[dict[str, Any] | None, dict[str, Any] | None, dict[str, Any]], str]
    finished: Callable[[dict[str, Any] | None, dict[str, Any]], bool]
    allowed: frozenset[str] = frozenset()  # entries of the work folder besides the target (inputs)


@dataclass
class ExactTally:
    """Counts for one writer's exact-point kills."""

    calls: int = 0  # file-system calls of the reference run (the points there are)
    tried: int = 0
    killed: int = 0
    states: dict[str, int] = field(default_factory=dict)
    clean: int = 0  # old or new after the kill, the rerun finished with the new one, nothing left beside
    problems: list[str] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        """A JSON-ready row."""
        return {"calls": self.calls, "tried": self.tried, "killed": self.killed, "old": self.states.get("old", 0),
                "new": self.states.get("new", 0), "corrupt": self.states.get("corrupt", 0), "clean": self.clean,
                "problems": len(self.problems), "failures": self.problems[:10]}


_LOGS = frozenset({"log.txt", "rerun.txt", "calls.txt"})


def exact_reference(z: Zygote, w: ExactWriter, work: Path) -> tuple[dict[str, Any] | None, dict[str, Any], int]:
    """(old content, new content, number of file-system calls) of an uninterrupted run."""
    _reset(work)
    w.prepare(work)
    old = w.read(work / w.target)
    r = z.run(w.argv, work / "log.txt", work, trip=0, count_file=work / "calls.txt")
    if r["code"] != 0:
        raise RuntimeError(f"{w.name}: the reference run failed: {(work / 'log.txt').read_text()[-3000:]}")
    new = w.read(work / w.target)
    assert new is not None
    return old, new, int((work / "calls.txt").read_text())


def exact_trial(z: Zygote, w: ExactWriter, old: dict[str, Any] | None, new: dict[str, Any], point: int, work: Path,
                tally: ExactTally) -> None:
    """Kill `w` just before its `point`-th file-system call; judge; run it again; judge again."""
    _reset(work)
    w.prepare(work)
    tally.tried += 1
    r = z.run(w.argv, work / "log.txt", work, trip=point)
    where = f"{w.name} killed before call {point}/{tally.calls}"
    if not r["killed"]:
        tally.problems.append(f"{where}: not killed (exit {r['code']}): {(work / 'log.txt').read_text()[-300:]}")
        return
    tally.killed += 1
    try:
        got = w.read(work / w.target)
    except Exception as exc:  # noqa: BLE001 - any failure to read is the finding
        got = {"unreadable": f"{type(exc).__name__}: {exc}"}
    state = w.judge(old, got, new)
    tally.states[state] = tally.states.get(state, 0) + 1
    if state == "corrupt":
        tally.problems.append(f"{where}: neither old nor new: {str(got)[:300]}")
        return
    r = z.run(w.argv, work / "rerun.txt", work)
    try:
        final = w.read(work / w.target)
    except Exception as exc:  # noqa: BLE001
        final = {"unreadable": f"{type(exc).__name__}: {exc}"}
    stray = sorted(set(os.listdir(work)) - _LOGS - w.allowed - {w.target})
    if r["code"] != 0 or final is None or not w.finished(final, new):
        tally.problems.append(f"{where} ({state}): the rerun exit {r['code']}: "
                              f"{(work / 'rerun.txt').read_text()[-300:]}")
    elif stray:
        tally.problems.append(f"{where} ({state}): the rerun left {stray} beside the output")
    else:
        tally.clean += 1


def exact_points(calls: int, sample: int | None = None) -> list[int]:
    """Every call 1..calls, or `sample` of them spread evenly (the first and the last included)."""
    points = list(range(1, calls + 1))
    if sample is None or sample >= calls:
        return points
    step = (calls - 1) / max(1, sample - 1)
    return sorted({1 + round(i * step) for i in range(sample)})


def run_exact(z: Zygote, w: ExactWriter, root: Path, sample: int | None = None) -> ExactTally:
    """Kill `w` at every (or `sample` evenly spread) exact point."""
    work = root / w.name
    old, new, calls = exact_reference(z, w, work)
    tally = ExactTally(calls=calls)
    for point in exact_points(calls, sample):
        exact_trial(z, w, old, new, point, work, tally)
    return tally


def build_exact_templates(z: Zygote, templates: Path) -> Path:
    """Beside build_templates' files: a second, larger synset (ipc 2) and the earlier exports the
    export writers replace, and a folder of MTT replay buffers for import."""
    d = ["--data-dir", str(templates / "data")]
    steps = [
        ["distill", "--buffer", "compact.h5", "-o", "synset-b.h5", *d, "--iterations", "1", "--ipc", "2", *DISTILL[2:]],
        ["export", "synset-b.h5", "--format", "mtt", "-o", "old-mtt", *d, "--quiet"],
        ["export", "synset-b.h5", "--format", "png", "-o", "old-png", *d, "--quiet"],
    ]
    for argv in steps:
        if (templates / str(argv[argv.index("-o") + 1])).exists():
            continue
        r = z.run(argv, templates / "log.txt", templates)
        if r["code"] != 0:
            raise RuntimeError(f"building {argv}: {(templates / 'log.txt').read_text()[-3000:]}")
    replay = templates / "replay"
    if not replay.exists():
        from tests.interop_fixtures import make_experts, tiny_spec, write_replay_buffer

        experts = make_experts(tiny_spec(), 4, 3, seed=9)
        write_replay_buffer(replay, 0, experts[:2])
        write_replay_buffer(replay, 1, experts[2:])
    return templates


def _copy_tree(templates: Path, *names: tuple[str, str]) -> Callable[[Path], None]:
    def prepare(work: Path) -> None:
        for src, dst in names:
            if (templates / src).is_dir():
                shutil.copytree(templates / src, work / dst, symlinks=True)
            else:
                shutil.copyfile(templates / src, work / dst)

    return prepare


def exact_writers(templates: Path, names: list[str] | None = None) -> list[ExactWriter]:
    """Export in each format replacing an earlier export of a larger synset (mtt: same format;
    ddranking: a switch from mtt; png: fewer PNGs), and import's HDF5 output, new."""
    d = ["--data-dir", str(templates / "data")]

    def export(fmt: str, old: str) -> ExactWriter:
        return ExactWriter(f"export-{fmt}", "out", ["export", "synset.h5", "--format", fmt, "-o", "out", *d, "--quiet"],
                           _copy_tree(templates, ("synset.h5", "synset.h5"), (old, "out")), export_contents,
                           judge_export, lambda final, new: final == new, frozenset({"synset.h5"}))

    def import_finished(final: dict[str, Any] | None, new: dict[str, Any]) -> bool:
        return judge_rows(None, final, new) == "new"

    all_writers = [
        export("mtt", "old-mtt"),
        export("ddranking", "old-mtt"),
        export("png", "old-png"),
        ExactWriter("import", "imported.h5",
                    ["import", str(templates / "replay"), "-o", "imported.h5", "--dataset", "mnist", "--no-zca", *d,
                     "--quiet"],
                    lambda w: None, contents, lambda old, got, new: judge_rows(old, got, new), import_finished),
    ]
    return [w for w in all_writers if names is None or w.name in names]
