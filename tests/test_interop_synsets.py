"""`mctool import` of synthetic sets made elsewhere: the MTT/MCT scripts' images_*.pt, a DD-Ranking
folder, our own exports — scored by `mctool evaluate` beside random real images; hostile files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from tests.conftest import cli
from tests.helpers import assert_one_line_error

CLASSES, C, H, W = 10, 1, 28, 28  # the tiny MNIST-format fixture


def _authors_files(folder: Path, tag: str = "best", ipc: int = 2, seed: int = 0, lr: float | None = 0.02,
                   labels: bool = True) -> torch.Tensor:
    """What the scripts' torch.save calls write: images_<tag>.pt, labels_<tag>.pt, syn_lr_<tag>.pt."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(CLASSES * ipc, C, H, W, generator=gen)
    torch.save(images.clone().requires_grad_(True), folder / f"images_{tag}.pt")  # image_syn is a leaf
    if labels:
        torch.save(torch.arange(CLASSES).repeat_interleave(ipc), folder / f"labels_{tag}.pt")
    if lr is not None:  # the learnable α, saved as the scripts hold it (a leaf that requires grad)
        torch.save(torch.tensor(lr).requires_grad_(True), folder / f"syn_lr_{tag}.pt")
    return images


def _stored(path: Path, name: str) -> h5py.Group:
    return h5py.File(path, "r")["synsets"][name]


def _no_output(out: Path) -> None:
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.*"))


def test_authors_images_import_and_evaluate_beside_random_real(tmp_path: Path, data_dir: Path) -> None:
    run = tmp_path / "logged_files" / "MNIST" / "run7"
    images = _authors_files(run, "best")
    _authors_files(run, "500", seed=1)
    out = tmp_path / "mtt.h5"
    # Two sets in the folder: the user names one; the dataset and the space must be stated.
    assert_one_line_error(cli("import", run, "-o", out, "--dataset", "mnist", "--no-zca"), 2, "name the one")
    assert_one_line_error(cli("import", run / "images_best.pt", "-o", out, "--no-zca", "--data-dir", data_dir), 2,
                          "--dataset")
    assert_one_line_error(cli("import", run / "images_best.pt", "-o", out, "--dataset", "mnist",
                              "--data-dir", data_dir), 2, "--zca or --no-zca")
    _no_output(out)
    r = cli("import", run / "images_best.pt", "-o", out, "--dataset", "mnist", "--no-zca", "--data-dir", data_dir,
            "--json", "--quiet")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["synset"] == "imported-best" and doc["ipc"] == 2 and doc["format"] == "mtt-scripts"
    assert doc["model"]["width"] == 128 and doc["model"]["depth"] == 3  # the scripts' ConvNet
    g = _stored(out, "imported-best")
    assert np.array_equal(g["images"][()], images.numpy())  # bit for bit, in the space they were saved in
    assert g["labels"][()].tolist() == np.repeat(np.arange(10), 2).tolist()
    assert g.attrs["lr"] == pytest.approx(0.02) and g.attrs["method"] == "imported"
    # The second set goes into the same file beside the first; iteration from the file name.
    r = cli("import", run / "images_500.pt", "-o", out, "--dataset", "mnist", "--no-zca", "--data-dir", data_dir,
            "--quiet", "--width", "8")
    assert_one_line_error(r, 2, "evaluated on ConvNet d3 w128")  # another model: not into this file
    r = cli("import", run / "images_500.pt", "-o", out, "--dataset", "mnist", "--no-zca", "--data-dir", data_dir,
            "--quiet")
    assert r.exit_code == 0, r.output
    assert _stored(out, "imported-500").attrs["iterations"] == 500
    # Rerunning the same import changes nothing; another set under a taken name is refused.
    before = out.read_bytes()
    r = cli("import", run / "images_500.pt", "-o", out, "--dataset", "mnist", "--no-zca", "--data-dir", data_dir,
            "--json", "--quiet")
    assert r.exit_code == 0 and json.loads(r.stdout)["already_imported"] and out.read_bytes() == before
    assert_one_line_error(cli("import", run / "images_best.pt", "-o", out, "--dataset", "mnist", "--no-zca",
                              "--data-dir", data_dir, "--name", "imported-500"), 2, "already holds a synset")
    r = cli("inspect", out)
    assert r.exit_code == 0 and "imported by `mctool import`, iteration 500" in " ".join(r.stdout.split())
    # Acceptance: evaluate scores the imported images with random real images beside them.
    r = cli("evaluate", out, "--name", "imported-best", "--baseline", "random", "--runs", "2", "--epochs", "2",
            "--data-dir", data_dir, "--json", "--quiet")
    assert r.exit_code == 0, r.output
    ev = json.loads(r.stdout)
    kinds = sorted(x["kind"] for x in ev["results"])
    assert kinds == ["random-real", "random-real", "synset", "synset"] or \
        sorted({x["kind"] for x in ev["results"]}) == ["random-real", "synset"]
    score = ev["scores"][0]
    assert score["random_real"] is not None and score["gain"] is not None
    assert score["gain"] == pytest.approx(score["mean"] - score["random_real"], abs=1e-9)


def test_mct_names_ipc_and_lr(tmp_path: Path, data_dir: Path) -> None:
    run = tmp_path / "convexified_v1"
    _authors_files(run, "ipc-2_100", lr=None)  # MCT's names; no lr saved
    out = tmp_path / "mct.h5"
    base = ["import", run / "images_ipc-2_100.pt", "-o", out, "--dataset", "mnist", "--no-zca", "--data-dir", data_dir]
    assert_one_line_error(cli(*base), 2, "--syn-lr")
    _no_output(out)
    assert_one_line_error(cli(*base, "--syn-lr", "-1"), 2, "--syn-lr must be a positive number")
    r = cli(*base, "--syn-lr", "0.03", "--json", "--quiet")
    assert r.exit_code == 0, r.output
    g = _stored(out, "imported-ipc-2_100")
    assert g.attrs["iterations"] == 100 and g.attrs["ipc"] == 2 and g.attrs["lr"] == pytest.approx(0.03)
    # The name says ipc 3 but 20 images of 10 classes are ipc 2: inconsistent, refused.
    os.replace(run / "images_ipc-2_100.pt", run / "images_ipc-3_100.pt")
    os.replace(run / "labels_ipc-2_100.pt", run / "labels_ipc-3_100.pt")
    out2 = tmp_path / "mct2.h5"
    assert_one_line_error(cli("import", run / "images_ipc-3_100.pt", "-o", out2, "--dataset", "mnist", "--no-zca",
                              "--data-dir", data_dir, "--syn-lr", "0.01"), 2, "says ipc 3")
    _no_output(out2)


def test_ddranking_folder_without_labels(tmp_path: Path, data_dir: Path) -> None:
    folder = tmp_path / "dd"
    folder.mkdir()
    images = torch.randn(30, C, H, W)
    torch.save(images, folder / "images.pt")
    torch.save(torch.tensor(0.05, dtype=torch.float64), folder / "lr.pt")
    out = tmp_path / "dd.h5"
    r = cli("import", folder, "-o", out, "--dataset", "mnist", "--no-zca", "--data-dir", data_dir, "--json", "--quiet")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["format"] == "ddranking" and doc["ipc"] == 3 and any("class-major" in n for n in doc["notes"])
    assert _stored(out, "imported")["labels"][()].tolist() == np.repeat(np.arange(10), 3).tolist()


def test_soft_labels_and_logits(tmp_path: Path, data_dir: Path) -> None:
    folder = tmp_path / "soft"
    _authors_files(folder, "7", labels=False)
    probs = torch.softmax(torch.randn(20, CLASSES), 1)
    torch.save(probs, folder / "labels_7.pt")
    base = ["import", folder / "images_7.pt", "--dataset", "mnist", "--no-zca", "--data-dir", data_dir, "--quiet"]
    r = cli(*base, "-o", tmp_path / "soft.h5")
    assert r.exit_code == 0, r.output
    assert np.allclose(_stored(tmp_path / "soft.h5", "imported-7")["labels"][()], probs.numpy())
    torch.save(torch.randn(20, CLASSES), folder / "labels_7.pt")  # logits, not probabilities
    assert_one_line_error(cli(*base, "-o", tmp_path / "logits.h5"), 2, "probabilities")
    _no_output(tmp_path / "logits.h5")


def test_zca_pixels_are_whitened_with_the_datasets_zca(tmp_path: Path, data_dir: Path) -> None:
    from mctool.data.prepared import prepare

    folder = tmp_path / "zca"
    folder.mkdir()
    pixels = torch.rand(10, C, H, W, generator=torch.Generator().manual_seed(3))
    torch.save(pixels, folder / "images_zca_5.pt")  # MTT's de-whitened copy
    torch.save(torch.arange(10), folder / "labels_5.pt")
    torch.save(torch.tensor(0.01), folder / "syn_lr_5.pt")
    out = tmp_path / "z.h5"
    assert_one_line_error(cli("import", folder / "images_zca_5.pt", "-o", out, "--dataset", "mnist", "--no-zca",
                              "--data-dir", data_dir), 2, "contradicts")
    r = cli("import", folder / "images_zca_5.pt", "-o", out, "--dataset", "mnist", "--data-dir", data_dir, "--json",
            "--quiet")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["zca"] is True and json.loads(r.stdout)["space"] == "pixels"
    expected = prepare("mnist", data_dir, True, 0.1, torch.device("cpu")).prep.apply(pixels)
    assert np.allclose(_stored(out, "imported-5")["images"][()], expected.numpy(), atol=1e-5)
    with h5py.File(out) as f:
        assert bool(f["dataset"].attrs["zca"])
    # Preprocessed images whose values all lie in [0, 1] get a note that they look like pixels.
    torch.save(pixels, folder / "images_5.pt")
    r = cli("import", folder / "images_5.pt", "-o", tmp_path / "p.h5", "--dataset", "mnist", "--no-zca",
            "--data-dir", data_dir, "--json", "--quiet")
    assert r.exit_code == 0 and any("--space pixels" in n for n in json.loads(r.stdout)["notes"])


def test_our_export_round_trips(tmp_path: Path, convex_buffer: Path, data_dir: Path) -> None:
    syn = tmp_path / "syn.h5"
    r = cli("distill", "--buffer", convex_buffer, "-o", syn, "--data-dir", data_dir, "--ipc", "1", "--syn-steps", "2",
            "--expert-epochs", "1", "--max-start-epoch", "2", "--iterations", "1", "--quiet")
    assert r.exit_code == 0, r.output
    exported = tmp_path / "exp"
    r = cli("export", syn, "--format", "ddranking", "-o", exported, "--data-dir", data_dir, "--quiet")
    assert r.exit_code == 0, r.output
    back = tmp_path / "back.h5"
    assert_one_line_error(cli("import", exported, "-o", back, "--no-zca", "--data-dir", data_dir), 2,
                          "the export says")
    r = cli("import", exported, "-o", back, "--data-dir", data_dir, "--json", "--quiet")  # all from the JSON
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["format"] == "mctool-export" and doc["model_from"].startswith("the export's")
    with h5py.File(syn) as a, h5py.File(back) as b:
        name = list(a["synsets"])[0]
        assert doc["synset"] == name
        for key in ("images", "labels"):
            assert np.array_equal(a["synsets"][name][key][()], b["synsets"][name][key][()])
        assert a["synsets"][name].attrs["lr"] == b["synsets"][name].attrs["lr"]
        assert a["model"].attrs["width"] == b["model"].attrs["width"] == 8
        assert a["dataset"].attrs["train_fingerprint"] == b["dataset"].attrs["train_fingerprint"]
    # The mtt layout (final images after 1 iteration: images_1.pt, labels_1.pt, lr_1.pt + the de-whitened
    # copy) comes back too.
    mtt = tmp_path / "mtt"
    r = cli("export", syn, "--format", "mtt", "-o", mtt, "--data-dir", data_dir, "--quiet")
    assert r.exit_code == 0, r.output
    r = cli("import", mtt / "images_1.pt", "-o", tmp_path / "back-mtt.h5", "--data-dir", data_dir, "--json",
            "--quiet")
    assert r.exit_code == 0, r.output
    with h5py.File(syn) as a, h5py.File(tmp_path / "back-mtt.h5") as b:
        name = list(a["synsets"])[0]
        assert np.array_equal(a["synsets"][name]["images"][()], b["synsets"][name]["images"][()])
    # A file changed after the export is refused by its checksum.
    torch.save(torch.randn(10, C, H, W), exported / "images.pt")
    assert_one_line_error(cli("import", exported, "-o", tmp_path / "c.h5", "--data-dir", data_dir), 2, "SHA-256")
    _no_output(tmp_path / "c.h5")
    # A description nested too deeply for Python's JSON parser: one line, to import and to export over.
    (exported / "mctool_export.json").write_text("[" * 100_000)
    assert_one_line_error(cli("import", exported, "-o", tmp_path / "d.h5", "--data-dir", data_dir), 2, "unreadable")
    _no_output(tmp_path / "d.h5")
    assert_one_line_error(cli("export", syn, "--format", "ddranking", "-o", exported, "--data-dir", data_dir), 2,
                          "not an earlier mctool export")


# --------------------------------------------------------------------------- hostile files


def _bad_case(tmp_path: Path, data_dir: Path, contains: str, *extra: str, images: torch.Tensor | None = None,
              labels: torch.Tensor | None = None, lr: torch.Tensor | None = None) -> None:
    folder = tmp_path / "bad"
    _authors_files(folder, "1")
    if images is not None:
        torch.save(images, folder / "images_1.pt")
    if labels is not None:
        torch.save(labels, folder / "labels_1.pt")
    if lr is not None:
        torch.save(lr, folder / "syn_lr_1.pt")
    out = tmp_path / "out.h5"
    r = cli("import", folder / "images_1.pt", "-o", out, "--dataset", "mnist", "--no-zca", "--data-dir", data_dir,
            *extra)
    assert_one_line_error(r, 2, contains, after_progress=True)
    _no_output(out)


def _nan_images() -> torch.Tensor:
    x = torch.randn(20, C, H, W)
    x[3, 0, 1, 2] = float("nan")
    return x


@pytest.mark.parametrize("case", [
    ("NaN or infinite", {"images": _nan_images()}),
    ("mnist's are [N, 1, 28, 28]", {"images": torch.randn(20, 3, 28, 28)}),
    ("mnist's are [N, 1, 28, 28]", {"images": torch.randn(20, 28, 28)}),
    ("not a whole number of images", {"images": torch.randn(21, 1, 28, 28)}),
    ("expected floating point", {"images": torch.zeros(20, 1, 28, 28, dtype=torch.uint8)}),
    # 10^10 images declared over a one-element storage (stride 0): refused before any allocation
    # (by the restricted reader's own limit on what one read may take).
    ("half the memory available", {"images": torch.zeros(1, 1, 1, 1).expand(10 ** 10, 1, 28, 28)}),
    ("outside 0..9", {"labels": torch.arange(20)}),
    ("class 0 has 3 images", {"labels": torch.tensor([0] * 3 + [1] + [2] * 2 + sum(([c] * 2 for c in range(3, 10)),
                                                                                  []))}),
    ("expected [20] class ids", {"labels": torch.arange(10)}),
    ("labels hold NaN", {"labels": torch.full((20,), float("nan"))}),
    ("not a usable learning rate", {"lr": torch.tensor(-0.003)}),
    ("not a usable learning rate", {"lr": torch.tensor(float("nan"))}),
    ("expected one floating-point number", {"lr": torch.ones(3)}),
    ("holds a dict", {"images": {"x": torch.zeros(2)}}),  # type: ignore[dict-item]
], ids=lambda c: c[0][:24])
def test_hostile_synset_files(tmp_path: Path, data_dir: Path, case: tuple[str, dict[str, torch.Tensor]]) -> None:
    contains, files = case
    _bad_case(tmp_path, data_dir, contains, **files)


def test_storage_larger_than_the_tensor_is_refused_before_reading(tmp_path: Path) -> None:
    from mctool.interop.synsets_import import Found, SynsetImportConfig, read_checked
    from mctool.interop.torchfile import TorchFileError

    big = torch.zeros(4_000_000)  # 16 MB storage of which the tensor views 62 KB
    torch.save(big[: 20 * C * H * W].view(20, C, H, W), tmp_path / "images_1.pt")
    found = Found("mtt-scripts", tmp_path / "images_1.pt", None, None, False, "1")
    for limit in (1 << 20, 1 << 30):  # refused whatever the memory: the storage is 250 times the tensor
        with pytest.raises(TorchFileError, match="storage declares 16000000 bytes for a .* tensor of 62720 bytes"):
            read_checked(found, SynsetImportConfig(lr=0.01), (C, H, W), CLASSES, limit=limit)
    # A slice of a storage twice its size (a view saved as it was) is read.
    torch.save(torch.randn(40, C, H, W)[:20], tmp_path / "images_1.pt")
    x = read_checked(found, SynsetImportConfig(lr=0.01), (C, H, W), CLASSES, limit=64 << 20)
    assert x.images.shape == (20, C, H, W) and x.ipc == 2


def test_unsafe_pickle_runs_nothing(tmp_path: Path, data_dir: Path) -> None:
    import pickle
    import zipfile

    folder = tmp_path / "evil"
    _authors_files(folder, "1")
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):  # noqa: D105
            return (os.system, (f"touch {marker}",))

    with zipfile.ZipFile(folder / "images_1.pt", "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(Evil(), protocol=2))
    out = tmp_path / "o.h5"
    assert_one_line_error(cli("import", folder / "images_1.pt", "-o", out, "--dataset", "mnist", "--no-zca",
                              "--data-dir", data_dir), 2, "refused")
    assert not marker.exists()
    _no_output(out)


def test_output_rules(tmp_path: Path, data_dir: Path, buffer: Path) -> None:
    folder = tmp_path / "run"
    _authors_files(folder, "best")
    base = ["import", folder / "images_best.pt", "--dataset", "mnist", "--no-zca", "--data-dir", data_dir]
    outside = tmp_path / "outside.h5"
    outside.write_bytes(b"precious")
    link = tmp_path / "link.h5"
    link.symlink_to(outside)
    assert_one_line_error(cli(*base, "-o", link), 2, "symbolic link")
    assert outside.read_bytes() == b"precious" and link.is_symlink()
    dangling = tmp_path / "dangling.h5"
    dangling.symlink_to(tmp_path / "nowhere.h5")
    assert_one_line_error(cli(*base, "-o", dangling), 2, "symbolic link")
    assert not (tmp_path / "nowhere.h5").exists()
    # A buffer (or any other file) is never turned into a synset file.
    copy = tmp_path / "buffer.h5"
    copy.write_bytes(buffer.read_bytes())
    assert_one_line_error(cli(*base, "-o", copy), 2, "not synthetic sets")
    assert copy.read_bytes() == buffer.read_bytes()
    other = tmp_path / "notes.txt"
    other.write_text("mine")
    assert_one_line_error(cli(*base, "-o", other), 2, "not an mctool synset file")
    assert other.read_text() == "mine"
    # A companion that is a link to a device is refused, not read, nor taken as absent.
    (folder / "labels_best.pt").unlink()
    (folder / "labels_best.pt").symlink_to("/dev/zero")
    assert_one_line_error(cli(*base, "-o", tmp_path / "z.h5"), 2, "not a regular file")
    _no_output(tmp_path / "z.h5")
    device = tmp_path / "images_9.pt"
    device.symlink_to("/dev/zero")
    assert_one_line_error(cli("import", device, "--kind", "synset", "--dataset", "mnist", "--no-zca", "-o",
                              tmp_path / "d.h5"), 2, "not a regular file")
    # Options for synthetic sets are refused for a folder of experts.
    experts = tmp_path / "experts"
    experts.mkdir()
    (experts / "replay_buffer_0.pt").write_bytes(b"x")
    assert_one_line_error(cli("import", experts, "--dataset", "mnist", "--no-zca", "--syn-lr", "0.1"), 2,
                          "for synthetic sets")
