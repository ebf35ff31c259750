"""Learned soft labels (DATM): the label gradient of every `--grad` mode, in float64.

The learnable is the label logits Z [n, classes]; the inner steps train on Y = softmax(Z).
`unrolled` differentiates through everything (checked against central finite differences),
`adjoint` must equal it to rounding, `constant` must equal an independent autograd
re-derivation of its truncated objective (every w_k frozen), and both second-order
implementations (mctool.matching.fastgrad's sweep, autograd) must give the same label term.
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from mctool.matching.fastgrad import plan_for, second_order
from mctool.models.functional import FlatNet
from mctool.matching.loss import MODES, MatchResult, match
from mctool.matching.microbatch import chunks
from mctool.models import ModelSpec, build_model
from mctool.matching.secondorder import autograd_step

CLASSES = 3


def problem(n: int = 8, steps: int = 3, batch: int = 4, seed: int = 0, channels: int = 1) -> dict:
    """A tiny float64 matching problem with learned label logits Z."""
    spec = ModelSpec(depth=1, width=4, channels=channels, num_classes=CLASSES, im_size=(8, 8), norm="instancenorm")
    net = FlatNet(build_model(spec, seed=seed).double())
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n, channels, 8, 8, generator=gen, dtype=torch.float64)
    logits = 2.0 * torch.randn(n, CLASSES, generator=gen, dtype=torch.float64)
    theta_s = net.flatten()
    theta_t = theta_s + 0.05 * torch.randn(net.num_params, generator=gen, dtype=torch.float64)
    # Random subsets of the rows (--batch-syn): rows in no batch get no gradient.
    batches = [torch.randperm(n, generator=gen)[:batch] for _ in range(steps)]
    return dict(net=net, images=images, logits=logits, theta_s=theta_s, theta_t=theta_t, batches=batches)


def affine(x: torch.Tensor, k: int, rows: slice | None = None) -> torch.Tensor:
    """A per-step differentiable transform (per-sample, so it accepts the rows of a micro-batch)."""
    return x * (1.0 + 0.1 * k) + 0.01 * k


def run(p: dict, mode: str, alpha: float = 0.4, augment: Callable | None = affine, fast: bool | str = "autograd",
        micro: int | None = None, logits: torch.Tensor | None = None) -> MatchResult:
    return match(p["net"], p["images"], None, p["theta_s"], p["theta_t"], alpha,  # type: ignore[arg-type]
                 p["batches"], augment, mode, fast_path=fast, micro_batch=micro,
                 label_logits=p["logits"] if logits is None else logits)


def plain_loss(p: dict, logits: torch.Tensor, alpha: float = 0.4) -> float:
    """L by a plain SGD loop on soft targets softmax(Z), nothing differentiated but w."""
    y = torch.softmax(logits, dim=1)
    w = p["theta_s"].clone()
    for k, idx in enumerate(p["batches"]):
        w = w.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(p["net"](w, affine(p["images"][idx], k)), y[idx]), w)
        w = w.detach() - alpha * g
    return float((w - p["theta_t"]).pow(2).sum() / (p["theta_s"] - p["theta_t"]).pow(2).sum())


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_unrolled_label_gradient_matches_finite_differences() -> None:
    p = problem(seed=1)
    res = run(p, "unrolled")
    assert set(res.grads) == {"images", "alpha", "labels"} and res.grads["labels"].shape == p["logits"].shape
    gen = torch.Generator().manual_seed(7)
    eps = 1e-5
    for _ in range(3):
        d = torch.randn(p["logits"].shape, generator=gen, dtype=torch.float64)
        fd = (plain_loss(p, p["logits"] + eps * d) - plain_loss(p, p["logits"] - eps * d)) / (2 * eps)
        an = float((res.grads["labels"] * d).sum())
        assert abs(an - fd) <= 1e-6 * abs(fd), (an, fd)


@pytest.mark.parametrize("fast", ["autograd", "fastgrad"])
@pytest.mark.parametrize("steps", [1, 4])
def test_adjoint_label_gradient_equals_unrolled(fast: str, steps: int) -> None:
    p = problem(steps=steps, seed=2, channels=3)
    ref = run(p, "unrolled")
    adj = run(p, "adjoint", fast=fast)
    assert rel(adj.grads["labels"], ref.grads["labels"]) < 1e-10
    assert rel(adj.grad_images, ref.grad_images) < 1e-10
    assert adj.grad_alpha == pytest.approx(ref.grad_alpha, rel=1e-10)
    unused = torch.ones(8, dtype=torch.bool)
    unused[torch.cat(p["batches"])] = False
    assert unused.any() and float(adj.grads["labels"][unused].abs().max()) == 0.0  # rows in no batch


@pytest.mark.parametrize("fast", ["autograd", "fastgrad"])
def test_constant_label_gradient_exact_for_one_step(fast: str) -> None:
    p = problem(steps=1, seed=3)
    ref, con = run(p, "unrolled"), run(p, "constant", fast=fast)
    assert rel(con.grads["labels"], ref.grads["labels"]) < 1e-10


@pytest.mark.parametrize("fast", ["autograd", "fastgrad"])
def test_constant_label_gradient_is_its_truncated_formula(fast: str) -> None:
    """constant's dL/dZ equals autograd on L = ‖θ_s − ᾱ Σ g_k(w_k frozen, Z) − θ_T‖²/D."""
    p = problem(steps=4, batch=5, seed=5)
    alpha = 2.0  # large: the terms constant drops are large, so the comparison with unrolled differs
    con = run(p, "constant", alpha, fast=fast)
    z = p["logits"].clone().requires_grad_(True)
    y = torch.softmax(z, dim=1)
    w, grad_sum = p["theta_s"].clone(), torch.zeros_like(p["theta_s"])
    for k, idx in enumerate(p["batches"]):
        w_leaf = w.detach().requires_grad_(True)
        loss_k = F.cross_entropy(p["net"](w_leaf, affine(p["images"][idx], k)), y[idx])
        (g,) = torch.autograd.grad(loss_k, w_leaf, create_graph=True)
        grad_sum = grad_sum + g
        w = w.detach() - alpha * g.detach()
    d = (p["theta_s"] - p["theta_t"]).pow(2).sum()
    (gz,) = torch.autograd.grad((p["theta_s"] - alpha * grad_sum - p["theta_t"]).pow(2).sum() / d, z)
    assert rel(con.grads["labels"], gz) < 1e-10
    assert rel(con.grads["labels"], run(p, "unrolled", alpha).grads["labels"]) > 1e-3  # truly truncated


@pytest.mark.parametrize("mode", MODES)
def test_label_gradient_with_micro_batches(mode: str) -> None:
    p = problem(n=10, batch=7, seed=4)
    fast = "fastgrad" if mode != "unrolled" else "autograd"
    ref = run(p, mode, fast=fast)
    for micro in (2, 3):
        got = run(p, mode, fast=fast, micro=micro)
        assert rel(got.grads["labels"], ref.grads["labels"]) < 1e-10, micro
        assert got.loss == pytest.approx(ref.loss, rel=1e-12)


def test_the_loss_is_the_plain_loops_on_softmax_targets() -> None:
    p = problem(seed=6)
    for mode in MODES:
        assert run(p, mode).loss == pytest.approx(plain_loss(p, p["logits"]), rel=1e-12)


def test_second_order_label_term_fastgrad_equals_autograd() -> None:
    """e_y = ∂/∂y [vᵀ∇_w ℓ] from the hand-written head and from autograd, on a chunk of a batch."""
    p = problem(seed=8, channels=3)
    net, x = p["net"], p["images"]
    y = torch.softmax(p["logits"], dim=1)
    v = torch.randn(net.num_params, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    plan = plan_for(net)
    assert plan is not None
    for rows in [slice(0, 8)] + chunks(8, 3):
        fg = second_order(plan, net, p["theta_s"], v, x[rows], y[rows], True, batch_size=8, want_label=True)
        ag = autograd_step(net, p["theta_s"], v, x[rows], y[rows], True, 8, want_label=True)
        assert len(fg) == len(ag) == 4
        for a, b in zip(fg, ag):
            assert rel(a, b) < 1e-10
    # Without the label term: the three items as before.
    assert len(second_order(plan, net, p["theta_s"], v, x, y, True)) == 3


def test_bad_label_logits_raise() -> None:
    p = problem()
    with pytest.raises(ValueError, match="label_logits"):
        run(p, "constant", logits=p["logits"][:5])


# --------------------------------------------------------------------------- the initial labels


def test_misclassified_picks_are_replaced_by_right_ones_of_their_class() -> None:
    """DATM's rule with an expert that calls every image of the class of its first pixel's sign."""
    from mctool.training.labels import replace_misclassified

    y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    x = torch.tensor([-1.0, 1.0, -1.0, 1.0, 1.0, -1.0, 1.0, -1.0]).view(8, 1)  # predicted 0 if x < 0

    def predict(xb: torch.Tensor) -> torch.Tensor:
        return torch.cat([-xb, xb], dim=1)  # logits: class 1 when x > 0

    gen = torch.Generator().manual_seed(0)
    picks, left = replace_misclassified(predict, x, y, torch.tensor([1, 0, 5, 4]), gen)
    assert left == 0 and picks[1] == 0 and picks[3] == 4  # right ones stay where they are
    assert picks[0] == 2 and picks[2] in (6,)  # the only right, unpicked images of classes 0 and 1
    # A pool without a right candidate: the misclassified pick stays, and is counted.
    picks, left = replace_misclassified(predict, x, y, torch.tensor([1, 4]), gen, pool=torch.tensor([1, 3, 4]))
    assert picks.tolist() == [1, 4] and left == 1


# --------------------------------------------------------------------------- distill end to end


def _distill(buffer, out, data_dir, *extra, iterations=4):
    from tests.test_distill import run_distill

    return run_distill(buffer, out, data_dir, "--learn-labels", "--lr-label", "50", *extra, iterations=iterations)


def _group(path, name="mct-ipc2"):
    import h5py

    f = h5py.File(path)
    return f, f[f"synsets/{name}"]


def test_learned_labels_are_stored_as_probabilities_and_logits(tmp_path, convex_buffer, data_dir) -> None:
    import numpy as np

    start, out = tmp_path / "start.h5", tmp_path / "s.h5"
    assert _distill(convex_buffer, start, data_dir, iterations=0).exit_code == 0
    r = _distill(convex_buffer, out, data_dir, iterations=3)
    assert r.exit_code == 0, r.output
    f0, g0 = _group(start)
    f, g = _group(out)
    with f0, f:
        labels, logits = g["labels"][()], g["checkpoint/label_logits"][()]
        assert labels.shape == (20, 10) and labels.dtype == np.float32
        assert np.allclose(labels, torch.softmax(torch.from_numpy(logits), 1).numpy(), atol=1e-7)
        assert np.abs(labels.sum(1) - 1).max() < 1e-5
        assert g["checkpoint/label_logits_velocity"].shape == (20, 10)
        assert not np.array_equal(labels, g0["labels"][()])  # learned: they moved
        # The initial labels are the expert's softmax: on its own right picks, it argmaxes their class.
        start_labels = g0["labels"][()]
        hard = np.repeat(np.arange(10), 2)
        assert (start_labels.argmax(1) == hard).mean() >= 0.5
    from tests.helpers import cli

    r = cli("inspect", out)  # a learned-label synset reads like any soft-label one
    assert r.exit_code == 0 and "mct-ipc2" in r.stdout, r.output


def test_resume_with_learned_labels_equals_uninterrupted(tmp_path, convex_buffer, data_dir) -> None:
    """Bit for bit on the CPU, with periodic evaluation, micro-batches and --batch-syn on."""
    import numpy as np

    extra = ("--eval-every", "2", "--eval-epochs", "2", "--micro-batch", "3", "--batch-syn", "8", "--grad", "adjoint")
    full, part = tmp_path / "full.h5", tmp_path / "part.h5"
    assert _distill(convex_buffer, full, data_dir, *extra, iterations=5).exit_code == 0
    assert _distill(convex_buffer, part, data_dir, *extra, iterations=3).exit_code == 0
    r = _distill(convex_buffer, part, data_dir, *extra, "--resume", iterations=5)
    assert r.exit_code == 0, r.output
    fa, a = _group(full)
    fb, b = _group(part)
    with fa, fb:
        for key in ("images", "labels", "checkpoint/label_logits", "checkpoint/label_logits_velocity",
                    "best/labels", "best/images"):
            assert np.array_equal(a[key][()], b[key][()]), key
        assert a.attrs["lr"] == b.attrs["lr"]
        # The best images keep the labels of their iteration, not the final ones.
        assert a["best"].attrs["iteration"] in (0, 2, 4, 5)  # iteration 0: the starting images are a candidate
        if a["best"].attrs["iteration"] != 5:
            assert not np.array_equal(a["best/labels"][()], a["labels"][()])


def test_hard_labels_where_the_run_learns_them_are_one_line(tmp_path, convex_buffer, data_dir) -> None:
    """A file whose synset and best images hold hard labels although its run learns them (a
    `--lr-backoff` cut would take the best images' labels back as logits: an internal error) is refused."""
    import h5py
    import numpy as np

    from tests.helpers import assert_one_line_error

    out = tmp_path / "s.h5"
    extra = ("--eval-every", "2", "--eval-epochs", "2")
    assert _distill(convex_buffer, out, data_dir, *extra, iterations=2).exit_code == 0
    with h5py.File(out, "r+") as f:
        g = f["synsets/mct-ipc2"]
        for key in ("labels", "best/labels"):
            del g[key]
            g[key] = np.repeat(np.arange(10), 2)
    before = out.read_bytes()
    r = _distill(convex_buffer, out, data_dir, *extra, "--resume", iterations=4)
    assert_one_line_error(r, 2, "soft labels", after_progress=True)
    assert out.read_bytes() == before


@pytest.mark.parametrize("setting, entry", [("learn_labels", "label_logits"), ("ema", "images_raw")])
def test_a_checkpoint_holding_what_the_settings_do_not_learn_is_one_line(tmp_path, convex_buffer, data_dir, setting,
                                                                         entry) -> None:
    """Stored settings that say a learnable is not learned (or not averaged) while the checkpoint
    holds its state disagree with the file: one line, not a resume of another run (the stored soft
    labels kept fixed, the raw images dropped)."""
    import json

    import h5py

    from tests.helpers import assert_one_line_error, cli

    out = tmp_path / "s.h5"
    assert _distill(convex_buffer, out, data_dir, "--ema", "0.5", iterations=2).exit_code == 0
    with h5py.File(out, "r+") as f:
        g = f["synsets/mct-ipc2"]
        g.attrs["config"] = json.dumps({**json.loads(g.attrs["config"]), setting: False if setting == "learn_labels"
                                        else 0.0})
    before = out.read_bytes()
    r = cli("distill", "--buffer", convex_buffer, "-o", out, "--data-dir", data_dir, "--resume", "--iterations", "4")
    assert_one_line_error(r, 2, f"'{entry}'", after_progress=True)
    assert out.read_bytes() == before


@pytest.mark.parametrize("key", ["checkpoint/label_logits_raw", "checkpoint/images_raw", "checkpoint/label_logits",
                                 "images"])
def test_stored_values_beyond_the_runs_bounds_are_one_line(tmp_path, convex_buffer, data_dir, key) -> None:
    """A checkpoint value no update could have made (beyond the bound an update is refused at, e.g.
    logits of 3e38) is damage: one line, exit 2, the file untouched (it was a divergence, exit 1,
    and the file rewritten)."""
    import h5py

    from tests.helpers import assert_one_line_error

    out = tmp_path / "s.h5"
    assert _distill(convex_buffer, out, data_dir, "--ema", "0.5", iterations=2).exit_code == 0
    with h5py.File(out, "r+") as f:
        f["synsets/mct-ipc2"][key][0, ...] = 3e38
    before = out.read_bytes()
    r = _distill(convex_buffer, out, data_dir, "--ema", "0.5", "--resume", iterations=4)
    assert_one_line_error(r, 2, key.split("/")[-1], after_progress=True)
    assert out.read_bytes() == before


@pytest.mark.parametrize("mode", ["unrolled", "adjoint"])
def test_learned_labels_in_every_mode_and_mtt(tmp_path, buffer, convex_buffer, data_dir, mode) -> None:
    assert _distill(convex_buffer, tmp_path / f"{mode}.h5", data_dir, "--grad", mode, iterations=2).exit_code == 0
    if mode == "adjoint":
        return
    r = _distill(buffer, tmp_path / "mtt.h5", data_dir, "--method", "mtt", "--expert-epochs", "1", iterations=1)
    assert r.exit_code == 0, r.output


def test_learned_and_expert_soft_labels_are_exclusive(tmp_path, convex_buffer, data_dir) -> None:
    from tests.helpers import assert_one_line_error

    r = _distill(convex_buffer, tmp_path / "x.h5", data_dir, "--soft-labels", iterations=1)
    assert_one_line_error(r, 2, "--learn-labels")
    assert not (tmp_path / "x.h5").exists()
    r = _distill(convex_buffer, tmp_path / "x.h5", data_dir, "--momentum-label", "1.5", iterations=1)
    assert_one_line_error(r, 2, "--momentum-label")


# --------------------------------------------------------------------------- evaluate: like with like


def test_evaluate_keeps_label_kinds_apart_and_labels_the_baseline_by_the_expert(tmp_path, buffer, convex_buffer,
                                                                                data_dir) -> None:
    import json

    from tests.helpers import assert_one_line_error, cli

    out = tmp_path / "s.h5"
    assert _distill(convex_buffer, out, data_dir, iterations=2).exit_code == 0
    base = ("evaluate", out, "--runs", "2", "--epochs", "2", "--data-dir", data_dir, "--quiet", "--baseline", "random",
            "--no-save")
    r = cli(*base, "--baseline-labels", "expert", "--buffer", convex_buffer, "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert [(e["kind"], e["labels"]) for e in doc["results"]] == [("synset", "soft"), ("random-real", "soft")]
    score = doc["scores"][0]
    assert (score["labels"], score["baseline_labels"]) == ("soft", "soft") and "like with like" not in score["note"]
    # The expert comes from the buffer named: a raw buffer for an MCT synset has no /convex to give it.
    assert_one_line_error(cli(*base, "--baseline-labels", "expert", "--buffer", buffer), 2, "convex")
    # auto without --buffer: a hard-label baseline, and the score says it is not like with like.
    r = cli(*base, "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["results"][1]["labels"] == "hard"
    assert doc["scores"][0]["baseline_labels"] == "hard" and "not like with like" in doc["scores"][0]["note"]
    r = cli(*[a for a in base if a != "--quiet"])  # the note names the buffer the synset records
    assert r.exit_code == 0 and "pass --buffer FILE (the buffer synset '" in r.stderr
    assert f"recorded as {convex_buffer.resolve()})" in r.stderr.replace("\n", "")
    # --labels hard: the same images on the classes they are stored under; the baseline follows (auto: hard).
    r = cli(*base, "--labels", "hard", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert [(e["kind"], e["labels"]) for e in doc["results"]] == [("synset", "hard"), ("random-real", "hard")]
    assert doc["scores"][0]["baseline_labels"] == "hard" and "like with like" not in doc["scores"][0]["note"]
    assert doc["scores"][0]["hlr"] is not None  # the experts' accuracy is the whole-data reference
    r = cli(*base, "--labels", "hard", "--baseline-labels", "expert", "--buffer", convex_buffer, "--json")
    assert r.exit_code == 0, r.output
    score = json.loads(r.stdout)["scores"][0]
    assert (score["labels"], score["baseline_labels"]) == ("hard", "soft") and "not like with like" in score["note"]
    r = cli(*base)  # the table shows the label kind per row
    assert r.exit_code == 0 and "labels" in r.stdout and "soft" in r.stdout
    assert_one_line_error(cli(*base, "--baseline-labels", "expert"), 2, "--buffer")
    assert_one_line_error(cli(*base, "--baseline-labels", "teacher"), 2, "--baseline-labels")
    assert_one_line_error(cli(*base, "--baseline-labels", "expert", "--buffer", tmp_path / "nope.h5"), 2, "--buffer")
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not hdf5")
    assert_one_line_error(cli(*base, "--baseline-labels", "expert", "--buffer", garbage), 2, "garbage.h5")
    assert_one_line_error(cli(*base, "--baseline-labels", "expert", "--buffer", tmp_path), 2, "is a directory")


def test_random_real_with_expert_labels(data_dir) -> None:
    from mctool.evaluate.evaluation import random_real
    from mctool.data.prepared import prepare

    prepared = prepare("mnist", data_dir, zca=True, zca_eps=0.1, device=torch.device("cpu"))
    x_hard, y_hard = random_real(prepared, 2, seed=3)

    sums = prepared.train_x.flatten(1).sum(1)
    t = float(sums[prepared.train_y == 0].quantile(0.6))

    def predict(xb: torch.Tensor) -> torch.Tensor:  # an "expert": class 0 when the pixel sum is below t, else 1
        d = t - xb.flatten(1).sum(1)
        return torch.stack([d, -d] + [torch.zeros(len(xb))] * 8, dim=1)

    x, y = random_real(prepared, 2, seed=3, expert=predict)
    assert y.shape == (20, 10) and torch.allclose(y.sum(1), torch.ones(20))
    assert torch.allclose(y, torch.softmax(predict(x), 1))
    assert x_hard.shape == x.shape and y_hard.dim() == 1
    # Class 0's draws are ones the expert calls class 0 (60 % of the class are).
    assert bool((x[:2].flatten(1).sum(1) < t).all())


def test_torchrun_with_learned_labels(tmp_path, convex_buffer, data_dir) -> None:
    """Under torchrun the label gradient is averaged with the others (runner: every tensor
    learnable); two processes write one synset whose labels are probabilities that moved."""
    import numpy as np

    from tests.test_distributed import torchrun

    out = tmp_path / "syn.h5"
    args = ["distill", "--buffer", convex_buffer, "-o", out, "--data-dir", data_dir, "--ipc", "2", "--syn-steps", "2",
            "--expert-epochs", "1", "--max-start-epoch", "1", "--iterations", "2", "--learn-labels", "--lr-label", "50",
            "--quiet"]
    r = torchrun(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    f, g = _group(out)
    with f:
        labels, logits = g["labels"][()], g["checkpoint/label_logits"][()]
        assert g["checkpoint/generators"].shape[0] == 2 and labels.shape == (20, 10)
        assert np.allclose(labels, torch.softmax(torch.from_numpy(logits), 1).numpy(), atol=1e-7)
        assert np.abs(g["checkpoint/label_logits_velocity"][()]).max() > 0
