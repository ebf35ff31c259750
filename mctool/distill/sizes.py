"""What a distillation would allocate, known and checked before anything is allocated.

* ``shape_of_buffer`` / ``shape_without_buffer``: the dataset's image shape and class count, the
  network, the expert vectors and the data on the device — from a buffer's metadata, or, for
  ``--dry-run`` without a buffer, from the preset's dataset (``mctool.data.datasets.SHAPES``/``CLASSES``)
  and the preset's or the options' ConvNet.
* ``check_epochs``: every epoch setting against the experts' K, one rule for all of them.
* ``check_sizes``: ipc × classes × image, the inner steps and the micro-batch against the
  device's memory by the memory model behind ``--dry-run`` (mctool.matching.memory), so that
  ``--ipc 99999999999`` or ``--syn-steps 1000000000`` is one line, exit 2, instead of an attempt
  to allocate terabytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from mctool import store
from mctool.core.errors import UsageError
from mctool.models import ModelSpec, default_depth

PAPER_WIDTH = 128  # the ConvNet of MTT/MCT (method.md §2.1)
SCRIPTS_EPOCHS = 50  # the scripts' expert length (buffer.py --train_epochs), for --method mtt without a buffer


@dataclass(frozen=True)
class RunShape:
    """What the memory model needs about the data, the network and the experts of a run."""

    dataset: str
    image_shape: tuple[int, int, int]
    classes: int
    spec: ModelSpec
    vectors: int  # P-vectors of one expert on the device (waypoints, or K+1 snapshots)
    data_bytes: int  # the train/test splits on the device (0: not known before loading)
    epochs: int | None  # the experts' K (None: no buffer)
    notes: tuple[str, ...] = ()


def _split_bytes(name: str, image_shape: tuple[int, int, int]) -> tuple[int, list[str]]:
    from mctool.matching import memory
    from mctool.data.datasets import SPLIT_SIZES

    split = SPLIT_SIZES.get(name)
    if split is None:
        return 0, [f"the size of '{name}' is not known before loading it: its train/test tensors on the device are "
                   "not counted"]
    return memory.split_bytes(*split, image_shape), []


def shape_of_buffer(cfg: Any, buf: store.Buffer) -> RunShape:
    """The run's shape from an open buffer's metadata (no experts' values read)."""
    data, notes = _split_bytes(buf.data.name, buf.data.image_shape)
    if cfg.method == "mct":
        vectors, epochs = len(buf.convex.meta.positions), int(buf.convex.meta.epochs)
    else:
        epochs = int(buf.require_experts().epochs)
        vectors = epochs + 1
    return RunShape(buf.data.name, buf.data.image_shape, buf.data.num_classes, buf.spec, vectors, data, epochs,
                    tuple(notes))


def shape_without_buffer(cfg: Any, width: int | None = None, depth: int | None = None) -> RunShape:
    """The run's shape from the settings alone: the preset's dataset (its shape and classes are known
    without the data), the ConvNet of the preset's depth (or --depth) and --width (default 128)."""
    from mctool.data.datasets import CLASSES, SHAPES, canonical_name

    if not cfg.dataset:
        raise UsageError("--dry-run without a buffer needs a dataset: pass --preset (e.g. --preset cifar10-ipc10), "
                         "or --buffer FILE")
    name = canonical_name(cfg.dataset)
    if name not in SHAPES:
        raise UsageError(f"--dry-run without a buffer: the shape of '{cfg.dataset}' is not known before loading it; "
                         "pass --buffer FILE")
    shape, classes = SHAPES[name], CLASSES[name]
    if width is not None and not 1 <= width <= 4096:
        raise UsageError(f"--width must be between 1 and 4096, got {width}")
    d = depth or cfg.depth or default_depth(shape[1], shape[2])
    if not 1 <= d <= 8 or shape[1] >> d < 1:
        raise UsageError(f"--depth {d}: a ConvNet for {shape[1]}×{shape[2]} images has depth 1 to "
                         f"{min(8, int(math.log2(shape[1])))}")
    spec = ModelSpec(depth=d, width=width or PAPER_WIDTH, channels=shape[0], num_classes=classes,
                     im_size=(shape[1], shape[2]))
    notes = [f"no buffer: {name} ({shape[0]}×{shape[1]}×{shape[2]}, {classes} classes) and a ConvNet of depth {d}, "
             f"width {spec.width}" + ("" if width else " (the paper's; --width to change)")]
    if cfg.method == "mct":
        vectors = cfg.interior + 2
    else:
        vectors = SCRIPTS_EPOCHS + 1
        notes.append(f"--method mtt keeps a whole trajectory on the device: K = {SCRIPTS_EPOCHS} assumed (the "
                     "scripts' experts)")
    data, more = _split_bytes(name, shape)
    return RunShape(name, shape, classes, spec, vectors, data, None, tuple(notes + more))


def workload(cfg: Any, shape: RunShape, data_loaded: bool = False) -> Any:
    """The memory model's description of one iteration (data counted unless already on the device)."""
    from mctool.matching.memory import Workload

    n = cfg.ipc * shape.classes
    return Workload(n_images=n, batch=min(cfg.batch_syn or n, n), syn_steps=cfg.syn_steps, num_classes=shape.classes,
                    # learned labels (branch `labels`: cfg.learn_labels) are stored as probabilities too
                    soft_labels=cfg.soft_labels or bool(getattr(cfg, "learn_labels", False)),
                    expert_vectors=shape.vectors,
                    data_bytes=0 if data_loaded else shape.data_bytes)


def profile(shape: RunShape) -> Any:
    """The network's parameters and activations, counted on the meta device (nothing allocated)."""
    from mctool.matching import memory
    from mctool.models import build_model

    with torch.device("meta"):
        module = build_model(shape.spec)
    return memory.profile_network(module, shape.image_shape)


# --------------------------------------------------------------------------- checks


def check_epochs(cfg: Any, epochs: int) -> None:
    """Every epoch setting against the experts' K, by one rule: a setting past K is refused, naming
    the largest value that works (no setting is clamped silently)."""
    from mctool.distill.config import DistillConfig
    from mctool.core.settings import option_name

    def refuse(key: str, value: float, bound: str, largest: float) -> None:
        longer = f", or train experts with --epochs {int(value) + 1} or more" if value < 10_000 else ""
        raise UsageError(f"{option_name(DistillConfig, key)} {value:g} must be {bound} the experts' K = {epochs}: "
                         f"pass {option_name(DistillConfig, key)} {largest:g} or less{longer}")

    if cfg.max_start_epoch >= epochs:  # a start at θ_K leaves nothing to match
        refuse("max_start_epoch", cfg.max_start_epoch, "below", max(epochs - 1, 0))
    if cfg.expert_epochs > epochs:  # every target would be θ_K, whatever the setting says
        refuse("expert_epochs", cfg.expert_epochs, "at most", epochs)


# The option to blame for each term of the estimate (None: not a setting of this run).
_CAUSES = {
    "synthetic images and momentum": "ipc", "image gradient": "ipc", "labels": "ipc",
    "inner steps' batches and augmentation draws": "syn_steps", "activations (all steps' graphs)": "syn_steps",
    "activations (one micro-batch)": "micro_batch", "parameter vectors": "syn_steps",
}


def check_sizes(cfg: Any, shape: RunShape, device: torch.device, data_loaded: bool = False,
                given: set[str] | None = None, available: int | None = None) -> None:
    """Refuse, before anything is allocated, settings whose smallest iteration cannot fit the device's
    memory (by the memory model of --dry-run, with its error margin): one line naming the setting,
    and the preset when the value is the preset's (not in `given`, the options; None: not known)."""
    from mctool.matching import memory
    from mctool.distill.config import DistillConfig
    from mctool.core.settings import option_name

    work = workload(cfg, shape, data_loaded)
    mode = "unrolled" if cfg.method == "mtt" else cfg.grad
    fixed = None if cfg.micro_batch == "auto" else (int(cfg.micro_batch) or work.batch)
    why = memory.check_fits(profile(shape), work, mode, device, available, fixed)
    if why is None:
        return
    key = _CAUSES.get(why.term)
    if why.term == "parameter vectors" and mode == "constant":
        key = None
    if key == "micro_batch" and fixed is None:
        key = None  # auto already takes 1-image chunks: one image's activations are too many (the network)
    head = ""
    if key is not None:
        from_preset = given is not None and key not in given and cfg.preset
        head = f"{option_name(DistillConfig, key)} {getattr(cfg, key)}" + (f" (preset {cfg.preset})" if from_preset
                                                                           else "")
    what = {"ipc": f"{cfg.ipc} × {shape.classes} images of {'×'.join(map(str, shape.image_shape))}",
            "syn_steps": f"{cfg.syn_steps} inner steps"}.get(key or "", "one iteration")
    verb = "needs" if what == "one iteration" else "need"
    raise UsageError(f"{head + ': ' if head else ''}{what} {verb} at least {memory.size_text(why.need)} ({why.term}: "
                     f"{memory.size_text(why.term_bytes)}), more than the {memory.size_text(why.available)} free on "
                     f"{device.type}; `mctool distill --dry-run` shows the estimate")
