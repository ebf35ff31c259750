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
                ``unrolled``: the graph of all N steps, c_u·N·A·s·B (chunks do not shrink it), and
                the final backward's temporaries, c_b·A·s·m (one chunk at a time)
    workspaces  a fixed allowance for the libraries' buffers (and the CPU heap's fragmentation)
    steps       the batch indices and DSA draws pre-sampled for every inner step (both passes and every
                micro-batch must see the same ones): N·(o + b·B), o and b measured

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

from mctool.matching.fastgrad import plan_for
from mctool.models.functional import FlatNet
from mctool.matching.microbatch import sample_coupling

MODES = ("constant", "adjoint", "unrolled")

# Bytes of activations per image of one inner step, in units of A·s, by (device type, kind).
# Kinds: "fastgrad"/"autograd" = the second-order step of ``constant`` (g and the image term),
# "fastgrad-hvp"/"autograd-hvp" = that of ``adjoint`` (also H·v), "first" = a plain gradient
# step (pass 1), "unrolled" = one step of the unrolled graph (kept until the final backward),
# "unrolled-backward" = the temporaries of that final backward (per image of a batch).
# CPU: bench/memory.py on the project's 2-core machine (2026-12): two runs × the CIFAR (3×32×32,
# depth 3) and Tiny ImageNet (3×64×64, depth 4) ConvNets at width 128 × micro-batches of 32–256.
# The glibc heap makes single points vary (fastgrad: 1.65–2.91, median 1.99); the table takes
# about the upper quartile of the points, so most estimates err a little high.
ACTIVATION_FACTORS: dict[tuple[str, str], float] = {
    ("cpu", "first"): 1.3,
    ("cpu", "fastgrad"): 2.15,
    ("cpu", "fastgrad-hvp"): 2.2,
    ("cpu", "autograd"): 3.9,
    ("cpu", "autograd-hvp"): 4.2,
    ("cpu", "unrolled"): 1.8,  # fits per kept step: 1.29–1.96
    ("cpu", "unrolled-backward"): 2.5,  # fits 0.84–3.85 (with intercepts of −0.6 to +0.1 GiB)
}
# P-sized vectors alive at the peak of ``constant``/``adjoint`` besides the stored path.
VECTOR_FACTOR = 8.0
# Fixed bytes of an iteration besides tensors: the libraries' workspaces and caches, and on the CPU
# the heap's fragmentation (calibration intercepts: mostly 60–140 MiB, up to 350 MiB).
WORKSPACE_BYTES = {"cpu": 96 * 2**20, "cuda": 64 * 2**20}
CALIBRATED = {"cpu": True, "cuda": False}  # False: that device type uses the CPU's factors
ESTIMATE_ERROR = 1.5  # measured/estimated stayed within [1/1.5, 1.5] (single points; iterations 0.8–1.2)
DEFAULT_SAFETY = {"cpu": 0.6, "cuda": 0.85}  # fraction of free memory an estimate may use
# The per-step bookkeeping of distill's `batches`/`augmentation`: measured on the CPU (2026-12,
# 20000 steps of CIFAR-shaped draws at B = 10, 100, 1000 images): 2.0–2.8 KB of Python and tensor
# objects per step, plus 14–16 bytes per image (the int64 indices and one op's values; ops with
# two values take 24).
STEP_OVERHEAD_BYTES = 2560
STEP_BYTES_PER_IMAGE = 24


@dataclass(frozen=True)
class NetProfile:
    """What the memory model needs to know about a network."""

    num_params: int
    image_shape: tuple[int, int, int]  # C, H, W
    act_elems: int  # Σ leaf-module output elements per image
    fastgrad: bool  # mctool.matching.fastgrad's sweep applies
    coupling: str | None  # why micro-batches are refused (mctool.matching.microbatch.sample_coupling), or None

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
    transient = {"image gradient": n * profile.in_elems * s, "workspaces": WORKSPACE_BYTES.get(dev, 0),
                 "inner steps' batches and augmentation draws": steps * (STEP_OVERHEAD_BYTES + STEP_BYTES_PER_IMAGE * b)}
    if mode == "unrolled":
        transient["parameter vectors"] = int((VECTOR_FACTOR + 2 * steps) * p * s)
        # Every chunk's graph is kept; the final backward's temporaries are one chunk's at a time.
        graph = _factor(dev, "unrolled") * steps * b + _factor(dev, "unrolled-backward") * m
        transient["activations (all steps' graphs)"] = int(graph * per_act)
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
    memory; a dry run before loading counts everything. Networks that couple samples are never
    chunked, nor is anything that would not fit even in 1-image chunks (``unrolled`` keeps every
    step's graph); `fits` says whether the result fits.
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
    if profile.coupling is not None:
        return result(b, f"not chunked: {profile.coupling}")
    if need(b) <= budget:
        return result(b, "whole batches fit")
    if need(1) > budget:
        why = "unrolled keeps every step's graph" if mode == "unrolled" else "the rest of the iteration is too large"
        return result(b, f"does not fit at any micro-batch ({why}): whole batches")
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


# --------------------------------------------------------------------------- sizes checked before allocating


def size_text(n: float) -> str:
    """Bytes for people: '812 MB', '7.3 GB', '8.0 TB' (powers of 1000, as disks and options say)."""
    for unit, scale in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """'24GB', '80 GiB', '512MiB', '1.5T' → bytes; ValueError with the accepted forms otherwise."""
    import re

    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS:
        raise ValueError(f"{text!r} is not a memory size (e.g. 24GB, 80GiB, 512MiB)")
    value = float(m.group(1)) * _UNITS[unit]
    if not (math.isfinite(value) and 1 <= value < 2**70):
        raise ValueError(f"{text!r} is not a plausible memory size")
    return int(value)


def smallest_peak(profile: NetProfile, work: Workload, mode: str, device: torch.device | str,
                  micro_batch: int | None = None, impl: str = "auto") -> Estimate:
    """The least memory an iteration of these settings can take: at `micro_batch` when one is fixed,
    else in 1-image chunks (whole batches for a network that mixes samples, which is never chunked)."""
    if micro_batch is None:
        micro_batch = work.batch if profile.coupling is not None else 1
    return estimate_peak_bytes(profile, work, mode, micro_batch, device, impl)


@dataclass(frozen=True)
class TooLarge:
    """Settings whose least possible iteration exceeds the memory there is, and the term that dominates."""

    need: int  # bytes: the smallest peak estimate
    available: int  # bytes: the memory it was compared with
    term: str  # the estimate's largest term (a key of Estimate.resident/transient)
    term_bytes: int
    estimate: Estimate


def check_fits(profile: NetProfile, work: Workload, mode: str, device: torch.device | str,
               available: int | None = None, micro_batch: int | None = None, impl: str = "auto") -> TooLarge | None:
    """None when these settings can run in `available` bytes (default: the device's free memory), else why not.

    Refused only when even the smallest peak, divided by the model's worst error (ESTIMATE_ERROR),
    exceeds the memory: a run that might fit is never refused. Nothing is allocated: the caller
    checks this before the data, the images or the steps' draws exist."""
    available = free_bytes(device) if available is None else available
    if available is None:
        return None
    est = smallest_peak(profile, work, mode, device, micro_batch, impl)
    if est.total_bytes <= available * ESTIMATE_ERROR:
        return None
    terms = {**est.resident, **est.transient}
    term = max(terms, key=lambda k: terms[k])
    return TooLarge(est.total_bytes, available, term, terms[term], est)
