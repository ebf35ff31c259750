"""bench/gpu.sh --cpu-smoke: the prepared GPU check runs end to end at tiny sizes on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_script_cpu_smoke(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    env.pop("MCTOOL_TEST_DEVICE", None)
    leftovers = ["build", "mctool.egg-info"]
    before = {name: (REPO / name).exists() for name in leftovers}
    # Started from another folder, as on the GPU machine it may be. A generous budget: on a loaded shared CPU the smoke run can take minutes, and a skipped
    # step would hide a broken one.
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh"), "--cpu-smoke", "--budget", "900",
                           "--out", str(tmp_path / "out")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["gpu.json", "log.txt", "summary.md"]
    result = json.loads((out / "gpu.json").read_text())
    status = {s["step"]: s["status"] for s in result["steps"]}
    assert status == {"install": "ok", "cpu-tests": "ok", "distill-cifar10-ipc10": "ok", "evaluate": "ok",
                      "evaluate-together": "ok", "experts": "ok", "experts-parallel": "ok",
                      "distill-large": "not run"}
    # Every timing step left its bench JSON, and the summary shows each of its tables.
    assert set(result["bench"]) == {"distill-cifar10-ipc10", "evaluate", "evaluate-together", "experts",
                                    "experts-parallel"}
    together = result["bench"]["evaluate-together"]["results"]
    assert all(r["accuracies_sequential"] == r["accuracies_together"] for r in together)
    summary = (out / "summary.md").read_text()
    for title in ("## Steps", "## Expert training", "## One distillation iteration, CIFAR-10 ipc 10",
                  "## One evaluation run per ipc", "## Evaluation: runs together", "## Experts together"):
        assert title in summary
    log = (out / "log.txt").read_text()
    assert "installed mctool" in log and "1 passed" in log
    # The install builds from a copy: the working tree gets no build/ or egg-info from it.
    assert {name: (REPO / name).exists() for name in leftovers} == before
