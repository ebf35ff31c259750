"""/synsets/<name>: synthetic images and labels, their learned step size, evaluations, the
checkpoint a run resumes from, and the best images a periodic evaluation selected."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np
import torch

from mctool.core.errors import ArtifactError, FileBusy
from mctool.store.fields import Fields
from mctool.store.files import clean_text, create, reading, require_group, rewrite, shown
from mctool.store.meta import DatasetMeta, write_dataset, write_model

if TYPE_CHECKING:
    from mctool.models import Layout, ModelSpec

MAX_IMAGES = 10_000_000
SELECTED_ON = ("validation", "test")
_MAX_RANKS = 4096
_MAX_EXPERT = 1_000_000
# torch's CPU generator state (mt19937 plus the normal-sampling cache) is this many bytes.
_GENERATOR_STATE_BYTES = int(torch.Generator().get_state().numel())


@dataclass(frozen=True)
class Learned:
    """How a checkpoint stores one array or number of the learnables' state (a momentum, or a
    learned value the synset does not store as it is): a dataset shaped like the images
    ("images", [n, C, H, W]) or like soft labels ("labels", [n, classes]), or a float attribute
    ("scalar")."""

    name: str
    shape: str  # "images", "labels" or "scalar"
    required: bool = True  # False: absent from runs that do not learn it (and from earlier releases)


# What a checkpoint may hold of the learnables (mctool/distill/learnables.py says which learnable
# each belongs to). A learnable with new state adds its entry here; reading, checking and writing
# iterate over this table (docs/format.md).
CHECKPOINT_LEARNED = (Learned("images_velocity", "images"), Learned("alpha_velocity", "scalar"),
                      Learned("images_raw", "images", required=False),  # the raw images under `distill --ema`
                      Learned("label_logits", "labels", required=False),
                      Learned("label_logits_velocity", "labels", required=False),
                      Learned("label_logits_raw", "labels", required=False))  # the raw logits under --ema


@dataclass
class Checkpoint:
    """What a distillation needs besides the images to continue bit for bit."""

    learned: dict[str, torch.Tensor | float]  # CHECKPOINT_LEARNED name -> tensor ("images", "labels") or float
    generators: list[torch.Tensor]  # one CPU generator state (uint8) per rank
    queues: list[list[int]]  # per rank: experts left in the current shuffled pass
    run: dict[str, Any] = field(default_factory=dict)  # choices a resume must repeat (micro-batch, second order)

    @property
    def images_velocity(self) -> torch.Tensor:
        """The images' momentum."""
        value = self.learned["images_velocity"]
        assert isinstance(value, torch.Tensor)
        return value

    @property
    def alpha_velocity(self) -> float:
        """The step size's momentum."""
        return float(self.learned["alpha_velocity"])


@dataclass
class BestImages:
    """The images that scored best at a periodic evaluation, with how they were chosen."""

    images: torch.Tensor
    labels: torch.Tensor
    lr: float
    iteration: int
    selected_on: str  # "validation" (default) or "test" (the authors' protocol)
    score: dict[str, Any]  # the evaluation that selected them (mean, std, accuracies, runs, epochs, ...)


@dataclass
class Synset:
    """One synthetic set as stored; `images`/`labels` are the final state of the run."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    lr: float
    ipc: int
    method: str = "mct"
    grad: str = "constant"
    preset: str = ""
    iterations: int = 0
    complete: bool = True
    skipped: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    experts_reference: dict[str, Any] | None = None
    loss: list[float] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    checkpoint: Checkpoint | None = None
    best: BestImages | None = None

    @property
    def soft_labels(self) -> bool:
        """Whether the labels are probabilities [N, classes] rather than class indices [N]."""
        return self.labels.dim() == 2


def class_major_labels(classes: int, ipc: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Hard labels of a class-major set (int64 [classes · ipc]): ipc images of class 0, then class 1, …
    (how distill draws and keeps its images, and how MTT, MCT and DD-Ranking lay out theirs)."""
    return torch.arange(classes, device=device).repeat_interleave(ipc)


def image_classes(labels: torch.Tensor, ipc: int) -> torch.Tensor:
    """The class each image of a synset belongs to (int64 [N]): its hard label, or for soft labels
    [N, classes] the class of its block, images being stored class-major (a distilled synset,
    with hard or soft labels alike; an imported soft-label set's order is not known)."""
    if labels.dim() == 1:
        return labels
    return class_major_labels(labels.shape[1], ipc, labels.device)


def synset_names(f: h5py.File, path: str | os.PathLike[str] | None = None) -> list[str]:
    """Names of the synthetic sets in the file (a /synsets that is not a group of groups, or a
    name mctool would not write, is refused)."""
    if "synsets" not in f:
        return []
    where = path if path is not None else f.filename
    with reading(where):
        return _synset_names(f, where)


def _synset_names(f: h5py.File, where: str | os.PathLike[str]) -> list[str]:
    root = require_group(where, f, "synsets")
    for name in root:
        if not isinstance(root[name], h5py.Group):
            raise ArtifactError(f"{shown(where)}: /synsets/{clean_text(name)} must be a group, got a dataset")
        if clean_text(name) != name or "/" in name:
            raise ArtifactError(f"{shown(where)}: /synsets/{clean_text(name)}: a synset name may not hold control "
                                "characters")
    return sorted(root)


def pick_name(path: str | os.PathLike[str], f: h5py.File, name: str | None) -> str:
    """The synset `name`, or the only/latest one when `name` is None."""
    names = synset_names(f, path)
    if not names:
        if "synsets" not in f and ("experts" in f or "convex" in f):
            raise ArtifactError(f"{shown(path)}: no synthetic sets in this file (a buffer of experts) — run "
                                f"`mctool distill --buffer {shown(path)}` to make one")
        raise ArtifactError(f"{shown(path)}: no synthetic sets in this file — run `mctool distill` first")
    if name is None:
        if len(names) == 1:
            return names[0]
        created = {n: Fields(path, f["synsets"][n]).str("created", default="") for n in names}
        return max(names, key=lambda n: created[n])
    if name not in names:
        raise ArtifactError(f"{shown(path)}: no synset named '{clean_text(name)}' (has: "
                            f"{', '.join(clean_text(n) for n in names)}; choose one with --name)")
    return name


def _images_and_labels(r: Fields, data: DatasetMeta, ipc: int, values: bool) -> tuple[torch.Tensor, torch.Tensor]:
    c, h, w = data.image_shape
    n = ipc * data.num_classes
    if n > MAX_IMAGES:
        raise r.problem("ipc", f"{ipc} images per class is implausible")
    shape = [n, c, h, w]
    if not r.has("labels"):
        raise r.problem("labels", "missing", attribute=False)
    labels_ds = r.dataset("labels", "iuf", [n] if _ndim(r.group["labels"]) == 1 else [n, data.num_classes])
    if values:
        images = torch.from_numpy(r.array("images", "f", shape, finite=True).astype(np.float32, copy=False))
    else:  # only the shape (and that the file stores them): images can be large; labels are small
        ds = r.dataset("images", "f", shape)
        r.stored("images", ds, math.prod(shape) * ds.dtype.itemsize)
        images = torch.empty(0)
    if labels_ds.ndim == 1:
        if labels_ds.dtype.kind not in "iu":
            raise r.problem("labels", "hard labels must be integers", attribute=False)
        labels = r.array("labels", "iu", [n]).astype(np.int64)
        if labels.size and (labels.min() < 0 or labels.max() >= data.num_classes):
            raise r.problem("labels", f"holds class {int(labels.max()) if labels.max() >= data.num_classes else int(labels.min())}"
                                      f" outside 0..{data.num_classes - 1}", attribute=False)
    else:
        labels = r.array("labels", "f", [n, data.num_classes], finite=True).astype(np.float32)
        if labels.size and (labels.min() < 0 or np.abs(labels.sum(1) - 1).max() > 1e-3):
            raise r.problem("labels", "soft labels must be probabilities (non-negative, rows summing to 1)",
                            attribute=False)
    return images, torch.from_numpy(labels)


def _ndim(obj: h5py.HLObject) -> int:
    return obj.ndim if isinstance(obj, h5py.Dataset) else -1


def read_synset(path: str | os.PathLike[str], f: h5py.File, name: str, data: DatasetMeta,
                values: bool = True, checkpoint: bool = False) -> Synset:
    """Read and check synset `name` against /dataset (image shape, label range, finite values)
    with its best images and checkpoint.

    `values=False` checks everything but the values of images and velocities (images left
    empty); `checkpoint` also returns the resumable state."""
    g = require_group(path, f, f"synsets/{name}")
    r = Fields(path, g)
    ipc = r.int("ipc", 1, MAX_IMAGES)
    images, labels = _images_and_labels(r, data, ipc, values)
    iterations = r.int("iterations", 0)
    loss = r.array("loss", "f", [None]) if r.has("loss") else np.zeros(0, np.float32)
    r.provenance()
    syn = Synset(
        name=name, images=images, labels=labels, lr=r.float("lr", positive=True), ipc=ipc,
        method=r.str("method", default="mct"), grad=r.str("grad", default="constant"),
        preset=r.str("preset", default=""), iterations=iterations, complete=r.bool("complete", True),
        skipped=r.int("skipped_iterations", 0, default=0), config=r.json("config", dict, {}, raw=True),
        evaluations=_evaluations(r), experts_reference=r.json("experts_reference", dict, None),
        loss=[float(v) for v in loss], source=r.json("source", dict, {}), created=r.str("created", default=""),
    )
    if r.has("best"):
        syn.best = _read_best(path, require_group(path, f, f"synsets/{name}/best"), data, ipc, values)
        if syn.best.iteration > iterations:  # images of an iteration the run has not reached
            raise Fields(path, g["best"]).problem("iteration", f"is {syn.best.iteration}, beyond the synset's "
                                                               f"{iterations} iterations")
        if syn.best.labels.dim() != labels.dim():  # one run keeps one kind (its labels are learned or not)
            raise ArtifactError(f"{shown(path)}: /synsets/{clean_text(name)}/best/labels: "
                                f"{'soft' if syn.best.labels.dim() == 2 else 'hard'} labels where the synset's are "
                                f"{'soft' if syn.soft_labels else 'hard'}")
    if r.has("checkpoint"):
        state = _read_checkpoint(path, require_group(path, f, f"synsets/{name}/checkpoint"), data, ipc, values)
        if checkpoint:
            syn.checkpoint = state
    elif checkpoint:
        raise ArtifactError(f"{shown(path)}: synset '{clean_text(name)}' has no checkpoint to resume from")
    return syn


# An evaluation's numbers that readers compute with (the runner's selection, the tables): each a
# number (a whole one for the counts) or absent/null, never text or a boolean.
_EVALUATION_NUMBERS = ("mean", "std")
_EVALUATION_COUNTS = ("runs", "epochs", "iteration")


def _evaluation_problem(ev: Any) -> str | None:
    """What makes `ev` no evaluation object (a key holding a value of the wrong type), or None."""
    if not isinstance(ev, dict):
        return "is not an object"
    for key in _EVALUATION_NUMBERS + _EVALUATION_COUNTS:
        v = ev.get(key)
        kinds = (int, float) if key in _EVALUATION_NUMBERS else int
        if v is not None and (isinstance(v, bool) or not isinstance(v, kinds)):
            return f"'{key}' is {clean_text(repr(v))[:40]}"
    return None


def _evaluations(r: Fields) -> list[dict[str, Any]]:
    evaluations = r.json("evaluations", list, [])
    for ev in evaluations:
        problem = _evaluation_problem(ev)
        if problem is not None:
            raise r.problem("evaluations", f"must be a list of evaluation objects ({problem})")
    return evaluations


def _read_best(path: str | os.PathLike[str], g: h5py.Group, data: DatasetMeta, ipc: int, values: bool) -> BestImages:
    r = Fields(path, g)
    images, labels = _images_and_labels(r, data, ipc, values)
    score = r.json("score", dict, {})
    # The evaluation that selected them: its mean is the bar a later evaluation must pass.
    problem = _evaluation_problem(score) or ("'mean' is null" if "mean" in score and score["mean"] is None else None)
    if problem is not None:
        raise r.problem("score", f"must be the evaluation that selected them ({problem})")
    return BestImages(images=images, labels=labels, lr=r.float("lr", positive=True), iteration=r.int("iteration", 0),
                      selected_on=r.str("selected_on", choices=SELECTED_ON), score=score)


def _read_learned(r: Fields, entry: Learned, shape: list[int], values: bool) -> torch.Tensor | float:
    """One CHECKPOINT_LEARNED entry, checked (finite, shaped); `values=False`: an array's shape only."""
    if entry.shape == "scalar":
        return r.float(entry.name)
    if values:
        return torch.from_numpy(r.array(entry.name, "f", shape, finite=True).astype(np.float32, copy=False))
    ds = r.dataset(entry.name, "f", shape)
    r.stored(entry.name, ds, math.prod(shape) * ds.dtype.itemsize)
    return torch.empty(0)


def _read_checkpoint(path: str | os.PathLike[str], g: h5py.Group, data: DatasetMeta, ipc: int,
                     values: bool) -> Checkpoint:
    """The resumable state, checked: the learnables' state (CHECKPOINT_LEARNED: arrays shaped
    like the images or the soft labels, finite), one valid CPU generator state and one queue of
    expert indices per process. `values=False`: shapes only (arrays left empty)."""
    r = Fields(path, g)
    n = ipc * data.num_classes
    shapes = {"images": [n, *data.image_shape], "labels": [n, data.num_classes], "scalar": []}
    learned = {e.name: _read_learned(r, e, shapes[e.shape], values) for e in CHECKPOINT_LEARNED
               if e.required or (e.name in g.attrs if e.shape == "scalar" else r.has(e.name))}
    ds = r.dataset("generators", "u", [None, _GENERATOR_STATE_BYTES])
    if not 1 <= ds.shape[0] <= _MAX_RANKS or ds.dtype != np.uint8:
        raise r.problem("generators", f"must hold one uint8 generator state per process, got {ds.dtype} "
                                      f"{list(ds.shape)}", attribute=False)
    gens = r.array("generators", "u", [None, _GENERATOR_STATE_BYTES])
    for state in gens:
        try:
            torch.Generator().set_state(torch.from_numpy(state.copy()))
        except RuntimeError:
            raise r.problem("generators", "holds a state no CPU generator accepts", attribute=False) from None
    queues = r.json("queues", list)
    if len(queues) != gens.shape[0] or not all(
            isinstance(q, list) and all(isinstance(e, int) and not isinstance(e, bool) and 0 <= e < _MAX_EXPERT
                                        for e in q) for q in queues):
        raise r.problem("queues", f"must be {gens.shape[0]} list(s) of expert indices")
    ranks = r.int("world_size", 1, _MAX_RANKS, default=None)
    if ranks is not None and ranks != gens.shape[0]:  # one generator state per process that wrote it
        raise r.problem("world_size", f"says {ranks} process(es), but 'generators' holds {gens.shape[0]} state(s)")
    return Checkpoint(learned=learned, generators=[torch.from_numpy(s.copy()) for s in gens], queues=queues,
                      run=r.json("run", dict, {}))


def check_queue(path: str | os.PathLike[str], name: str, queue: list[int], experts: np.ndarray,
                buffer: str | os.PathLike[str]) -> list[int]:
    """`queue` (experts left in a resumed pass), refused unless every entry is one of `experts`,
    the buffer's usable experts: a checkpoint written against another buffer cannot index this one."""
    usable = {int(e) for e in experts}
    stray = [e for e in queue if e not in usable]
    if stray:
        raise ArtifactError(f"{shown(path)}: /synsets/{clean_text(name)}/checkpoint attribute 'queues': expert "
                            f"{stray[0]} is not an expert of {shown(buffer)} (a checkpoint made with another "
                            "buffer?)")
    return list(queue)


# --------------------------------------------------------------------------- writing


def _tensor(g: h5py.Group, name: str, t: torch.Tensor | np.ndarray) -> None:
    if name in g:
        del g[name]
    arr = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
    g.create_dataset(name, data=arr)


def write_synset(f: h5py.File, syn: Synset, prov: dict[str, Any]) -> None:
    """(Re)write synset `syn.name` in a file being created or rewritten."""
    root = f.require_group("synsets")
    if syn.name in root:
        del root[syn.name]
    g = root.create_group(syn.name)
    _tensor(g, "images", syn.images.float())
    _tensor(g, "labels", syn.labels)
    _tensor(g, "loss", torch.tensor(syn.loss, dtype=torch.float32))
    g.attrs.update(prov)  # argv, seed, versions, created (and config/source unless the synset has them)
    if syn.config:
        g.attrs["config"] = json.dumps(syn.config, sort_keys=True)
    if syn.source:
        g.attrs["source"] = json.dumps(syn.source)
    g.attrs.update({"lr": float(syn.lr), "ipc": int(syn.ipc), "method": syn.method, "preset": syn.preset,
                    "iterations": int(syn.iterations), "skipped_iterations": int(syn.skipped),
                    "complete": bool(syn.complete), "grad": syn.grad})
    g.attrs["evaluations"] = json.dumps(syn.evaluations)
    g.attrs["experts_reference"] = json.dumps(syn.experts_reference)
    if syn.best is not None:
        b = g.create_group("best")
        _tensor(b, "images", syn.best.images.float())
        _tensor(b, "labels", syn.best.labels)
        b.attrs.update({"lr": float(syn.best.lr), "iteration": int(syn.best.iteration),
                        "selected_on": syn.best.selected_on, "score": json.dumps(syn.best.score)})
    if syn.checkpoint is not None:
        c = g.create_group("checkpoint")
        kinds = {e.name: e.shape for e in CHECKPOINT_LEARNED}
        for key, value in syn.checkpoint.learned.items():
            if kinds[key] == "scalar":
                c.attrs[key] = float(value)
            else:
                assert isinstance(value, torch.Tensor)
                _tensor(c, key, value.float())
        _tensor(c, "generators", torch.stack(syn.checkpoint.generators))
        c.attrs["queues"] = json.dumps(syn.checkpoint.queues)
        c.attrs["run"] = json.dumps(syn.checkpoint.run)
        c.attrs["world_size"] = len(syn.checkpoint.generators)


def set_evaluations(f: h5py.File, name: str, evaluations: list[dict[str, Any]]) -> None:
    """Replace the stored evaluations of synset `name` (in a file being rewritten)."""
    f["synsets"][name].attrs["evaluations"] = json.dumps(evaluations)


def save_synset(out: str | os.PathLike[str], syn: Synset, data: DatasetMeta, spec: ModelSpec, layout: Layout,
                prov: dict[str, Any], extra_bytes: int = 0) -> None:
    """Write `syn` into `out` atomically: a new file, or a rewrite of an existing synset file
    (its other synsets kept). /dataset and /model go with it."""
    target = Path(out)
    opener = rewrite(target, extra_bytes) if target.exists() else create(target)
    with opener as f:
        if "dataset" not in f:
            write_dataset(f, data)
        if "model" not in f:
            write_model(f, spec, layout)
        write_synset(f, syn, prov)


def add_evaluations(path: str | os.PathLike[str], name: str, evaluations: list[dict[str, Any]],
                    scored: Synset | None = None) -> None:
    """Append evaluations to synset `name` (the file is rewritten atomically).

    `scored`: the synset as read before the evaluation; when the stored one has changed since
    (another process wrote it in between: a `distill --resume`), nothing is stored and FileBusy
    says so — the scores belong to images the file no longer holds."""
    with rewrite(path) as f:
        if name not in f.get("synsets", {}):
            raise FileBusy(f"{shown(path)}: synset '{clean_text(name)}' is gone (another process rewrote the file); "
                           "the scores were not stored")
        g = f["synsets"][name]
        r = Fields(path, g)
        if scored is not None and not _same_images(r, g, scored):
            raise FileBusy(f"{shown(path)}: synset '{clean_text(name)}' changed while it was being evaluated "
                           "(another mctool wrote it, e.g. distill --resume); the scores were not stored — run "
                           "evaluate again when that run is done")
        stored = r.json("evaluations", list, [])
        set_evaluations(f, name, stored + evaluations)


def _same_images(r: Fields, g: h5py.Group, syn: Synset) -> bool:
    """Whether group `g` still holds the iteration count, step size and images of `syn`."""
    if r.int("iterations", 0) != syn.iterations or r.float("lr") != float(syn.lr) or "images" not in g:
        return False
    stored = g["images"]
    if tuple(stored.shape) != tuple(syn.images.shape):
        return False
    return bool(np.array_equal(stored[()].astype(np.float32, copy=False), syn.images.detach().cpu().numpy()))
