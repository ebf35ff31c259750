"""Export writes only its named folder, as a whole (issue 24 items 3, 5, 7, 12; issue 25's names).

Each test reproduces the item as the issue wrote it, then checks the end is clean: a one-line
refusal (exit 2) or the right output, and the files outside the output untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from mctool.interop import h5out
from mctool.interop.export import META_NAME, load_export, mtt_model, tensor_names
from mctool.models import ModelSpec
from mctool.store import folders
from tests.helpers import assert_one_line_error, cli

TINY = ["--syn-steps", "2", "--expert-epochs", "1", "--max-start-epoch", "2", "--lr-img", "100", "--lr-lr", "1e-5",
        "--lr-init", "0.01", "--iterations", "2", "--quiet"]


def _distill(out: Path, buffer: Path, data_dir: Path, ipc: int) -> Path:
    r = cli("distill", "--buffer", buffer, "-o", out, "--data-dir", data_dir, "--ipc", str(ipc), *TINY)
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def synsets(tmp_path_factory: pytest.TempPathFactory, convex_buffer: Path, data_dir: Path) -> tuple[Path, Path]:
    """(ipc 2, ipc 1) synset files."""
    root = tmp_path_factory.mktemp("synsets")
    return (_distill(root / "big.h5", convex_buffer, data_dir, 2), _distill(root / "small.h5", convex_buffer, data_dir, 1))


def _export(syn: Path, out: Path, fmt: str, data_dir: Path, *extra: str):
    return cli("export", syn, "--format", fmt, "-o", out, "--data-dir", data_dir, "--quiet", *extra)


def _tree(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file (links as 'link:TARGET')."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_symlink():
            out[rel] = f"link:{os.readlink(p)}"
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture
def outside(tmp_path: Path) -> Iterator[Path]:
    """A file and a folder outside every output, which nothing may change."""
    victim = tmp_path / "outside"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    before = _tree(victim)
    yield victim
    assert _tree(victim) == before, "a file outside the output changed"


# --------------------------------------------------------------------------- item 3: links


@pytest.mark.parametrize("fmt", ["png", "ddranking"])
def test_links_planted_in_an_earlier_export_are_refused(fmt: str, tmp_path: Path, synsets, data_dir: Path,
                                                        outside: Path) -> None:
    big, _ = synsets
    out = tmp_path / "out"
    assert _export(big, out, fmt, data_dir).exit_code == 0
    first = next(p for p in sorted(out.rglob("*")) if p.is_file() and p.name != META_NAME)
    plants = [(first, outside / "precious.txt"), (out / f".{META_NAME}.tmp", outside / "precious.txt")]
    if fmt == "png":
        plants.append((first.parent, outside))
    for link, to in plants:
        saved = tmp_path / "saved"
        os.rename(link, saved) if link.exists() else None
        link.symlink_to(to)
        before = _tree(out)
        assert_one_line_error(_export(big, out, fmt, data_dir), 2, "symbolic link")
        assert _tree(out) == before
        link.unlink()
        if saved.exists():
            os.rename(saved, link)
    # The description itself a link to an outside file: not an earlier export of ours.
    meta = out / META_NAME
    (outside / "copy.json").write_bytes(meta.read_bytes())
    meta.unlink()
    meta.symlink_to(outside / "copy.json")
    assert_one_line_error(_export(big, out, fmt, data_dir), 2, "not an earlier mctool export")
    (outside / "copy.json").unlink()


def test_an_output_folder_that_is_a_link_is_refused(tmp_path: Path, synsets, data_dir: Path, outside: Path) -> None:
    link = tmp_path / "out"
    link.symlink_to(outside)
    assert_one_line_error(_export(synsets[0], link, "mtt", data_dir), 2, "symbolic link")
    assert link.is_symlink()


def test_a_folder_holding_the_input_or_other_files_is_refused(tmp_path: Path, synsets, data_dir: Path) -> None:
    folder = tmp_path / "work"
    folder.mkdir()
    syn = folder / "syn.h5"
    syn.write_bytes(synsets[0].read_bytes())
    before = _tree(folder)
    assert_one_line_error(_export(syn, folder, "mtt", data_dir), 2, "holds the input")
    out = tmp_path / "out"
    assert _export(syn, out, "mtt", data_dir).exit_code == 0
    (out / "notes.txt").write_text("mine")
    assert_one_line_error(_export(syn, out, "ddranking", data_dir), 2, "notes.txt")
    assert (out / "notes.txt").read_text() == "mine" and _tree(folder) == before


# --------------------------------------------------------------------------- item 5: kills


def test_an_export_killed_before_its_json_can_be_run_again(tmp_path: Path, synsets, data_dir: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A stage left by a killed export (no JSON) neither blocks the rerun nor stays behind."""
    out = tmp_path / "out"
    dead = tmp_path / f".out.abc123{folders.STAGE_SUFFIX}"
    dead.mkdir()
    (dead / folders._MARK).write_bytes(b"")  # the first file every stage gets
    (dead / "images_2.pt").write_bytes(b"half")
    foreign = tmp_path / f".out.xyz789{folders.STAGE_SUFFIX}"  # named like one, but not ours: kept
    foreign.mkdir()
    (foreign / "mine.txt").write_text("mine")
    old = os.stat(dead).st_mtime - 60
    os.utime(dead, (old, old))
    assert _export(synsets[0], out, "mtt", data_dir).exit_code == 0
    assert not dead.exists() and sorted(p.name for p in tmp_path.iterdir()) == [foreign.name, "out"]
    assert (foreign / "mine.txt").read_text() == "mine"
    assert load_export(out).images.shape[0] == 20


@pytest.mark.parametrize("fmt", ["mtt", "ddranking", "png"])
def test_a_re_export_stopped_midway_leaves_the_old_export_whole(fmt: str, tmp_path: Path, synsets, data_dir: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    big, small = synsets
    out = tmp_path / "out"
    assert _export(big, out, fmt, data_dir).exit_code == 0
    before = _tree(out)
    calls = {"n": 0}
    real = folders.Stage.write

    def failing(self, rel, data):  # the third file: images written, labels not yet
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, rel, data)

    monkeypatch.setattr(folders.Stage, "write", failing)
    r = _export(small, out, fmt, data_dir)
    assert r.exit_code != 0
    monkeypatch.undo()
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "a temporary was left"
    assert _export(small, out, fmt, data_dir).exit_code == 0


# --------------------------------------------------------------------------- item 7: stale files


def test_a_smaller_re_export_keeps_no_older_pngs_and_a_format_switch_no_png_folders(tmp_path: Path, synsets,
                                                                                   data_dir: Path) -> None:
    big, small = synsets
    out = tmp_path / "out"
    assert _export(big, out, "png", data_dir).exit_code == 0
    assert len(list(out.rglob("*.png"))) == 20
    assert _export(small, out, "png", data_dir).exit_code == 0
    pngs = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert len(pngs) == 10 and all(p.endswith("/0000.png") for p in pngs)
    assert sorted(json.loads((out / META_NAME).read_text())["written"]) == pngs
    assert _export(small, out, "ddranking", data_dir).exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(["images.pt", "labels.pt", "lr.pt", META_NAME])
    assert _export(small, out, "mtt", data_dir).exit_code == 0
    assert "images.pt" not in {p.name for p in out.iterdir()}


# --------------------------------------------------------------------------- item 12: modes


@pytest.mark.parametrize("fmt", ["mtt", "png"])
def test_every_exported_file_gets_the_umask_mode_also_on_re_export(fmt: str, tmp_path: Path, synsets,
                                                                   data_dir: Path) -> None:
    out = tmp_path / "out"
    old = os.umask(0o022)
    try:
        for _ in range(2):  # the second run replaces the first
            assert _export(synsets[0], out, fmt, data_dir).exit_code == 0
            modes = {p.relative_to(out).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*")}
            assert {m for p, m in modes.items() if (out / p).is_file()} == {0o644}, modes
            assert {m for p, m in modes.items() if (out / p).is_dir()} <= {0o755}, modes
            for p in out.rglob("*.pt"):
                p.chmod(0o600)  # as the issue found them; the re-export must not keep it
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755


# --------------------------------------------------------------------------- issue 25: names


def test_mtt_names_say_final_or_best_and_the_json_names_the_whole_network(tmp_path: Path, synsets,
                                                                          data_dir: Path) -> None:
    out = tmp_path / "out"
    assert _export(synsets[0], out, "mtt", data_dir).exit_code == 0
    doc = json.loads((out / META_NAME).read_text())
    assert doc["images"] == "final" and doc["files"]["images"] == "images_2.pt"
    assert not list(out.glob("*best*"))
    mtt = doc["receivers"]["mtt"]
    assert mtt["model_spec"]["net_width"] == 8 and mtt["model_spec"]["net_depth"] == 3
    assert mtt["model_spec"]["net_norm"] == "instancenorm" and mtt["model_spec"]["net_pooling"] == "avgpooling"
    assert mtt["model"] is None and "net_width=8" in mtt["note"]  # no MTT --model name builds width 8
    assert tensor_names("mtt", "best", 7)["images"] == "images_best.pt"
    assert tensor_names("mtt", "final", 7) == {"images": "images_7.pt", "labels": "labels_7.pt", "lr": "lr_7.pt",
                                               "pixels": "images_zca_7.pt"}
    assert mtt_model(ModelSpec()) == ("ConvNet", None)
    assert mtt_model(ModelSpec(depth=4))[0] == "ConvNetD4"
    assert mtt_model(ModelSpec(width=64))[0] == "ConvNetW64"
    assert mtt_model(ModelSpec(norm="batchnorm"))[0] == "ConvNetBN"
    assert mtt_model(ModelSpec(width=64, depth=4))[0] is None


def test_best_images_are_exported_as_images_best(tmp_path: Path, synsets) -> None:
    import dataclasses

    from mctool.interop.export import export_tensors

    syn = h5out.read_synset(synsets[0])
    best = dataclasses.replace(syn, source={**syn.source, "images": "best"})
    doc = export_tensors(best, tmp_path / "out", "mtt", None)
    assert doc["images"] == "best" and doc["files"]["images"] == "images_best.pt"
    assert torch.equal(torch.load(tmp_path / "out" / "images_best.pt", weights_only=True), syn.images)


def test_a_stage_of_a_live_writer_is_not_swept(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with folders.staged_folder(target, lambda p: False) as stage:
        old = os.stat(stage.path).st_mtime - 60
        os.utime(stage.path, (old, old))
        folders.sweep(target, lambda p: True)  # another export starting meanwhile
        assert stage.path.is_dir()
        stage.write("a.txt", b"a")
    assert (target / "a.txt").read_bytes() == b"a" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_file_added_to_the_old_export_while_the_new_one_is_built_is_kept(tmp_path: Path, synsets, data_dir: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    assert _export(synsets[0], out, "ddranking", data_dir).exit_code == 0
    real = folders.Stage.write

    def meanwhile(self, rel, data):
        if rel == "lr.pt":
            (out / "notes.txt").write_text("added meanwhile")
        return real(self, rel, data)

    monkeypatch.setattr(folders.Stage, "write", meanwhile)
    assert_one_line_error(_export(synsets[1], out, "ddranking", data_dir), 2, "notes.txt")
    assert (out / "notes.txt").read_text() == "added meanwhile" and len(load_export(out).images) == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
