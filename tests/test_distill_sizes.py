"""What a distillation would allocate, checked before anything is allocated, and `--dry-run` from a
preset alone: sizes from options and presets against memory (issue 24 item 18), every epoch setting
against the experts' K by one rule (item 10), a dry run without a buffer (issue 25)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import pytest

from mctool.matching import memory
from tests.helpers import assert_one_line_error, cli
from tests.test_dry_run import tiny_imagenet_buffer

GIB = 2**30


def _rows(r) -> dict[str, dict]:
    assert r.exit_code == 0, r.output
    return {row["mode"]: row for row in json.loads(r.stdout)["rows"]}


def test_dry_run_from_a_preset_without_a_buffer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "free_bytes", lambda device: 16 * GIB)  # a 16 GiB machine
    buffer = tiny_imagenet_buffer(tmp_path / "tiny.h5")  # the same shape as the preset's, depth 3, width 128
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    r = cli("distill", "--preset", "tinyimagenet-ipc50", "--dry-run", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "constant" in r.stdout and "no buffer" in r.stdout and "GiB" in r.stdout
    alone = _rows(cli("distill", "--preset", "tinyimagenet-ipc50", "--dry-run", "--device", "cpu", "--json"))
    # The same memory model as with the buffer: the same figures, mode by mode.
    with_buffer = _rows(cli("distill", "--preset", "tinyimagenet-ipc50", "--buffer", buffer, "--dry-run", "--device",
                            "cpu", "--json"))
    for mode in ("constant", "adjoint", "unrolled"):
        for key in ("whole_bytes", "micro_batch", "chunked_bytes", "fits"):
            assert alone[mode][key] == with_buffer[mode][key], (mode, key)
    assert alone["constant"]["micro_batch"] is not None and alone["constant"]["fits"]
    # The micro-batch that fits a given memory size: a larger memory, larger chunks, within its budget.
    small = _rows(cli("distill", "--preset", "tinyimagenet-ipc50", "--dry-run", "--memory", "16GB", "--device", "cpu",
                      "--json"))["constant"]
    large = _rows(cli("distill", "--preset", "tinyimagenet-ipc50", "--dry-run", "--memory", "80GB", "--device",
                      "cuda", "--json"))["constant"]  # a GPU elsewhere: no GPU needed here
    assert small["chunked_bytes"] <= memory.DEFAULT_SAFETY["cpu"] * 16e9 and small["fits"]
    assert large["micro_batch"] > small["micro_batch"]
    # The network from the options: narrower, less memory; deeper, another figure.
    narrow = _rows(cli("distill", "--preset", "tinyimagenet-ipc50", "--dry-run", "--width", "64", "--device", "cpu",
                       "--json"))["constant"]
    deep = _rows(cli("distill", "--preset", "tinyimagenet-ipc50", "--dry-run", "--depth", "4", "--device", "cpu",
                     "--json"))["constant"]
    assert narrow["whole_bytes"] < alone["constant"]["whole_bytes"] != deep["whole_bytes"]
    assert not any(empty.iterdir()), "a dry run writes nothing"


def test_dry_run_without_a_buffer_refuses_what_it_cannot_know(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    buffer = tiny_imagenet_buffer(tmp_path / "tiny.h5")
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(cli("distill", "--dry-run"), 2, "needs a dataset: pass --preset")
    assert_one_line_error(cli("distill", "--preset", "cifar10-ipc10", "--dry-run", "--buffer", tmp_path / "typo.h5"),
                          2, "no such file")  # a named buffer that is not there is a mistake, not "no buffer"
    assert_one_line_error(cli("distill", "--preset", "tinyimagenet-ipc50", "--dry-run", "--buffer", buffer,
                              "--width", "64"), 2, "--width is for --dry-run without a buffer")
    assert_one_line_error(cli("distill", "--preset", "cifar10-ipc10", "--dry-run", "--memory", "lots"), 2,
                          "--memory: 'lots' is not a memory size")
    assert_one_line_error(cli("distill", "--preset", "cifar10-ipc10", "--dry-run", "--depth", "9"), 2, "--depth")
    assert_one_line_error(cli("distill", "--preset", "cifar10-ipc10", "--width", "64"), 2, "are for --dry-run")


def _zca(buffer: Path) -> bool:
    with h5py.File(buffer) as f:
        return bool(f["dataset"].attrs["zca"])


def test_sizes_are_checked_before_anything_is_allocated(tmp_path: Path, convex_buffer: Path, data_dir: Path) -> None:
    out = tmp_path / "o.h5"
    base = ["distill", "--buffer", convex_buffer, "-o", out, "--data-dir", data_dir, "--expert-epochs", "1",
            "--max-start-epoch", "2"]
    # 8 TB of images and 5 TB of per-step draws: one line, before the data is even loaded.
    assert_one_line_error(cli(*base, "--ipc", "99999999999"), 2,
                          "--ipc 99999999999: 99999999999 × 10 images of 1×28×28 need at least")
    assert_one_line_error(cli(*base, "--syn-steps", "1000000000"), 2,
                          "--syn-steps 1000000000: 1000000000 inner steps need at least")
    assert not out.exists()
    # The same from a preset, which the message names.
    preset = tmp_path / "huge.toml"
    preset.write_text(f'dataset = "mnist"\nzca = {str(_zca(convex_buffer)).lower()}\nipc = 99999999999\n'
                      "syn_steps = 2\nexpert_epochs = 1\nmax_start_epoch = 2\nlr_img = 100\nlr_lr = 1e-6\n"
                      "lr_init = 0.01\n")
    assert_one_line_error(cli("distill", "--preset", preset, "--buffer", convex_buffer, "-o", out, "--data-dir",
                              data_dir), 2, "--ipc 99999999999 (preset huge)")
    assert not out.exists()
    # A micro-batch larger than the batch is whole steps, not an allocation.
    r = cli(*base, "--ipc", "1", "--syn-steps", "2", "--iterations", "1", "--micro-batch", "99999999999", "--quiet")
    assert r.exit_code == 0, r.output


def test_the_library_checks_sizes_too(convex_buffer: Path, data_dir: Path) -> None:
    import torch

    from mctool import store
    from mctool.distill import resolve_config
    from mctool.distill.sizes import check_sizes, shape_of_buffer
    from mctool.core.errors import UsageError

    with store.open_buffer(convex_buffer) as buf:
        cfg = resolve_config(None, {"ipc": 99999999999, "expert_epochs": 1.0, "max_start_epoch": 2.0}, buf)
        shape = shape_of_buffer(cfg, buf)
        small = resolve_config(None, {"ipc": 1, "expert_epochs": 1.0, "max_start_epoch": 2.0}, buf)
    with pytest.raises(UsageError, match="--ipc 99999999999"):
        check_sizes(cfg, shape, torch.device("cpu"), data_loaded=True)
    check_sizes(small, shape, torch.device("cpu"), available=10**9)  # fits: nothing said
    # In 1 MB even the libraries' workspaces do not fit: no setting to blame, the iteration is named.
    with pytest.raises(UsageError, match="^one iteration needs at least .* more than the 1.0 MB free on cpu"):
        check_sizes(small, shape, torch.device("cpu"), available=10**6)


@pytest.mark.parametrize("args, message", [
    (["--expert-epochs", "1e308"], "--expert-epochs 1e+308 must be at most the experts' K = 4: pass --expert-epochs 4 "
                                   "or less"),
    (["--expert-epochs", "5"], "--expert-epochs 5 must be at most the experts' K = 4: pass --expert-epochs 4 or less, "
                               "or train experts with --epochs 6 or more"),
    (["--max-start-epoch", "4"], "--max-start-epoch 4 must be below the experts' K = 4: pass --max-start-epoch 3 or "
                                 "less, or train experts with --epochs 5 or more"),
    (["--max-start-epoch", "1e308"], "--max-start-epoch 1e+308 must be below the experts' K = 4"),
])
def test_epoch_settings_past_K_are_refused_alike(tmp_path: Path, buffer: Path, convex_buffer: Path, data_dir: Path,
                                                 args: list[str], message: str) -> None:
    settings = {"--expert-epochs": "1", "--max-start-epoch": "2"}
    settings[args[0]] = args[1]
    flat = [x for kv in settings.items() for x in kv]
    out = tmp_path / "o.h5"
    assert_one_line_error(cli("distill", "--buffer", convex_buffer, "-o", out, "--data-dir", data_dir, *flat), 2,
                          message)
    assert not out.exists()
    # The dry run refuses it as the run would, and so does --method mtt on the trajectories.
    assert_one_line_error(cli("distill", "--buffer", convex_buffer, "--dry-run", *flat), 2, message)
    assert_one_line_error(cli("distill", "--buffer", buffer, "-o", out, "--data-dir", data_dir, "--method", "mtt",
                              *flat), 2, message.split(":")[0])


def test_expert_epochs_equal_to_K_runs(tmp_path: Path, convex_buffer: Path, data_dir: Path) -> None:
    r = cli("distill", "--buffer", convex_buffer, "-o", tmp_path / "o.h5", "--data-dir", data_dir, "--ipc", "1",
            "--syn-steps", "2", "--expert-epochs", "4", "--max-start-epoch", "2", "--iterations", "1", "--quiet")
    assert r.exit_code == 0, r.output


def test_a_fixed_micro_batch_is_checked_as_given() -> None:
    import torch

    from mctool.distill import resolve_config
    from mctool.distill.sizes import check_sizes, shape_without_buffer
    from mctool.core.errors import UsageError

    auto = resolve_config("tinyimagenet-ipc50", {})
    shape = shape_without_buffer(auto)
    check_sizes(auto, shape, torch.device("cpu"), available=16 * GIB)  # auto: chunks that fit
    whole = resolve_config("tinyimagenet-ipc50", {"micro_batch": "0"})
    with pytest.raises(UsageError, match=r"^--micro-batch 0: one iteration needs at least .*activations"):
        check_sizes(whole, shape, torch.device("cpu"), available=16 * GIB, given={"micro_batch"})
    fixed = resolve_config("tinyimagenet-ipc50", {"micro_batch": "100"})
    check_sizes(fixed, shape, torch.device("cpu"), available=16 * GIB, given={"micro_batch"})
