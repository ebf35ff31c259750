"""A staged, resumable pipeline of `mctool` commands with a JSON manifest (used by bench/fidelity.py).

Each stage is one `mctool` subcommand that makes one product in a work folder. The manifest
(`manifest.json` in that folder) records per stage the exact command, its status, every attempt's
start/end/wall seconds and machine load, the product and a fingerprint of the stage's settings and
of the stages it depends on. Rerunning the pipeline reuses a finished stage whose fingerprint is
unchanged, continues an interrupted one (mctool's own resume: `experts` by re-running the same
command, `distill` with `--resume`), and reruns a stage whose settings changed together with
everything downstream (the old product is moved to `stale/`, never deleted).

Not part of the library: no torch import, stdlib only, so the fake runner of the tests is cheap.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
#: mctool's answer to an option it does not know (click's wording), and the exit code of bad input.
UNKNOWN_OPTION = re.compile(r"No such option|no such option|Got unexpected extra argument")
USAGE_EXIT = 2
INTERRUPTED_EXIT = 130


@dataclass(frozen=True)
class Stage:
    """One `mctool COMMAND ARGS... --json --quiet` call that makes `product` in the work folder."""

    name: str
    command: str
    args: tuple[str, ...]
    product: str
    deps: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()  # options `mctool COMMAND --help` must list, else "not available"
    capture: bool = False  # the product is the command's --json document (written by the pipeline)
    resume_flag: str | None = None  # added when an earlier attempt left a product to continue

    def fingerprint(self, dep_fingerprints: list[str]) -> str:
        """Hash of what decides the product: command, arguments, product name and the inputs' hashes."""
        blob = json.dumps([self.command, list(self.args), self.product, dep_fingerprints])
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class Completed:
    """What a finished child process left: exit code and its two streams."""

    rc: int
    stdout: str
    stderr: str


class Runner(Protocol):
    """Runs `mctool` commands; the tests substitute a fake one."""

    def run(self, argv: list[str], cwd: Path) -> Completed: ...
    def help(self, command: str) -> str: ...
    def interrupt(self) -> None: ...


def _set_parent_death_signal() -> None:
    """In the child: get SIGINT (mctool saves and stops) if the benchmark process dies first."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGINT))  # PR_SET_PDEATHSIG = 1
    except Exception:  # not Linux: an orphaned child just runs to its end
        pass


class SubprocessRunner:
    """`python -m mctool ...` in a child process of its own process group.

    The child does not see a terminal's Ctrl-C directly: the benchmark forwards exactly one SIGINT
    (mctool then saves its state and exits 130), so a second signal never cuts a save short.
    """

    def __init__(self, python: str, env: dict[str, str]) -> None:
        self.python, self.env = python, env
        self.child: subprocess.Popen[str] | None = None
        self.stopping = False  # an interrupt came: a child started afterwards is stopped at once
        self._help: dict[str, str] = {}

    def run(self, argv: list[str], cwd: Path) -> Completed:
        """Run `mctool ARGV` in `cwd`, wait for it (through forwarded signals) and return its output."""
        self.child = subprocess.Popen([self.python, "-m", "mctool", *argv], cwd=cwd, env=self.env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                                      preexec_fn=_set_parent_death_signal)
        if self.stopping:  # the signal came between the fork and the assignment above
            self.interrupt()
        try:
            out, err = self.child.communicate()
            return Completed(self.child.returncode, out, err)
        finally:
            self.child = None

    def help(self, command: str) -> str:
        """`mctool COMMAND --help` (wide, uncoloured), cached."""
        if command not in self._help:
            env = dict(self.env, COLUMNS="400", TERM="dumb", NO_COLOR="1")
            done = subprocess.run([self.python, "-m", "mctool", command, "--help"], env=env, text=True,
                                  capture_output=True)
            self._help[command] = done.stdout + done.stderr
        return self._help[command]

    def interrupt(self) -> None:
        """Ask the running child to stop (SIGINT: mctool saves its state first)."""
        self.stopping = True
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGINT)


def has_option(help_text: str, option: str) -> bool:
    """Whether `option` (e.g. '--grad') appears as a whole option name in a --help text."""
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", help_text) is not None


def now() -> str:
    """UTC time, ISO 8601 to the second."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def loadavg() -> list[float] | None:
    """1/5/15-minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (a crash leaves the old file or the new one, never half of one)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


class WorkBusy(RuntimeError):
    """Another benchmark process holds the work folder."""


class Manifest:
    """manifest.json of a work folder: header (size, machine, ...) plus one entry per stage."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.path = work / MANIFEST
        if self.path.exists():
            self.data: dict[str, Any] = json.loads(self.path.read_text())
        else:
            self.data = {"version": MANIFEST_VERSION, "created": now(), "sittings": [], "stages": {}}

    def stage(self, name: str) -> dict[str, Any]:
        """The entry of stage `name` (created empty)."""
        return self.data["stages"].setdefault(name, {"attempts": []})

    def save(self) -> None:
        """Write the manifest atomically."""
        write_json(self.path, self.data)


class Lock:
    """An exclusive lock on the work folder, so two benchmark runs never write the same products."""

    def __init__(self, work: Path) -> None:
        self.path = work / ".lock"
        self.fd: int | None = None

    def __enter__(self) -> "Lock":
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = None
            holder = self.path.read_text().strip() or "another process"
            raise WorkBusy(f"{self.path.parent}: in use by {holder} (wait for it or use another --work)") from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"pid {os.getpid()}".encode())
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)


@dataclass
class Outcome:
    """How one stage ended in this sitting."""

    name: str
    status: str  # done | reused | interrupted | failed | unavailable | blocked
    reason: str = ""


@dataclass
class Pipeline:
    """Runs stages in order, reusing, continuing or redoing each as its manifest entry says."""

    work: Path
    stages: list[Stage]
    runner: Runner
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)
    extra: dict[str, list[str]] = field(default_factory=dict)  # per command, e.g. --device: not fingerprinted
    stop_requested: bool = False
    manifest: Manifest = field(init=False)

    def __post_init__(self) -> None:
        self.by_name = {s.name: s for s in self.stages}
        assert len(self.by_name) == len(self.stages), "stage names must be unique"
        for s in self.stages:
            for d in s.deps:
                assert d in self.by_name, f"{s.name}: unknown dependency {d}"
        self.manifest = Manifest(self.work)  # the folder is made by whoever runs stages (not by --list)
        self._fps: dict[str, str] = {}

    def fingerprint(self, name: str) -> str:
        """The stage's fingerprint, which folds in those of its dependencies."""
        if name not in self._fps:
            s = self.by_name[name]
            self._fps[name] = s.fingerprint([self.fingerprint(d) for d in s.deps])
        return self._fps[name]

    def closure(self, names: list[str]) -> list[str]:
        """`names` and everything they depend on, in pipeline order."""
        wanted: set[str] = set()

        def add(n: str) -> None:
            if n not in wanted:
                wanted.add(n)
                for d in self.by_name[n].deps:
                    add(d)

        for n in names:
            add(n)
        return [s.name for s in self.stages if s.name in wanted]

    def argv(self, s: Stage) -> list[str]:
        """The mctool arguments run for stage `s` (before any resume flag)."""
        return [s.command, *s.args, *self.extra.get(s.command, []), "--json", "--quiet"]

    def is_current(self, name: str) -> bool:
        """Finished with today's settings and its product still there."""
        e = self.manifest.data["stages"].get(name, {})
        return (e.get("status") == "done" and e.get("fingerprint") == self.fingerprint(name)
                and (self.work / self.by_name[name].product).exists())

    def adopt(self, other: Path) -> list[str]:
        """Take the stages finished in `other`, a copy of this work folder run by a second sitting
        (two cores, two lanes), that are not current here; returns their names.

        A stage is taken only where every stage it depends on is current in both folders and has the
        same recorded history (the same attempts, so the same product): its inputs are this folder's.
        Its product is copied in atomically; what this folder held for it moves to stale/.
        """
        theirs = Pipeline(other, self.stages, self.runner, log=self.log, extra=self.extra)
        entries = theirs.manifest.data["stages"]
        taken: list[str] = []
        for s in self.stages:
            if self.is_current(s.name) or not theirs.is_current(s.name):
                continue
            lineage = [d for d in self.closure([s.name]) if d != s.name]
            if not all(self.is_current(d) and theirs.is_current(d)
                       and self.manifest.data["stages"][d].get("attempts") == entries[d].get("attempts")
                       for d in lineage):
                self.log(f"[{s.name}] not taken from {other}: what it was made from differs from this folder's")
                continue
            entry = self.manifest.stage(s.name)
            if (self.work / s.product).exists():
                self._retire(s, entry, f"taking it from {other}")
            tmp = self.work / (s.product + ".adopting")
            shutil.copyfile(other / s.product, tmp)
            os.replace(tmp, self.work / s.product)
            entry.clear()
            entry.update(json.loads(json.dumps(entries[s.name])))
            entry["adopted_from"] = str(other)
            self.manifest.save()
            self.log(f"[{s.name}] taken from {other}")
            taken.append(s.name)
        return taken

    def missing_options(self, s: Stage) -> list[str]:
        """Options the stage needs that this mctool's `COMMAND --help` does not list."""
        if not s.requires:
            return []
        text = self.runner.help(s.command)
        return [o for o in s.requires if not has_option(text, o)]

    def _retire(self, s: Stage, entry: dict[str, Any], why: str) -> None:
        """Move an earlier product aside (kept under stale/) and forget its attempts."""
        product = self.work / s.product
        if product.exists():
            stale = self.work / "stale"
            stale.mkdir(exist_ok=True)
            dest = stale / f"{product.stem}-{entry.get('fingerprint', 'old')[:8]}{product.suffix}"
            os.replace(product, dest)
            self.log(f"[{s.name}] {why}: earlier product moved to {dest.relative_to(self.work)}")
        previous = {k: entry[k] for k in ("fingerprint", "command", "status") if k in entry}
        entry.clear()
        entry.update({"attempts": [], "replaced": previous})

    def run(self, only: list[str] | None = None, stop_after: str | None = None) -> list[Outcome]:
        """Run the selected stages (default: all) in order; stop after `stop_after` or on a stop request."""
        self.work.mkdir(parents=True, exist_ok=True)
        names = self.closure(only) if only else [s.name for s in self.stages]
        if stop_after is not None:
            names = names[: names.index(stop_after) + 1] if stop_after in names else names
        outcomes: dict[str, Outcome] = {}
        for name in names:
            if self.stop_requested:
                break
            outcomes[name] = self.run_stage(self.by_name[name], outcomes)
            if outcomes[name].status == "interrupted":
                break
        return list(outcomes.values())

    def run_stage(self, s: Stage, earlier: dict[str, Outcome]) -> Outcome:
        """Reuse, continue, redo or skip one stage; record what happened in the manifest."""
        entry = self.manifest.stage(s.name)
        fp = self.fingerprint(s.name)
        if self.is_current(s.name):
            return Outcome(s.name, "reused")
        for d in s.deps:
            dep = earlier.get(d)
            if not self.is_current(d):
                why = dep.reason if dep is not None and dep.status in ("unavailable", "blocked") else f"needs {d}"
                status = "unavailable" if dep is not None and dep.status == "unavailable" else "blocked"
                return self._mark(s, entry, fp, status, why)
        missing = self.missing_options(s)
        if missing:
            return self._mark(s, entry, fp, "unavailable",
                              f"not available in this mctool: {s.command} {', '.join(missing)}")
        if entry.get("fingerprint") not in (None, fp):
            self._retire(s, entry, "settings changed")
        product = self.work / s.product
        resuming = (s.resume_flag is not None and product.exists()
                    and entry.get("status") in ("running", "interrupted", "failed"))
        if s.resume_flag is not None and product.exists() and not resuming:
            self._retire(s, entry, "starting afresh")  # a fresh start of a resumable command needs no earlier product
        attempt: dict[str, Any] = {"started": now(), "loadavg_start": loadavg(), "resumed": resuming}
        t0 = time.monotonic()
        done = self._attempt(s, entry, fp, attempt, resuming)
        if resuming and done.rc == USAGE_EXIT and not self.stop_requested:
            # Nothing to continue (e.g. finished but not recorded, or no checkpoint): start over.
            self.log(f"[{s.name}] cannot continue ({_last_line(done.stderr)}); starting over")
            self._retire(s, entry, "cannot continue it")
            attempt["resumed"] = False
            done = self._attempt(s, entry, fp, attempt, False)
        attempt.update({"ended": now(), "wall_s": round(time.monotonic() - t0, 1), "loadavg_end": loadavg(),
                        "rc": done.rc})
        entry["wall_s"] = round(sum(a.get("wall_s", 0.0) for a in entry["attempts"]), 1)
        if done.rc == 0:
            result = _parse_json(done.stdout)
            if s.capture:
                write_json(product, result)
            entry.update({"status": "done", "result": result, "ended": attempt["ended"]})
            entry.pop("error", None)
            outcome = Outcome(s.name, "done")
        elif done.rc == INTERRUPTED_EXIT or self.stop_requested:
            entry.update({"status": "interrupted"})
            outcome = Outcome(s.name, "interrupted", "interrupted")
        elif done.rc == USAGE_EXIT and UNKNOWN_OPTION.search(done.stderr):
            entry.update({"status": "unavailable", "error": _last_line(done.stderr)})
            outcome = Outcome(s.name, "unavailable", f"not available in this mctool: {_last_line(done.stderr)}")
        else:
            entry.update({"status": "failed", "error": _last_line(done.stderr) or f"exit code {done.rc}"})
            outcome = Outcome(s.name, "failed", entry["error"])
        self.manifest.save()
        self.log(f"[{s.name}] {outcome.status} after {attempt['wall_s']:.0f} s"
                 + (f": {outcome.reason}" if outcome.reason and outcome.status != "interrupted" else ""))
        return outcome

    def _attempt(self, s: Stage, entry: dict[str, Any], fp: str, attempt: dict[str, Any],
                 resuming: bool) -> Completed:
        """Record the attempt as running, run the command, return what it left."""
        argv = self.argv(s) + ([s.resume_flag] if resuming and s.resume_flag else [])
        entry.update({"fingerprint": fp, "command": ["mctool", *argv], "product": s.product, "status": "running"})
        entry.pop("reason", None)
        if attempt not in entry["attempts"]:
            entry["attempts"].append(attempt)
        self.manifest.save()
        self.log(f"[{s.name}] {'continuing' if resuming else 'running'}: mctool {' '.join(argv)}")
        return self.runner.run(argv, self.work)

    def _mark(self, s: Stage, entry: dict[str, Any], fp: str, status: str, reason: str) -> Outcome:
        """Record a stage that was not run (its option is missing, or what it needs is not there).

        An entry holding an interrupted run keeps its status, so the run is continued later.
        """
        if entry.get("status") not in ("running", "interrupted", "failed"):
            entry.update({"status": status, "command": ["mctool", *self.argv(s)]})
        entry["reason"] = reason
        self.manifest.save()
        self.log(f"[{s.name}] {status}: {reason}")
        return Outcome(s.name, status, reason)


def _parse_json(text: str) -> Any:
    """mctool's --json document (None when the output is not JSON)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _last_line(text: str) -> str:
    """The last non-empty line of a stream (mctool's one-line error)."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""
