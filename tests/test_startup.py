"""The command line answers what needs no computation — `--help`, `--version`, a subcommand's
`--help`, an unknown option, an unknown preset, `--list-presets` — without importing torch,
h5py or numpy (torch alone takes 2 s to import on an idle 2-core machine, a minute on a busy
one). Each case runs in a fresh interpreter: this test process has imported torch long ago.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "h5py", "numpy")

# Runs the CLI in-process (typer's CliRunner, as tests/helpers.py does), then reports the exit
# code, the output and which heavy modules got imported.
PROBE = """
import json, sys
from typer.testing import CliRunner
from mctool.cli import app
r = CliRunner().invoke(app, sys.argv[1:])
print(json.dumps({"code": r.exit_code, "out": r.output,
                  "heavy": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)


def probe(*args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("args, code, says", [
    (["--help"], 0, "Pipeline"),
    (["--version"], 0, "mctool "),
    (["distill", "--help"], 0, "--lr-img"),
    (["experts", "--help"], 0, "--epochs"),
    (["evaluate", "--help"], 0, "--runs"),
    (["convexify", "--help"], 0, "--interior"),
    (["inspect", "--help"], 0, "FILE"),
    (["demo", "--help"], 0, "--fast"),
    (["import", "--help"], 0, "FOLDER"),
    (["export", "--help"], 0, "--format"),
    (["distill", "--no-such-option"], 2, "No such option"),
    (["distill", "--preset", "no-such-preset"], 2, "unknown preset 'no-such-preset'"),
    (["distill", "--list-presets"], 0, "cifar10-ipc10"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_answers_without_importing_torch(args: list[str], code: int, says: str) -> None:
    r = probe(*args)
    assert r["code"] == code, r["out"]
    assert says in r["out"]
    assert r["heavy"] == [], f"`mctool {' '.join(args)}` imported {r['heavy']}"


def test_the_probe_sees_an_import_of_torch() -> None:
    """The check above can fail: a command that opens a file imports the store (h5py, torch), and
    the probe says so."""
    r = probe("inspect", str(ROOT / "tests" / "no-such-file.h5"))
    assert r["code"] == 2 and "torch" in r["heavy"] and "h5py" in r["heavy"]
