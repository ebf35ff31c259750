"""mctool.evaluate.evaluation: evaluate_set, random_real, scores and evaluate_file, on the tiny MNIST fixture."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import mctool.evaluate.evaluation as ev_mod
from mctool import store
from mctool.core.errors import UsageError
from mctool.evaluate.evaluation import EvaluateConfig, Evaluation, evaluate_file, evaluate_set, random_real, run_seed, scores
from mctool.models import ModelSpec, layout_of

SPEC = ModelSpec(width=8, channels=1, num_classes=10, im_size=(28, 28))
TINY = EvaluateConfig(runs=2, epochs=2, seed=3)


@pytest.fixture(scope="module")
def prepared(data_dir: Path):
    from mctool.data.prepared import prepare

    return prepare("mnist", data_dir, zca=True, zca_eps=0.1, device=torch.device("cpu"))


def rows_of(x: torch.Tensor, pool: torch.Tensor) -> list[int]:
    """For each row of x, the index of the identical row of pool (-1 when none)."""
    flat, ref = x.flatten(1), pool.flatten(1)
    out = []
    for row in flat:
        hits = torch.nonzero((ref == row).all(1)).flatten()
        out.append(int(hits[0]) if hits.numel() else -1)
    return out


# --------------------------------------------------------------------------- evaluate_set


def test_evaluate_set_repeats_with_the_same_seed(prepared) -> None:
    x, y = random_real(prepared, 2, seed=0)
    a = evaluate_set(x, y, 0.01, prepared, SPEC, TINY)
    b = evaluate_set(x, y, 0.01, prepared, SPEC, TINY)
    (first,), (second,) = a, b
    assert first.accuracies == second.accuracies and first.seeds == second.seeds
    assert first.seeds == [run_seed(3, 0, 0), run_seed(3, 0, 1)] and len(set(first.seeds)) == 2
    assert (first.kind, first.model, first.runs, first.epochs, first.lr, first.images, first.split) == \
           ("synset", "ConvNet", 2, 2, 0.01, 20, "test")
    assert first.mean == pytest.approx(sum(first.accuracies) / 2)
    assert first.std == pytest.approx(abs(first.accuracies[0] - first.accuracies[1]) / 2)
    assert first.config == dataclasses.asdict(TINY)
    other = evaluate_set(x, y, 0.01, prepared, SPEC, dataclasses.replace(TINY, seed=4))[0]
    assert set(other.seeds).isdisjoint(first.seeds)


def test_evaluate_set_trains_every_model(prepared) -> None:
    x, y = random_real(prepared, 1, seed=0)
    results = evaluate_set(x, y, 0.01, prepared, SPEC, dataclasses.replace(TINY, runs=1, epochs=1,
                                                                           models=("ConvNet", "MLP")), kind="random-real")
    assert [(r.kind, r.model) for r in results] == [("random-real", "ConvNet"), ("random-real", "MLP")]
    assert results[1].seeds == [run_seed(3, 1, 0)]


def test_evaluate_set_scores_on_the_given_split(prepared, monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = random_real(prepared, 1, seed=0)
    held_x, held_y = prepared.train_x[:50], prepared.train_y[:50]
    scored = []
    real_accuracy = ev_mod.accuracy

    def spy(model, images, labels):
        scored.append((images, labels))
        return real_accuracy(model, images, labels)

    monkeypatch.setattr(ev_mod, "accuracy", spy)
    cfg = dataclasses.replace(TINY, runs=1, epochs=1)
    (on_val,) = evaluate_set(x, y, 0.01, prepared, SPEC, cfg, score_on=(held_x, held_y), split="validation")
    (on_test,) = evaluate_set(x, y, 0.01, prepared, SPEC, cfg)
    assert on_val.split == "validation" and on_test.split == "test"
    assert scored[0][0] is held_x and scored[0][1] is held_y
    assert scored[1][0] is prepared.test_x and scored[1][1] is prepared.test_y
    # The same network (same seed) scored on the test split by default.
    (explicit,) = evaluate_set(x, y, 0.01, prepared, SPEC, cfg, score_on=(prepared.test_x, prepared.test_y))
    assert explicit.accuracies == on_test.accuracies


# --------------------------------------------------------------------------- random_real


def test_random_real_draws_ipc_per_class_from_the_pool(prepared) -> None:
    pool = torch.arange(0, prepared.train_y.numel(), 2)  # every other training image
    x, y = random_real(prepared, 3, seed=7, pool=pool)
    idx = rows_of(x, prepared.train_x)
    assert -1 not in idx and len(set(idx)) == 30
    assert all(i % 2 == 0 for i in idx)  # only from the pool
    assert torch.equal(y, prepared.train_y[idx]) and y.tolist() == [c for c in range(10) for _ in range(3)]
    again_x, _ = random_real(prepared, 3, seed=7, pool=pool)
    assert torch.equal(again_x, x)
    other, _ = random_real(prepared, 3, seed=8, pool=pool)
    assert not torch.equal(other, x)
    whole, _ = random_real(prepared, 3, seed=7)
    assert -1 not in rows_of(whole, prepared.train_x)
    with pytest.raises(UsageError, match="fewer than the 40 asked for"):
        random_real(prepared, 40, seed=0)


# --------------------------------------------------------------------------- scores


def made(kind: str, model: str, mean: float, target: str = "final") -> Evaluation:
    return Evaluation(kind=kind, model=model, accuracies=[mean], mean=mean, std=0.0, runs=1, epochs=1, lr=0.01,
                      seeds=[1], seed=0, images=10, date="", seconds_per_run=0.0, config={}, target=target)


def test_scores_gain_and_hlr() -> None:
    results = [made("synset", "ConvNet", 0.60), made("synset", "MLP", 0.50), made("synset", "ConvNet", 0.70, "best"),
               made("random-real", "ConvNet", 0.40)]
    rows = scores(results, whole_data=0.90)
    got = [(s.target, s.model, s.mean, s.random_real, s.gain, s.whole_data, s.hlr) for s in rows]
    assert got == [
        ("final", "ConvNet", 0.60, 0.40, pytest.approx(0.20), 0.90, pytest.approx(0.30)),
        ("final", "MLP", 0.50, None, None, 0.90, None),  # no MLP baseline; HLR is ConvNet's (its whole data)
        ("best", "ConvNet", 0.70, 0.40, pytest.approx(0.30), 0.90, pytest.approx(0.20)),
    ]
    assert [s.hlr for s in scores(results, whole_data=None)] == [None, None, None]
    assert scores([made("random-real", "ConvNet", 0.4)], 0.9) == []


# --------------------------------------------------------------------------- evaluate_file


@pytest.fixture()
def synset_file(tmp_path: Path, prepared) -> tuple[Path, store.Synset]:
    """A synset (ipc 1) with best images, written by the store as distill would."""
    final_x, final_y = random_real(prepared, 1, seed=11)
    best_x, best_y = random_real(prepared, 1, seed=12)
    syn = store.Synset(name="mct-ipc1", images=final_x, labels=final_y, lr=0.02, ipc=1, iterations=5,
                       evaluations=[{"kind": "synset", "model": "ConvNet", "mean": 0.5, "iteration": 3,
                                     "split": "validation"}],
                       experts_reference={"mean": 0.8, "std": 0.01, "experts": 2, "epochs": 4},
                       best=store.BestImages(images=best_x, labels=best_y, lr=0.03, iteration=3,
                                             selected_on="validation", score={"mean": 0.5}))
    path = tmp_path / "synset.h5"
    store.save_synset(path, syn, prepared.meta, SPEC, layout_of(SPEC), store.provenance({"ipc": 1}, 0))
    return path, syn


def test_evaluate_file_final_and_best_with_baseline(synset_file, prepared, data_dir: Path) -> None:
    path, syn = synset_file
    cfg = dataclasses.replace(TINY, runs=1, epochs=1)
    result = evaluate_file(path, cfg, baseline="random", data_dir=data_dir, device="cpu")
    assert (result.synset, result.ipc, result.lr, result.selected_on) == ("mct-ipc1", 1, 0.02, "validation")
    got = [(r.kind, r.target, r.iteration, r.lr) for r in result.results]
    assert got == [("synset", "final", 5, 0.02), ("synset", "best", 3, 0.03), ("random-real", "final", None, 0.02)]
    # Each target trained on its own images: the same numbers as evaluate_set on them.
    assert result.results[0].accuracies == evaluate_set(syn.images, syn.labels, 0.02, prepared, SPEC, cfg)[0].accuracies
    assert syn.best is not None
    assert result.results[1].accuracies == evaluate_set(syn.best.images, syn.best.labels, 0.03, prepared, SPEC,
                                                        cfg)[0].accuracies
    base_x, base_y = random_real(prepared, 1, cfg.seed)
    assert result.results[2].accuracies == evaluate_set(base_x, base_y, 0.02, prepared, SPEC, cfg)[0].accuracies
    baseline = result.results[2].mean
    assert [(s.target, s.gain, s.whole_data, s.hlr) for s in result.scores] == [
        ("final", pytest.approx(result.results[0].mean - baseline), 0.8, pytest.approx(0.8 - result.results[0].mean)),
        ("best", pytest.approx(result.results[1].mean - baseline), 0.8, pytest.approx(0.8 - result.results[1].mean)),
    ]
    assert result.whole_data_source == "the experts' final test accuracy"
    assert result.experts_reference == syn.experts_reference
    with store.open_synsets(path) as sf:
        stored = sf.read("mct-ipc1").evaluations
    assert stored[0] == syn.evaluations[0]  # earlier evaluations kept, the new ones appended
    assert stored[1:] == json.loads(json.dumps([r.to_dict() for r in result.results]))
    assert "iteration" not in stored[3]  # random real images belong to no iteration


def test_evaluate_file_choices(synset_file, data_dir: Path) -> None:
    path, _ = synset_file
    before = path.read_bytes()
    cfg = dataclasses.replace(TINY, runs=1, epochs=1)
    only = evaluate_file(path, cfg, images="final", save=False, whole_data=0.95, data_dir=data_dir, device="cpu")
    assert [r.target for r in only.results] == ["final"] and only.selected_on is None
    assert only.whole_data_source == "--whole-data" and only.scores[0].hlr == pytest.approx(0.95 - only.results[0].mean)
    assert only.scores[0].gain is None
    best = evaluate_file(path, dataclasses.replace(cfg, lr=0.5), images="best", save=False, data_dir=data_dir,
                         device="cpu")
    assert [(r.target, r.lr) for r in best.results] == [("best", 0.5)] and best.lr == 0.5
    assert path.read_bytes() == before  # --no-save stores nothing
    for kwargs, message in (({"baseline": "magic"}, "unknown --baseline"), ({"images": "all"}, "--images must be"),
                            ({"whole_data": 150.0}, "--whole-data must be an accuracy"),
                            ({"name": "nope"}, "no synset named 'nope'")):
        with pytest.raises(UsageError, match=message):
            evaluate_file(path, cfg, data_dir=data_dir, device="cpu", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="--runs must be >= 1"):
        evaluate_file(path, dataclasses.replace(cfg, runs=0), data_dir=data_dir, device="cpu")
    with pytest.raises(UsageError, match="unknown model 'Nope'"):
        evaluate_file(path, dataclasses.replace(cfg, models=("ConvNet", "Nope")), data_dir=data_dir, device="cpu")
    assert path.read_bytes() == before


def test_best_images_are_required_when_asked_for(tmp_path: Path, prepared, data_dir: Path) -> None:
    x, y = random_real(prepared, 1, seed=0)
    path = tmp_path / "plain.h5"
    store.save_synset(path, store.Synset(name="s", images=x, labels=y, lr=0.01, ipc=1), prepared.meta, SPEC,
                      layout_of(SPEC), store.provenance({}, 0))
    for images in ("best", "both"):
        with pytest.raises(UsageError, match="keeps no best images"):
            evaluate_file(path, TINY, images=images, data_dir=data_dir, device="cpu")
    auto = evaluate_file(path, dataclasses.replace(TINY, runs=1, epochs=1), save=False, data_dir=data_dir, device="cpu")
    assert [r.target for r in auto.results] == ["final"] and auto.whole_data_source is None
    assert auto.scores[0].hlr is None


def test_best_images_that_are_the_final_ones_are_trained_once(tmp_path: Path, prepared, data_dir: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A run whose final images scored best keeps them as its best too: `--images auto` reports
    both rows, trained once (the same seeds would repeat the same numbers)."""
    x, y = random_real(prepared, 1, seed=0)
    path = tmp_path / "same.h5"
    best = store.BestImages(images=x.clone(), labels=y.clone(), lr=0.01, iteration=7, selected_on="validation",
                            score={"mean": 0.5})
    store.save_synset(path, store.Synset(name="s", images=x, labels=y, lr=0.01, ipc=1, iterations=7, best=best),
                      prepared.meta, SPEC, layout_of(SPEC), store.provenance({}, 0))
    calls: list[str] = []
    real = ev_mod.evaluate_set

    def counted(*args, **kwargs):
        calls.append(args[6] if len(args) > 6 else kwargs.get("kind", "synset"))
        return real(*args, **kwargs)

    monkeypatch.setattr(ev_mod, "evaluate_set", counted)
    cfg = dataclasses.replace(TINY, runs=1, epochs=1)
    result = evaluate_file(path, cfg, save=False, data_dir=data_dir, device="cpu")
    assert calls == ["synset"]
    final, again = result.results
    assert (final.target, again.target, final.iteration, again.iteration) == ("final", "best", 7, 7)
    assert again.accuracies == final.accuracies == real(x, y, 0.01, prepared, SPEC, cfg)[0].accuracies
    assert [s.target for s in result.scores] == ["final", "best"]


# --------------------------------------------------------------------------- --labels hard


def test_labels_hard_trains_a_soft_label_synset_on_the_class_of_each_image(tmp_path: Path, prepared, data_dir: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """`--labels hard`: a soft-label synset's images train on the classes they are stored under, exactly as
    the same images stored as a hard-label synset do (same seeds); HLR is then defined."""
    from tests.helpers import Recorder

    x, y = random_real(prepared, 1, seed=11)  # class-major: one image of each class
    bx, by = random_real(prepared, 1, seed=12)
    gen = torch.Generator().manual_seed(0)
    soft = torch.softmax(4 * torch.randn(10, 10, generator=gen), 1)
    soft_best = torch.softmax(4 * torch.randn(10, 10, generator=gen), 1)
    away = int((soft.argmax(1) != torch.arange(10)).sum())
    assert away > 0  # some rows peak elsewhere: the note counts them

    def save(path: Path, labels: torch.Tensor, best_labels: torch.Tensor) -> Path:
        syn = store.Synset(name="s", images=x, labels=labels, lr=0.02, ipc=1, iterations=4,
                           experts_reference={"mean": 0.8, "std": 0.01, "experts": 2, "epochs": 4},
                           best=store.BestImages(images=bx, labels=best_labels, lr=0.03, iteration=2,
                                                 selected_on="validation", score={"mean": 0.5}))
        store.save_synset(path, syn, prepared.meta, SPEC, layout_of(SPEC), store.provenance({"ipc": 1}, 0))
        return path

    soft_file = save(tmp_path / "soft.h5", soft, soft_best)
    hard_file = save(tmp_path / "hard.h5", y, by)
    trained: list[torch.Tensor] = []
    real_train = ev_mod.train_many

    def spy(models, images, labels, *args, **kwargs):
        trained.append(labels.detach().cpu().clone())
        return real_train(models, images, labels, *args, **kwargs)

    monkeypatch.setattr(ev_mod, "train_many", spy)
    cfg = dataclasses.replace(TINY, runs=2, epochs=1)
    log = Recorder()
    hard = evaluate_file(soft_file, dataclasses.replace(cfg, labels="hard"), baseline="random", save=False,
                         data_dir=data_dir, device="cpu", reporter=log)
    assert [t.tolist() for t in trained[:2]] == [list(range(10))] * 2 and all(t.dtype == torch.int64 for t in trained)
    assert [(r.kind, r.target, r.labels) for r in hard.results] == [
        ("synset", "final", "hard"), ("synset", "best", "hard"), ("random-real", "final", "hard")]
    assert [(s.labels, s.baseline_labels, s.note) for s in hard.scores] == [("hard", "hard", "")] * 2
    assert hard.scores[0].hlr == pytest.approx(0.8 - hard.results[0].mean)
    assert any(f"{away} of 10 final images" in line for line in log.lines), log.lines
    trained.clear()
    same = evaluate_file(hard_file, cfg, baseline="random", save=False, data_dir=data_dir, device="cpu")
    assert [r.accuracies for r in same.results] == [r.accuracies for r in hard.results]
    assert same.results[0].config == dataclasses.asdict(cfg) and hard.results[0].config["labels"] == "hard"
    # auto (the default): the soft labels the synset stores; no HLR for them.
    trained.clear()
    auto = evaluate_file(soft_file, cfg, images="final", save=False, data_dir=data_dir, device="cpu")
    assert torch.equal(trained[0], soft) and auto.results[0].labels == "soft" and auto.scores[0].hlr is None
    # --labels hard on a hard-label synset changes nothing.
    again = evaluate_file(hard_file, dataclasses.replace(cfg, labels="hard"), baseline="random", save=False,
                          data_dir=data_dir, device="cpu")
    assert [r.accuracies for r in again.results] == [r.accuracies for r in same.results]
    with pytest.raises(UsageError, match="--labels must be auto or hard, got 'soft'"):
        evaluate_file(soft_file, dataclasses.replace(cfg, labels="soft"), data_dir=data_dir, device="cpu")


def test_labels_hard_cli_json_and_usage(tmp_path: Path, prepared, data_dir: Path) -> None:
    from tests.helpers import assert_one_line_error, cli

    x, _ = random_real(prepared, 1, seed=11)
    soft = torch.full((10, 10), 0.02).fill_diagonal_(0.82)
    path = tmp_path / "learned.h5"
    store.save_synset(path, store.Synset(name="s", images=x, labels=soft, lr=0.02, ipc=1), prepared.meta, SPEC,
                      layout_of(SPEC), store.provenance({}, 0))
    before = path.read_bytes()
    base = ("evaluate", path, "--runs", "1", "--epochs", "1", "--data-dir", data_dir, "--device", "cpu", "--quiet",
            "--no-save")
    r = cli(*base, "--labels", "hard", "--baseline", "random", "--whole-data", "0.9", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert [(e["kind"], e["labels"]) for e in doc["results"]] == [("synset", "hard"), ("random-real", "hard")]
    assert doc["scores"][0]["labels"] == "hard" and doc["scores"][0]["hlr"] is not None
    r = cli(*base, "--labels", "hard")
    assert r.exit_code == 0 and "hard" in r.stdout and "soft" not in r.stdout, r.output
    assert_one_line_error(cli(*base, "--labels", "soft"), 2, "--labels must be auto or hard")
    # A soft-label (expert) baseline for a hard-label score needs its buffer, as for any synset.
    assert_one_line_error(cli(*base, "--labels", "hard", "--baseline", "random", "--baseline-labels", "expert"), 2,
                          "--buffer")
    assert path.read_bytes() == before
    # An imported soft-label set's order is its maker's: which class each image was made for is unknown.
    imported = tmp_path / "imported.h5"
    store.save_synset(imported, store.Synset(name="s", images=x, labels=soft, lr=0.02, ipc=1, method="imported"),
                      prepared.meta, SPEC, layout_of(SPEC), store.provenance({}, 0))
    before = imported.read_bytes()
    args = ("evaluate", imported, *base[2:])
    assert_one_line_error(cli(*args, "--labels", "hard"), 2, "was imported with soft labels")
    assert cli(*args).exit_code == 0  # its soft labels, as stored, still train
    assert imported.read_bytes() == before
