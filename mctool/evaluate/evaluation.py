"""Evaluate a synthetic set: train fresh networks on it, test on the real test split (method.md §8).

Besides mean ± std, `mctool evaluate` reports the two numbers the field compares distilled
sets by (docs/method.md, "Scores"): the gain over random real images of the same ipc under the
same protocol, and DD-Ranking's hard-label recovery HLR = whole-data accuracy − synthetic accuracy.

Soft labels (learned, `distill --learn-labels`, or the expert's, `--soft-labels`) are trained on
with the soft-target cross-entropy, as DATM evaluates them (mctool.training.train takes float labels).
Every result says which labels it trained on (`labels`: hard or soft), and the random-real
baseline can be labelled by the synset's expert with the same rule as learned labels start from
(`--baseline-labels`, mctool.training.labels), so that the gain compares like with like, and
each baseline run trains on its own random draw (`--baseline-draws per-run`, the default), so that
random real's spread includes which images were drawn, as the synset's starting images were a draw.
`--labels hard` trains a soft-label synset's images on the class each belongs to
(store.image_classes), as the field reports label-learning methods' hard-label results apart.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mctool import store
from mctool.data.augment import DSA
from mctool.configs.evaluate import EvaluateConfig  # noqa: F401 (re-exported)
from mctool.training.ensemble import train_many
from mctool.core.errors import DiskFull, FileBusy, UsageError, is_disk_full
from mctool.training.labels import Predict, expert_logits, expert_predictor, replace_misclassified
from mctool.models import ModelSpec, build_model, layout_of, spec_for
from mctool.data.prepared import Prepared, sample_per_class
from mctool.core.progress import SILENT, Reporter, stop_if_asked
from mctool.training.train import accuracy

_NOTHING_STORED = "nothing was stored; run the command again"


@dataclass
class Evaluation:
    """Accuracies of networks trained on one image set (stored with the synset as JSON)."""

    kind: str  # "synset" or "random-real"
    model: str
    accuracies: list[float]
    mean: float
    std: float  # population std (ddof 0), as the reference reports
    runs: int
    epochs: int
    lr: float
    seeds: list[int]
    seed: int
    images: int
    date: str
    seconds_per_run: float
    config: dict[str, Any]
    split: str = "test"  # where the accuracies were measured: test, or validation (selection during distill)
    target: str = "final"  # which images of the synset: final or best
    iteration: int | None = None  # the synset's iteration these images are from
    labels: str = "hard"  # what the networks trained on: hard (class indices) or soft (probabilities)

    def to_dict(self) -> dict[str, Any]:
        """The stored/JSON form (no `iteration` key when unknown, as earlier releases wrote)."""
        d = dataclasses.asdict(self)
        if d["iteration"] is None:
            del d["iteration"]
        return d


@dataclass(frozen=True)
class Score:
    """One row of the scores table: a synset's accuracy with the field's comparisons (mctool/evaluate/scores.py)."""

    target: str  # final or best
    model: str
    mean: float
    std: float
    runs: int
    random_real: float | None  # mean accuracy of random real images, same ipc and protocol
    gain: float | None  # mean of the per-run differences synthetic − random real (same seeds)
    gain_std: float | None
    whole_data: float | None  # accuracy of the architecture trained on the whole training set
    hlr: float | None  # whole_data − synthetic (DD-Ranking's hard-label recovery), hard labels only
    hlr_std: float | None
    note: str = ""
    labels: str = "hard"  # the synset's labels: hard or soft
    baseline_labels: str | None = None  # the random-real baseline's: hard, or soft (the expert's, same rule)
    random_real_std: float | None = None  # population std of the random real runs
    random_real_runs: int = 0


@dataclass
class EvaluateResult:
    """What `mctool evaluate` measured."""

    file: str
    synset: str
    ipc: int
    lr: float
    results: list[Evaluation]
    scores: list[Score]
    experts_reference: dict[str, Any] | None = None
    whole_data_source: str | None = None
    selected_on: str | None = None  # how the best images were chosen, when they were evaluated


def run_seed(seed: int, model_index: int, run: int) -> int:
    """Seed of one evaluation run (network init, shuffles, augmentation)."""
    return int(np.random.SeedSequence([seed, 0xE7A1, model_index, run]).generate_state(1, np.uint32)[0])


def evaluate_set(images: torch.Tensor, labels: torch.Tensor, lr: float, prepared: Prepared, base: ModelSpec,
                 cfg: EvaluateConfig, kind: str = "synset", reporter: Reporter = SILENT,
                 score_on: tuple[torch.Tensor, torch.Tensor] | None = None, split: str = "test",
                 stop_hint: str = _NOTHING_STORED, runs: Sequence[int] | None = None) -> list[Evaluation]:
    """Train cfg.runs fresh networks of every model on (images, labels); one Evaluation per model.

    `runs` names the runs to train (default: all, 0 … cfg.runs − 1), each seeded as it would be
    among all (run_seed), so that runs trained on different images (the random-real baseline's
    draws) merge into one Evaluation (merge_runs). Accuracy is measured on `score_on` (default:
    the test split), named `split` in the result.
    The runs of a model train together where `mctool.training.ensemble.train_many` decides so
    (`cfg.together`: None = on GPUs, where it is faster), with the same results as one after
    another up to float rounding."""
    device = prepared.train_x.device
    images, labels = images.to(device), labels.to(device)
    test_x, test_y = score_on if score_on is not None else (prepared.test_x, prepared.test_y)
    dsa = DSA(cfg.augment, flip=prepared.meta.flip) if cfg.augment != "none" else None
    schedule = cfg.schedule(lr)
    indices = list(range(cfg.runs)) if runs is None else list(runs)
    results = []
    for mi, name in enumerate(cfg.models):
        spec = spec_for(name, base)
        started = time.perf_counter()
        seeds = [run_seed(cfg.seed, mi, r) for r in indices]
        models = [build_model(spec, seed=seed).to(device) for seed in seeds]
        gens = [torch.Generator().manual_seed(seed) for seed in seeds]
        keys = [f"eval-{name}-{r}" for r in indices]
        for r, key in zip(indices, keys):
            reporter.task(key, f"evaluate {kind} {name} run {r + 1}/{cfg.runs}", total=cfg.epochs)

        def on_epoch(i: int, epoch: int, loss: float) -> None:
            reporter.update(keys[i], advance=1, loss=loss)
            stop_if_asked(reporter, stop_hint)

        train_many(models, images, labels, schedule, dsa, gens, together=cfg.together, on_epoch=on_epoch)
        accs = []
        for i, model in enumerate(models):
            reporter.done(keys[i])
            accs.append(accuracy(model, test_x, test_y))
            reporter.log(f"{kind} {name} run {indices[i] + 1}/{cfg.runs}: {split} accuracy {accs[-1]:.4f}")
        del models  # before the next model's networks are built
        results.append(Evaluation(
            kind=kind, model=name, accuracies=accs, mean=statistics.fmean(accs), std=statistics.pstdev(accs),
            runs=len(indices), epochs=cfg.epochs, lr=lr, seeds=seeds, seed=cfg.seed, images=int(images.shape[0]),
            date=store.now_iso(), seconds_per_run=(time.perf_counter() - started) / max(1, len(indices)),
            config=dataclasses.asdict(cfg), split=split, labels="soft" if labels.dim() == 2 else "hard",
        ))
    return results


def merge_runs(parts: Sequence[Evaluation]) -> Evaluation:
    """One model's Evaluations of different runs (given in run order) as one: accuracies and seeds
    concatenated, mean and std over them all, seconds per run averaged over the runs."""
    accs = [a for p in parts for a in p.accuracies]
    return dataclasses.replace(
        parts[-1], accuracies=accs, mean=statistics.fmean(accs), std=statistics.pstdev(accs), runs=len(accs),
        seeds=[s for p in parts for s in p.seeds],
        seconds_per_run=sum(p.seconds_per_run * p.runs for p in parts) / max(1, sum(p.runs for p in parts)))


def random_real(prepared: Prepared, ipc: int, seed: int, pool: torch.Tensor | None = None,
                expert: Predict | None = None, draw: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`ipc` random real training images per class (the baseline every paper compares against),
    drawn from the training indices `pool` (default: all), with hard labels; with `expert`,
    labelled by DATM's rule (mctool.training.labels: misclassified draws replaced by right ones of their
    class, labels the softmax of the expert's logits), as learned labels start. `draw` r > 0 is
    another draw under the same seed (`evaluate --baseline-draws per-run`: run r's); draw 0 is the
    one earlier releases made."""
    words = [seed, 0xBA5E] if draw == 0 else [seed, 0xBA5E, draw]
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence(words).generate_state(1)[0]))
    y = prepared.train_y if pool is None else prepared.train_y[pool.to(prepared.train_y.device)]
    sel = sample_per_class(y, prepared.meta.num_classes, ipc, gen)
    if pool is not None:
        sel = pool.cpu()[sel]
    if expert is not None:
        sel, _ = replace_misclassified(expert, prepared.train_x, prepared.train_y, sel, gen, pool)
        x = prepared.train_x[sel.to(prepared.train_x.device)]
        return x, torch.softmax(expert_logits(expert, x).float(), dim=1)
    sel = sel.to(prepared.train_x.device)
    return prepared.train_x[sel], prepared.train_y[sel]


def scores(results: list[Evaluation], whole_data: float | None, soft_labels: bool = False) -> list[Score]:
    """Per (target, model): mean, the gain over random real of the same model, and HLR. Each
    row names the synset's labels and the baseline's; a gain between different kinds says so."""
    from mctool.evaluate.scores import hard_label_recovery, paired_gain

    baseline = {r.model: r for r in results if r.kind == "random-real"}
    out = []
    for r in results:
        if r.kind != "synset":
            continue
        gain = gain_std = hlr = hlr_std = None
        base = baseline.get(r.model)
        if base is not None:
            gain, gain_std, _ = paired_gain(r.accuracies, base.accuracies)
        note = ""
        if base is not None and base.labels != r.labels:
            note = f"gain against a {base.labels}-label baseline (not like with like: --baseline-labels); "
        if soft_labels:
            note += "soft labels: HLR is defined for training with hard labels"
        elif whole_data is None:
            note += "whole-data accuracy unknown (--whole-data)"
        elif r.model != "ConvNet":
            note += "the whole-data reference is the experts' ConvNet"
        else:
            hlr, hlr_std = hard_label_recovery(whole_data, r.accuracies)
        out.append(Score(target=r.target, model=r.model, mean=r.mean, std=r.std, runs=r.runs,
                         random_real=None if base is None else base.mean, gain=gain, gain_std=gain_std,
                         whole_data=whole_data, hlr=hlr, hlr_std=hlr_std, note=note.removesuffix("; "),
                         labels=r.labels, baseline_labels=None if base is None else base.labels,
                         random_real_std=None if base is None else base.std,
                         random_real_runs=0 if base is None else base.runs))
    return out


def evaluate_file(file: Path, cfg: EvaluateConfig, name: str | None = None, baseline: str | None = None,
                  images: str = "auto", save: bool = True, whole_data: float | None = None,
                  data_dir: Path | None = None, device: str = "auto", reporter: Reporter = SILENT,
                  buffer: Path | None = None) -> EvaluateResult:
    """`mctool evaluate`: train fresh networks on a synset's final (and best) images, optionally on
    random real images too (labelled as `cfg.baseline_labels` says, the expert read from `buffer`;
    a draw per run or one as `cfg.baseline_draws` says), report and store the results."""
    from mctool.core.device import resolve_device
    from mctool.data.prepared import prepare_like
    from mctool.evaluate.scores import whole_data_accuracy

    if baseline not in (None, "random"):
        raise UsageError(f"unknown --baseline '{baseline}' (use: random)")
    if images not in ("auto", "final", "best", "both"):
        raise UsageError(f"--images must be final, best, both or auto, got '{images}'")
    cfg.validate()
    if save:
        store.check_writable(file)
    with store.open_synsets(file) as sf:
        synset = sf.pick(name)
        syn = sf.read(synset)
        data, spec = sf.data, sf.spec
    reference = syn.experts_reference
    whole, origin = whole_data_accuracy(reference, whole_data)  # a bad --whole-data fails before any work
    source = {"option": "--whole-data", "experts": "the experts' final test accuracy"}.get(origin)
    for m in cfg.models:
        layout_of(spec_for(m, spec))  # unknown or impossible models fail here, before any training
    targets = _targets(images, syn, file)
    soft = syn.soft_labels and cfg.labels == "auto"  # what the synset's networks train on
    if cfg.labels == "hard" and syn.soft_labels and syn.method.startswith("imported"):
        # A distilled set is stored class by class; an imported soft-label set's order is its maker's.
        raise UsageError(f"--labels hard: synset '{syn.name}' was imported with soft labels, so the class each "
                         "image was made for is not known (mctool keeps that order only for sets it distils)")
    expert_buffer = _baseline_buffer(cfg.baseline_labels, soft, buffer) if baseline == "random" else None
    dev = resolve_device(device)
    expert = None
    if expert_buffer is not None:  # read (and a bad buffer refused) before any training
        with store.open_buffer(expert_buffer) as buf:
            _check_same_data(buf, data, spec)
            expert = expert_predictor(buf, syn.method, dev)
    elif baseline == "random" and cfg.baseline_labels == "auto" and soft:
        recorded = syn.source.get("file") if isinstance(syn.source.get("file"), str) else None
        where = f", recorded as {store.shown(recorded)}" if recorded else ""  # named, never opened unasked
        reporter.log(f"note: the random-real baseline has hard labels: pass --buffer FILE (the buffer synset "
                     f"'{syn.name}' was distilled from{where}) to label it by the synset's expert, like with like")
    prepared = prepare_like(data, data_dir, dev, reporter)
    results: list[Evaluation] = []
    for target in targets:
        x, y, lr_learned, iteration = ((syn.images, syn.labels, syn.lr, syn.iterations) if target == "final" else
                                       (syn.best.images, syn.best.labels, syn.best.lr, syn.best.iteration))  # type: ignore[union-attr]
        lr = cfg.lr if cfg.lr is not None else lr_learned
        if target == "best" and "final" in targets and _same_as_final(syn) and (cfg.lr is not None or
                                                                                 lr_learned == syn.lr):
            # The final images scored best: the same training (seeds included) would repeat the final rows.
            reporter.log(f"the best images are the final ones (iteration {iteration}): their results are the final "
                         "images'")
            results += [dataclasses.replace(copy.deepcopy(ev), target="best") for ev in results if ev.target == "final"]
            continue
        if not soft:
            y = _hard(y, syn.ipc, target, reporter)
        for ev in evaluate_set(x, y, lr, prepared, spec, cfg, "synset", reporter):
            ev.target, ev.iteration = target, iteration
            results.append(ev)
    if baseline == "random":
        lr = cfg.lr if cfg.lr is not None else syn.lr
        # per-run: run r trains on draw r (its own random images, its usual network seed), so that
        # random real's spread includes the draw; one: every run on draw 0.
        draws = [[r] for r in range(cfg.runs)] if cfg.baseline_draws == "per-run" else [list(range(cfg.runs))]
        per_draw = [evaluate_set(*random_real(prepared, syn.ipc, cfg.seed, expert=expert, draw=d), lr, prepared, spec,
                                 cfg, "random-real", reporter, runs=runs) for d, runs in enumerate(draws)]
        results += [merge_runs(parts) for parts in zip(*per_draw)]  # one Evaluation per model, runs in order
    if save:
        # Saving can fail after the networks trained (another writer, a full disk): the work is not
        # lost with it, the scores go in the message.
        got = "; ".join(f"{r.model} {r.target if r.kind == 'synset' else r.kind} {r.mean:.4f}" for r in results)
        try:
            store.add_evaluations(file, synset, [r.to_dict() for r in results], scored=syn)
        except (FileBusy, DiskFull) as exc:
            raise type(exc)(f"{exc} (scores: {got})") from None
        except (OSError, RuntimeError) as exc:
            if not is_disk_full(exc):
                raise
            raise DiskFull(f"disk full while storing the scores in {store.shown(file)}; free space and run the same "
                           f"command again, or add --no-save (scores: {got})") from None
    return EvaluateResult(file=str(file), synset=synset, ipc=syn.ipc, lr=cfg.lr if cfg.lr is not None else syn.lr,
                          results=results, scores=scores(results, whole, soft), experts_reference=reference,
                          whole_data_source=source,
                          selected_on=syn.best.selected_on if syn.best is not None and "best" in targets else None)


def _same_as_final(syn: store.Synset) -> bool:
    """Whether the synset's best images are its final ones (iteration, images and labels)."""
    b = syn.best
    return (b is not None and b.iteration == syn.iterations
            and b.images.shape == syn.images.shape and bool(torch.equal(b.images, syn.images))
            and b.labels.shape == syn.labels.shape and bool(torch.equal(b.labels, syn.labels)))


def _hard(labels: torch.Tensor, ipc: int, target: str, reporter: Reporter) -> torch.Tensor:
    """The class of each image (`--labels hard`), with a note when soft labels peak elsewhere."""
    classes = store.image_classes(labels, ipc)
    if labels.dim() == 2:
        away = int((labels.argmax(1) != classes.to(labels.device)).sum())
        if away:
            reporter.log(f"note: --labels hard: {away} of {len(classes)} {target} images have soft labels peaking at "
                         "another class than the one they are stored under (and train on)")
    return classes


def _baseline_buffer(choice: str, soft: bool, buffer: Path | None) -> Path | None:
    """The buffer whose first expert labels the random-real baseline (None: hard labels).

    Only a buffer named by --buffer is read (never the path recorded in the synset: nothing
    outside the named files is opened). auto: the expert's when the synset trains on soft labels
    (`soft`) and --buffer names its buffer, else hard labels (with a note); expert: --buffer required."""
    if choice == "hard" or (choice == "auto" and not soft):
        return None
    if buffer is None:
        if choice == "auto":
            return None
        raise UsageError("--baseline-labels expert needs the buffer the synset was distilled from: pass --buffer FILE "
                         "(or use --baseline-labels hard)")
    if not buffer.exists():  # anything else (a folder, a damaged file) is store.open_buffer's one line
        raise UsageError(f"--buffer: {store.shown(buffer)} does not exist")
    return buffer


def _check_same_data(buf: store.Buffer, data: Any, spec: ModelSpec) -> None:
    """--buffer must hold experts of the synset's dataset, preprocessing and network."""
    ours, theirs = data, buf.data
    same = (theirs.name, theirs.num_classes, theirs.image_shape, theirs.zca, theirs.train_fingerprint) == \
        (ours.name, ours.num_classes, ours.image_shape, ours.zca, ours.train_fingerprint)
    if not same or buf.spec != spec:
        raise UsageError(f"--buffer: {store.shown(buf.path)} holds experts of another dataset, preprocessing or "
                         "network than the synset's; pass the buffer it was distilled from")


def _targets(images: str, syn: store.Synset, file: Path) -> list[str]:
    if images == "auto":
        return ["final", "best"] if syn.best is not None else ["final"]
    if images in ("best", "both") and syn.best is None:
        raise UsageError(f"{store.shown(file)}: synset '{syn.name}' keeps no best images (distill with --eval-every "
                         "to select them)")
    return ["final", "best"] if images == "both" else [images]
