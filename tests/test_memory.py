"""mctool.matching.memory: the peak-memory model, free memory and the micro-batch `auto` picks."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mctool.matching.memory as mem
from mctool.matching.memory import (ESTIMATE_ERROR, MODES, STEP_BYTES_PER_IMAGE, STEP_OVERHEAD_BYTES, Workload,
                           auto_micro_batch, check_fits, dry_run, estimate_peak_bytes, free_bytes, parse_size,
                           profile_network, size_text, smallest_peak, split_bytes)
from mctool.models import ModelSpec, build_model

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parent.parent


def cifar_profile(norm: str = "instancenorm", width: int = 128):
    return profile_network(build_model(ModelSpec(width=width, num_classes=10, norm=norm)), (3, 32, 32))


def test_profile_counts_leaf_outputs_and_leaves_the_module_alone() -> None:
    module = build_model(ModelSpec(depth=1, width=4, channels=3, num_classes=5, im_size=(8, 8)))
    before = [p.clone() for p in module.parameters()]
    prof = profile_network(module, (3, 8, 8))
    # conv, norm, ReLU: 4×8×8 each; pool 4×4×4; linear 5.
    assert prof.act_elems == 3 * 4 * 64 + 4 * 16 + 5
    assert prof.num_params == sum(p.numel() for p in module.parameters())
    assert prof.in_elems == 192 and prof.fastgrad and prof.coupling is None
    assert all(p.device.type == "cpu" and torch.equal(p, q) for p, q in zip(module.parameters(), before))
    bn = profile_network(build_model(ModelSpec(depth=1, width=4, channels=3, im_size=(8, 8), norm="batchnorm")),
                         (3, 8, 8))
    assert not bn.fastgrad and "BatchNorm2d" in (bn.coupling or "")


def test_estimate_monotone_in_the_right_variables() -> None:
    prof = cifar_profile()
    work = Workload(n_images=1000, batch=1000, syn_steps=20, num_classes=100)

    def total(mode: str, micro: int | None = None, **kw) -> int:
        w = Workload(**{**work.__dict__, **kw})
        return estimate_peak_bytes(prof, w, mode, micro, CPU).total_bytes

    for mode in ("constant", "adjoint"):
        sizes = [total(mode, m) for m in (1, 10, 100, 500, 1000)]
        assert sizes == sorted(sizes) and sizes[0] < sizes[-1]  # grows with the micro-batch
        # Five times the images at the same micro-batch: only X, its momentum and gradient and the labels grow.
        # (and the steps' pre-sampled indices and draws, which grow with the batch).
        grown = total(mode, 100, n_images=5000, batch=5000) - total(mode, 100)
        assert grown == 4000 * (3 * 3 * 32 * 32 * 4 + 8) + 20 * 4000 * STEP_BYTES_PER_IMAGE
        assert total(mode, 2000) == total(mode, None)  # a chunk larger than the batch is the batch
    # Flat in N but for the steps' bookkeeping (indices and DSA draws), which grows linearly.
    assert total("constant", 100, syn_steps=80) - total("constant", 100) == \
        60 * (STEP_OVERHEAD_BYTES + 1000 * STEP_BYTES_PER_IMAGE)
    assert total("adjoint", 100, syn_steps=80) > total("adjoint", 100)  # stored w_k
    assert total("adjoint", 100) > total("constant", 100)
    # Chunks shrink only the final backward's temporaries of unrolled, not its graph.
    assert total("unrolled", 10) < total("unrolled", None) < 1.5 * total("unrolled", 10)
    assert total("unrolled", None, syn_steps=40) > total("unrolled", None) > total("constant", None)
    assert total("constant", 100, data_bytes=10**9) == total("constant", 100) + 10**9
    est = estimate_peak_bytes(prof, work, "constant", 100, CPU, impl="fastgrad")
    assert est.micro_batch == 100 and est.impl == "fastgrad"
    auto = estimate_peak_bytes(prof, work, "constant", 100, CPU, impl="auto")
    assert auto.total_bytes >= est.total_bytes  # auto times autograd too: the larger of the two
    with pytest.raises(ValueError, match="mode"):
        estimate_peak_bytes(prof, work, "exact", None, CPU)


@pytest.mark.parametrize("mode", ["constant", "adjoint"])
@pytest.mark.parametrize("free_gib", [1.0, 4.0, 16.0])
def test_auto_picks_the_largest_fitting_micro_batch(mode: str, free_gib: float) -> None:
    prof = cifar_profile()
    work = Workload(n_images=5000, batch=5000, syn_steps=50, num_classes=100)
    free = int(free_gib * 2**30)
    choice = auto_micro_batch(prof, work, mode, CPU, free=free, safety=0.5)
    m = choice.micro_batch
    budget = free // 2
    assert choice.budget_bytes == budget and 1 <= m <= work.batch and choice.fits
    assert estimate_peak_bytes(prof, work, mode, m, CPU).transient_bytes <= budget
    pieces = math.ceil(work.batch / m)
    # One image more per chunk would not fit, or would not reduce the number of chunks.
    bigger = estimate_peak_bytes(prof, work, mode, math.ceil(work.batch / (pieces - 1)) if pieces > 1 else m, CPU)
    assert pieces == 1 or bigger.transient_bytes > budget
    assert m == math.ceil(work.batch / pieces)  # chunks as equal as possible
    before_load = auto_micro_batch(prof, Workload(**{**work.__dict__, "data_bytes": 2**28}), mode, CPU, free=free,
                                   safety=0.5, resident_loaded=False)
    # Counting the resident data leaves less for the chunks (or nothing at all).
    assert before_load.micro_batch <= m if before_load.fits else before_load.micro_batch == work.batch


def test_auto_special_cases() -> None:
    prof = cifar_profile()
    work = Workload(n_images=100, batch=100, syn_steps=10, num_classes=10)
    assert auto_micro_batch(prof, work, "constant", CPU, free=2**40).micro_batch == 100  # whole batches fit
    low = auto_micro_batch(prof, work, "constant", CPU, free=1000)
    assert low.micro_batch == 100 and not low.fits and "any micro-batch" in low.why
    unrolled = auto_micro_batch(prof, work, "unrolled", CPU, free=2**20)
    assert unrolled.micro_batch == 100 and not unrolled.fits and "unrolled" in unrolled.why
    bn = auto_micro_batch(cifar_profile("batchnorm"), work, "constant", CPU, free=2**20)
    assert bn.micro_batch == 100 and "BatchNorm2d" in bn.why


def test_auto_with_unknown_free_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mem, "free_bytes", lambda device: None)
    work = Workload(n_images=100, batch=100, syn_steps=10, num_classes=10)
    choice = auto_micro_batch(cifar_profile(), work, "constant", CPU)
    assert choice.micro_batch == 100 and choice.budget_bytes is None and "unknown" in choice.why


def test_free_bytes_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    free = free_bytes(CPU)
    if sys.platform.startswith("linux"):
        assert free is not None and 0 < free
    real = Path.read_text

    def no_proc(self: Path, *a, **k) -> str:
        if str(self) == "/proc/meminfo":
            raise OSError("no /proc")
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "read_text", no_proc)
    fallback = free_bytes(CPU)  # os.sysconf's available pages where the OS has them
    if hasattr(os, "sysconf") and "SC_AVPHYS_PAGES" in getattr(os, "sysconf_names", {}):
        assert fallback is not None and fallback > 0


def test_dry_run_reports_every_mode() -> None:
    prof = cifar_profile()
    work = Workload(n_images=5000, batch=5000, syn_steps=50, num_classes=100,
                    data_bytes=split_bytes(50000, 10000, (3, 32, 32)))
    out = dry_run(prof, work, CPU, free=8 * 2**30)
    assert [d.mode for d in out] == list(MODES)
    by = {d.mode: d for d in out}
    assert by["constant"].auto.micro_batch < 5000 and by["constant"].auto.fits
    assert by["constant"].whole.total_bytes > 8 * 2**30  # whole batches would not fit
    assert by["unrolled"].auto.micro_batch == 5000
    assert by["constant"].auto.estimate.resident["data on the device"] == 60000 * (3 * 32 * 32 * 4 + 8)


CHILD = r"""
import json, os, sys, torch
from pathlib import Path
from mctool.core.allocator import release_free_memory, tune_malloc
tune_malloc()
torch.set_num_threads(1)
from mctool.data.augment import DSA, StepAugment
from mctool.models.functional import FlatNet
from mctool.matching.loss import match
from mctool.models import ModelSpec, build_model
n, micro, mode, steps = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
net = FlatNet(build_model(ModelSpec(width=128, num_classes=10), seed=0))
gen = torch.Generator().manual_seed(0)
x = torch.randn(n, 3, 32, 32, generator=gen)
y = torch.arange(n) % 10
ts = net.flatten()
tt = ts + 0.01 * torch.randn(ts.shape, generator=gen)
batches = [torch.randperm(n, generator=gen) for _ in range(steps)]
dsa = DSA("rotate")
aug = StepAugment(dsa, [dsa.sample(n, 32, 32, gen) for _ in batches])
release_free_memory()
import threading, time
def anon():  # resident minus file-backed pages: library pages evicted under pressure do not count
    f = Path("/proc/self/statm").read_text().split()
    return (int(f[1]) - int(f[2])) * os.sysconf("SC_PAGE_SIZE")
before = peak = anon()
done = threading.Event()
def sample():
    global peak
    while not done.is_set():
        peak = max(peak, anon())
        time.sleep(0.001)
t = threading.Thread(target=sample)
t.start()
match(net, x, y, ts, tt, 0.01, batches, aug, mode, fast_path="fastgrad", micro_batch=micro)
done.set()
t.join()
print(json.dumps({"delta": peak - before}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and ru_maxrss in KiB")
@pytest.mark.parametrize("mode", ["constant", "adjoint"])
def test_estimate_within_stated_factor_of_a_measured_run(mode: str) -> None:
    n, micro, steps = 96, 32, 2
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", CHILD, str(n), str(micro), mode, str(steps)], env=env,
                         capture_output=True, text=True, check=True)
    measured = json.loads(out.stdout.strip().splitlines()[-1])["delta"]
    work = Workload(n_images=n, batch=n, syn_steps=steps, num_classes=10)
    est = estimate_peak_bytes(cifar_profile(), work, mode, micro, CPU, impl="fastgrad").transient_bytes
    assert 1 / ESTIMATE_ERROR <= measured / est <= ESTIMATE_ERROR, (measured, est)


def test_check_fits_refuses_only_what_cannot_fit() -> None:
    prof = cifar_profile()
    small = Workload(n_images=100, batch=100, syn_steps=20, num_classes=10)
    assert check_fits(prof, small, "constant", CPU, available=8 * 10**9) is None
    # --ipc 99999999999 on CIFAR-10: the images alone are 12 TB.
    huge = Workload(n_images=99999999999 * 10, batch=99999999999 * 10, syn_steps=20, num_classes=10)
    why = check_fits(prof, huge, "constant", CPU, available=8 * 10**9)
    assert why is not None and why.term == "synthetic images and momentum"
    assert why.term_bytes == 2 * 99999999999 * 10 * 3 * 32 * 32 * 4
    # --syn-steps 10**9: the steps' pre-sampled draws alone are terabytes, even in 1-image chunks.
    steps = Workload(n_images=100, batch=100, syn_steps=10**9, num_classes=10)
    why = check_fits(prof, steps, "constant", CPU, available=8 * 10**9)
    assert why is not None and why.term == "inner steps' batches and augmentation draws"
    # The margin: a run whose smallest estimate is within ESTIMATE_ERROR of the memory is let through.
    need = smallest_peak(prof, small, "constant", CPU).total_bytes
    assert check_fits(prof, small, "constant", CPU, available=int(need / ESTIMATE_ERROR) + 1) is None
    assert check_fits(prof, small, "constant", CPU, available=int(need / ESTIMATE_ERROR) - 1) is not None
    # A fixed micro-batch is what the run will use: its estimate, not the 1-image one.
    assert smallest_peak(prof, small, "constant", CPU, micro_batch=50).micro_batch == 50
    assert smallest_peak(prof, small, "constant", CPU).micro_batch == 1


def test_sizes_in_and_out() -> None:
    assert parse_size("24GB") == 24 * 10**9 and parse_size("80 GiB") == 80 * 2**30
    assert parse_size("1.5T") == 15 * 10**11 and parse_size("512MiB") == 512 * 2**20
    for bad in ("", "GB", "-1GB", "12 parsecs", "nan", "1e999GB"):
        with pytest.raises(ValueError):
            parse_size(bad)
    assert size_text(8 * 10**12) == "8.0 TB" and size_text(812 * 10**6) == "812.0 MB" and size_text(12) == "12 B"
