"""Names from files kept apart from their display form (issue 24 item 11): a `folder:` dataset
whose path and class folders hold control characters goes through experts (new and appended),
convexify, distill (new and --resume), evaluate and export, and nothing printed holds a control
character."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from mctool import store
from tests.helpers import cli

EXPERTS = ["--epochs", "2", "--width", "8", "--quiet", "--no-zca"]
DISTILL = ["--ipc", "1", "--syn-steps", "2", "--expert-epochs", "1", "--max-start-epoch", "1", "--quiet"]


def test_a_folder_dataset_with_control_characters_in_its_path_goes_through_every_command(tmp_path: Path) -> None:
    data = tmp_path / "we\x07ird"
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 2)):
        for cls in ("ca\x1b[31mt", "dog"):
            for j in range(n):
                p = data / split / cls / f"{j}.png"
                p.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(p)
    buf, syn = tmp_path / "b.h5", tmp_path / "s.h5"
    steps = [["experts", f"folder:{data}", "--n", "1", "-o", buf, *EXPERTS],
             ["experts", f"folder:{data}", "--n", "2", "-o", buf, *EXPERTS],  # appends: same settings
             ["convexify", buf, "--interior", "1", "--quiet"],
             ["distill", "--buffer", buf, "-o", syn, "--iterations", "1", *DISTILL],  # loads the data by its name
             ["distill", "--buffer", buf, "-o", syn, "--iterations", "2", "--resume", *DISTILL],
             ["evaluate", syn, "--runs", "1", "--epochs", "1", "--quiet"],
             ["export", syn, "--format", "png", "-o", tmp_path / "png", "--quiet"],
             ["inspect", buf]]
    for argv in steps:
        r = cli(*argv)
        assert r.exit_code == 0, (argv[0], r.output)
        assert "\x1b" not in r.output and "\x07" not in r.output, (argv[0], r.output)
    with store.open_buffer(buf) as b:  # stored as it is, not as it is shown
        assert b.data.name == f"folder:{data.resolve()}" and b.data.class_names == ("ca\x1b[31mt", "dog")
    doc = json.loads((tmp_path / "png" / "mctool_export.json").read_text())
    assert doc["class_names"] == ["ca\x1b[31mt", "dog"]
    assert sorted(p.name for p in (tmp_path / "png").iterdir() if p.is_dir()) == ["000_ca_31mt", "001_dog"]
