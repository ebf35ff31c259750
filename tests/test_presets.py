"""Presets: the shipped values against Table A of the MCT supplement, user presets, the CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mctool.distill import resolve_config
from mctool.distill import load_preset
from mctool.presets import presets_dir
from tests.helpers import assert_one_line_error, cli

REPO = Path(__file__).resolve().parent.parent
TABLE_A = Path(__file__).parent / "data" / "table_a.md"
DATASETS = {"CIFAR-10": "cifar10", "CIFAR-100": "cifar100", "TinyImageNet": "tinyimagenet"}
# Table A column -> preset key
COLUMNS = {"syn_step": "syn_steps", "exp_ep": "expert_epochs", "max_ep": "max_start_epoch",
           "lr_img": "lr_img", "lr_lr": "lr_lr", "lr_init": "lr_init"}
PAPER = [f"{d}-ipc{i}" for d in ("cifar10", "cifar100", "tinyimagenet") for i in (1, 10, 50)]
OURS = [f"fashion-mnist-ipc{i}" for i in (1, 10, 50)]


def parse_table_a(path: Path = TABLE_A) -> dict[str, dict[str, float]]:
    """{preset name: {preset key: value}} from the markdown table."""
    lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip().startswith("|")]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    header, body = cells[0], [r for r in cells[1:] if not set("".join(r)) <= set("-: ")]
    assert header[:2] == ["Dataset", "ipc"] and set(header[2:]) == set(COLUMNS), header
    rows: dict[str, dict[str, float]] = {}
    dataset = None
    for row in body:
        assert len(row) == len(header), row
        if row[0]:
            dataset = DATASETS[row[0]]
        assert dataset is not None, "first row has no dataset"
        ipc = int(re.search(r"\d+", row[1]).group())  # the seed's stray 't 10' cell is ipc 10
        values = {COLUMNS[h]: float(c) for h, c in zip(header[2:], row[2:])}
        rows[f"{dataset}-ipc{ipc}"] = {"dataset": dataset, "ipc": ipc, **values}
    return rows


TABLE = parse_table_a()


def test_table_a_parses_into_nine_rows() -> None:
    assert sorted(TABLE) == sorted(PAPER)
    assert TABLE["tinyimagenet-ipc10"]["syn_steps"] == 30  # the row with the stray 't 10'
    assert TABLE["cifar10-ipc1"]["lr_lr"] == 1e-7


@pytest.mark.parametrize("name", PAPER)
def test_paper_preset_matches_table_a(name: str) -> None:
    p = load_preset(name)
    want = TABLE[name]
    assert p.name == name
    for key, value in want.items():
        got = p.values[key]
        assert got == value, f"{name}: {key} = {got!r}, Table A says {value!r}"
        if key in ("ipc", "syn_steps"):
            assert isinstance(got, int) and not isinstance(got, bool), (key, got)
        elif key != "dataset":
            assert isinstance(got, float), (key, got)
    assert p.values["zca"] is True  # "All experiments utilized ZCA whitening."
    assert p.values["source"] == "paper"


@pytest.mark.parametrize("name", OURS)
def test_own_presets_are_marked_ours(name: str) -> None:
    p = load_preset(name)
    assert p.values["source"] == "ours" and p.values["dataset"] == "fashion-mnist"
    assert p.values["ipc"] == int(name.rsplit("ipc", 1)[1])
    assert p.values["zca"] is True


def test_presets_ship_in_the_package() -> None:
    repo = {p.name: p.read_bytes() for p in (REPO / "presets").glob("*.toml")}
    shipped = {p.name: p.read_bytes() for p in presets_dir().glob("*.toml")}
    assert len(repo) == 12
    assert shipped == repo
    assert sorted(Path(n).stem for n in shipped) == sorted(PAPER + OURS)


# --------------------------------------------------------------------------- user presets


def user_preset(tmp_path: Path, extra: str = "", **replace: str) -> Path:
    """A copy of cifar10-ipc10 with some lines replaced or added."""
    text = (presets_dir() / "cifar10-ipc10.toml").read_text()
    for key, value in replace.items():
        text = re.sub(rf"(?m)^{key}\s*=.*$", f"{key} = {value}", text)
    path = tmp_path / "bad.toml"
    path.write_text(text + extra)
    return path


def test_unknown_key_in_user_preset(tmp_path: Path) -> None:
    path = user_preset(tmp_path, extra="lr_imgs = 100.0\n")
    r = cli("distill", "--preset", path)
    assert_one_line_error(r, 2, "lr_imgs")
    assert str(path) in r.stderr


def test_wrong_type_in_user_preset(tmp_path: Path) -> None:
    path = user_preset(tmp_path, ipc='"ten"')
    r = cli("distill", "--preset", path)
    assert_one_line_error(r, 2, "ipc")
    assert str(path) in r.stderr and "ten" in r.stderr


def test_valid_user_preset_loads(tmp_path: Path) -> None:
    path = user_preset(tmp_path, syn_steps="7")
    p = load_preset(path)
    assert p.values["syn_steps"] == 7 and p.values["lr_img"] == 1000.0 and p.name == "bad"


def test_unknown_preset_name_lists_presets() -> None:
    r = cli("distill", "--preset", "cifar11-ipc10")
    assert_one_line_error(r, 2, "cifar11-ipc10")
    for name in PAPER + OURS:
        assert name in r.stderr


# --------------------------------------------------------------------------- the CLI


def test_list_presets() -> None:
    r = cli("distill", "--list-presets")
    assert r.exit_code == 0, r.output
    for name in PAPER + OURS:
        assert name in r.stdout
    r = cli("distill", "--list-presets", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert sorted(d["name"] for d in doc) == sorted(PAPER + OURS)
    by_name = {d["name"]: d for d in doc}
    assert by_name["cifar10-ipc1"]["lr_lr"] == 1e-7 and by_name["fashion-mnist-ipc1"]["source"] == "ours"


def test_options_override_preset() -> None:
    cfg = resolve_config("cifar10-ipc10", {"syn_steps": 7, "lr_lr": None})
    assert cfg.syn_steps == 7
    assert cfg.lr_img == 1000.0 and cfg.lr_lr == 1e-5 and cfg.max_start_epoch == 10.0  # kept from the preset
    assert cfg.dataset == "cifar10" and cfg.ipc == 10 and cfg.preset == "cifar10-ipc10"
    assert resolve_config("cifar10-ipc10", {}).syn_steps == 40


def test_preset_without_buffer_says_what_to_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    r = cli("distill", "--preset", "tinyimagenet-ipc50")
    assert_one_line_error(r, 2, "mctool experts")
    assert "tinyimagenet" in r.stderr and "buffer.h5" in r.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_wheel_ships_every_preset(tmp_path: Path) -> None:
    """A wheel built from the repo carries presets/*.toml inside the package."""
    import subprocess
    import sys
    import zipfile

    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "-w", str(tmp_path), str(repo)], capture_output=True, text=True, timeout=300)
    if r.returncode != 0 and "No module named setuptools" in r.stderr:
        pytest.skip("setuptools is not installed in this environment")
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("mctool-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for preset in (repo / "presets").glob("*.toml"):
        assert f"mctool/presets/{preset.name}" in names
