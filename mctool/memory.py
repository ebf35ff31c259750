r"""Peak memory of a distillation iteration, free memory, and the micro-batch that fits.

The model (bytes; s = bytes per element, I = C·H·W per image, A = activation elements per
image = Σ of every leaf module's output size for one image, P = parameters, n = synthetic
images, B = images per inner step, m = micro-batch (m = B unchunked), N = inner steps):

resident, allocated before the first iteration and kept
    data        the training and test splits, which live on the device today (the caller
                passes their size: ``split_bytes``); on the CPU the decoded dataset is a second copy
    images      X and its momentum buffer: 2·n·I·s, plus the labels (n int64 or n·classes·s)
    expert      the waypoints of the expert being matched: V·P·s (V = waypoints, or K+1 rows of
                a full trajectory)
transient, per iteration (freed at its end)
    image grad  dL/dX: n·I·s
    vectors     θ_s, θ_T, G, v, w_k, g_k, … : c_vec·P·s;  ``adjoint`` adds its stored w_0…w_N:
                (N+1)·P·s;  ``unrolled`` keeps w_k and g_k of every step in its graph: 2·N·P·s
    activations ``constant``/``adjoint``: one chunk's second-order step, c·A·s·m (c by device,
                implementation and mode — the Hessian-vector product of ``adjoint`` keeps more);
                ``unrolled``: the graph of all N steps, c_u·A·s·B·N (chunks do not shrink it)

The activation constants c were calibrated by measurement (bench/memory.py: the peak of one
inner step in a fresh process at two micro-batch sizes; CPU: ru_maxrss with the CLI's malloc
tuning; CUDA: torch.cuda.max_memory_allocated) on the ConvNet of the presets; for other
networks A is counted exactly but c is the ConvNet's, so the estimate is rougher. Measured
iterations were within ESTIMATE_ERROR of the estimate (tests/test_memory.py, bench/distill.py).
The CUDA constants are the CPU's until bench/memory.py has been run on a GPU (CALIBRATED).
"""

from __future__ import annotations

import copy
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mctool.fastgrad import plan_for
from mctool.functional import FlatNet
from mctool.microbatch import sample_coupling

MODES = ("constant", "adjoint", "unrolled")

# Bytes of activations per image of one inner step, in units of A·s, by (device type, kind).
# Kinds: "fastgrad"/"autograd" = the second-order step of ``constant`` (g and the image term),
# "fastgrad-hvp"/"autograd-hvp" = that of ``adjoint`` (also H·v), "first" = a plain gradient
# step (pass 1), "unrolled" = one step of the unrolled graph (kept until the final backward).
ACTIVATION_FACTORS: dict[tuple[str, str], float] = {
    ("cpu", "first"): 2.0,
    ("cpu", "fastgrad"): 3.0,
    ("cpu", "fastgrad-hvp"): 3.5,
    ("cpu", "autograd"): 4.0,
    ("cpu", "autograd-hvp"): 4.5,
    ("cpu", "unrolled"): 3.0,
}
# P-sized vectors alive at the peak of ``constant``/``adjoint`` besides the stored path.
VECTOR_FACTOR = 8.0
CALIBRATED = {"cpu": False, "cuda": False}  # False: the table is a placeholder for that device type
ESTIMATE_ERROR = 1.5  # measured/estimated peak stayed within [1/1.5, 1.5] in calibration
DEFAULT_SAFETY = {"cpu": 0.6, "cuda": 0.85}  # fraction of free memory an estimate may use


@dataclass(frozen=True)
class NetProfile:
    """What the memory model needs to know about a network."""

    num_params: int
    image_shape: tuple[int, int, int]  # C, H, W
    act_elems: int  # Σ leaf-module output elements per image
    fastgrad: bool  # mctool.fastgrad's sweep applies
    coupling: str | None  # why micro-batches are refused (mctool.microbatch.sample_coupling), or None

    @property
    def in_elems(self) -> int:
        return math.prod(self.image_shape)


def profile_network(module: nn.Module, image_shape: tuple[int, int, int]) -> NetProfile:
    """Count parameters and per-image activations by one forward of a 2-image batch on the meta device."""
    meta = copy.deepcopy(module).to("meta")  # no memory, no compute; the caller's module untouched
    total = 0

    def count(_mod: nn.Module, _inp: object, out: object) -> None:
        nonlocal total
        if isinstance(out, torch.Tensor):
            total += out.numel()

    for sub in meta.modules():
        if not any(True for _ in sub.children()):
            sub.register_forward_hook(count)
    with torch.no_grad():
        meta(torch.empty((2, *image_shape), device="meta"))
    return NetProfile(
        num_params=sum(p.numel() for p in module.parameters()),
        image_shape=tuple(int(d) for d in image_shape),  # type: ignore[arg-type]
        act_elems=total // 2,
        fastgrad=plan_for(FlatNet(module)) is not None,
        coupling=sample_coupling(module),
    )


@dataclass(frozen=True)
class Workload:
    """The distillation setting whose iteration is estimated."""

    n_images: int  # synthetic images (ipc · classes)
    batch: int  # images per inner step |B_k| (batch_syn, or n_images when 0)
    syn_steps: int  # N
    num_classes: int
    soft_labels: bool = False
    expert_vectors: int = 4  # P-vectors of the matched expert on the device (waypoints or K+1)
    data_bytes: int = 0  # training/test split on the device (split_bytes)
    itemsize: int = 4  # float32


def split_bytes(n_train: int, n_test: int, image_shape: tuple[int, int, int], itemsize: int = 4) -> int:
    """Bytes of the preprocessed train and test images and their int64 labels."""
    return (n_train + n_test) * (math.prod(image_shape) * itemsize + 8)


@dataclass(frozen=True)
class Estimate:
    """Estimated peak of one iteration, by term (bytes)."""

    mode: str
    micro_batch: int  # images per chunk (= batch when unchunked)
    impl: str  # second-order implementation assumed ("fastgrad", "autograd", or "-" for unrolled)
    resident: dict[str, int] = field(default_factory=dict)
    transient: dict[str, int] = field(default_factory=dict)

    @property
    def resident_bytes(self) -> int:
        return sum(self.resident.values())

    @property
    def transient_bytes(self) -> int:
        return sum(self.transient.values())

    @property
    def total_bytes(self) -> int:
        return self.resident_bytes + self.transient_bytes


def _factor(device_type: str, kind: str) -> float:
    table = ACTIVATION_FACTORS
    return table.get((device_type, kind), table[("cpu", kind)])


def _impls(profile: NetProfile, impl: str) -> list[str]:
    if not profile.fastgrad:
        return ["autograd"]
    return ["fastgrad", "autograd"] if impl == "auto" else [impl]


def estimate_peak_bytes(profile: NetProfile, work: Workload, mode: str, micro_batch: int | None,
                        device: torch.device | str, impl: str = "auto") -> Estimate:
    """The iteration's peak by the model in the module docstring.

    `micro_batch` None/0 means whole batches. `impl` is the second-order implementation:
    "fastgrad", "autograd", or "auto" (the larger of the two, since policy "auto" runs both
    once to time them).
    """
    if mode not in MODES:
        raise ValueError(f"unknown matching mode {mode!r}; choose from {', '.join(MODES)}")
    dev = torch.device(device).type
    s, n, b, steps, p = work.itemsize, work.n_images, work.batch, work.syn_steps, profile.num_params
    m = min(micro_batch or b, b)
    per_act = profile.act_elems * s
    resident = {
        "data on the device": work.data_bytes,
        "synthetic images and momentum": 2 * n * profile.in_elems * s,
        "labels": n * (work.num_classes * s if work.soft_labels else 8),
        "expert waypoints": work.expert_vectors * p * s,
    }
    transient = {"image gradient": n * profile.in_elems * s}
    if mode == "unrolled":
        transient["parameter vectors"] = int((VECTOR_FACTOR + 2 * steps) * p * s)
        transient["activations (all steps' graphs)"] = int(_factor(dev, "unrolled") * per_act * b * steps)
        return Estimate(mode, m, "-", resident, transient)
    vectors = VECTOR_FACTOR * p * s + ((steps + 1) * p * s if mode == "adjoint" else 0)
    transient["parameter vectors"] = int(vectors)
    hvp = "-hvp" if mode == "adjoint" else ""
    kinds = _impls(profile, impl)
    second = max(_factor(dev, k + hvp) for k in kinds)
    factor = max(second, _factor(dev, "first"))
    transient["activations (one micro-batch)"] = int(factor * per_act * m)
    return Estimate(mode, m, kinds[0] if len(kinds) == 1 else "auto", resident, transient)


def free_bytes(device: torch.device | str) -> int | None:
    """Memory a new allocation on `device` can use now, or None when it cannot be told.

    CUDA: the driver's free memory plus what PyTorch's caching allocator holds unused.
    CPU: MemAvailable from /proc/meminfo (Linux); elsewhere the available physical pages
    (os.sysconf) where the OS reports them.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        cached = torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
        return int(free + cached)
    if dev.type != "cpu":
        return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        if sys.platform != "win32":
            return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        pass
    return None


@dataclass(frozen=True)
class AutoChoice:
    """The micro-batch `auto` picks and the estimate behind it."""

    micro_batch: int  # images per chunk (= batch: no chunking)
    estimate: Estimate
    budget_bytes: int | None  # safety · free memory the estimate had to fit (None: unknown)
    fits: bool  # the chosen estimate is within the budget
    why: str  # one line: how it was chosen


def auto_micro_batch(profile: NetProfile, work: Workload, mode: str, device: torch.device | str,
                     free: int | None = None, safety: float | None = None, resident_loaded: bool = True,
                     impl: str = "auto") -> AutoChoice:
    """The largest micro-batch whose estimate fits `safety` × free memory, evened out over the chunks.

    `free` defaults to ``free_bytes(device)``. With `resident_loaded` (a run that has already
    put its data, images and expert on the device) only the transient terms must fit the free
    memory; a dry run before loading counts everything. ``unrolled`` and networks that couple
    samples are never chunked (no memory to gain / not allowed); `fits` says whether that fits.
    """
    dev = torch.device(device).type
    b = work.batch
    free = free_bytes(device) if free is None else free
    safety = DEFAULT_SAFETY.get(dev, 0.6) if safety is None else safety
    budget = None if free is None else int(safety * free)

    def need(m: int) -> int:
        est = estimate_peak_bytes(profile, work, mode, m, device, impl)
        return est.transient_bytes if resident_loaded else est.total_bytes

    def result(m: int, why: str) -> AutoChoice:
        est = estimate_peak_bytes(profile, work, mode, m, device, impl)
        return AutoChoice(m, est, budget, budget is None or need(m) <= budget, why)

    if budget is None:
        return result(b, "free memory unknown on this device: whole batches")
    if mode == "unrolled":
        return result(b, "unrolled keeps every chunk's graph: micro-batches would not lower its memory")
    if profile.coupling is not None:
        return result(b, f"not chunked: {profile.coupling}")
    if need(b) <= budget:
        return result(b, "whole batches fit")
    if need(1) > budget:
        return result(1, "even one image per micro-batch exceeds the budget")
    lo, hi = 1, b  # need(lo) fits, need(hi) does not; the estimate grows with m
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if need(mid) <= budget else (lo, mid)
    pieces = math.ceil(b / lo)
    m = math.ceil(b / pieces)  # same number of chunks, sizes as equal as possible (≤ lo)
    return result(m, f"largest micro-batch within {safety:.0%} of free memory, in {pieces} chunks")


@dataclass(frozen=True)
class DryRun:
    """What `mctool distill --dry-run` reports for one gradient mode."""

    mode: str
    whole: Estimate  # the iteration without micro-batches
    auto: AutoChoice  # what --micro-batch auto would do
    free_bytes: int | None


def dry_run(profile: NetProfile, work: Workload, device: torch.device | str, modes: tuple[str, ...] = MODES,
            free: int | None = None, safety: float | None = None, impl: str = "auto") -> list[DryRun]:
    """Per mode: the unchunked estimate and auto's micro-batch, counting resident data (nothing is loaded yet)."""
    free = free_bytes(device) if free is None else free
    out = []
    for mode in modes:
        whole = estimate_peak_bytes(profile, work, mode, None, device, impl)
        auto = auto_micro_batch(profile, work, mode, device, free, safety, resident_loaded=False, impl=impl)
        out.append(DryRun(mode, whole, auto, free))
    return out
