"""Output at an 80-column terminal (COLUMNS=80 on a pseudo-terminal, as a user's would be): the
names a user must type are never cut, and long lines wrap at words instead of being cropped."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
from pathlib import Path

from mctool.configs.distill import list_presets

ROOT = Path(__file__).resolve().parents[1]
RELEASE = ROOT / "tests" / "data" / "release-0.1.0"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
GUIDES = set("│├└─ ")  # the tree's guide characters


def on_terminal(*args: str, columns: int = 80) -> str:
    """The command's stdout as an 80-column terminal shows it (escape codes stripped)."""
    master, slave = pty.openpty()
    env = {**os.environ, "COLUMNS": str(columns), "NO_COLOR": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "mctool", *args], stdout=slave, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, env=env, cwd=ROOT)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=120) == 0, proc.stderr.read() if proc.stderr else ""
    return ANSI.sub("", b"".join(chunks).decode().replace("\r\n", "\n"))


def words(text: str) -> list[str]:
    """The output's words in order, without the tree's guides."""
    return [w for w in text.split() if not set(w) <= GUIDES]


def fits(text: str, columns: int = 80) -> None:
    lines = text.rstrip("\n").splitlines()
    assert lines and all(len(line.rstrip()) <= columns for line in lines), text
    assert "…" not in text, text


def test_list_presets_keeps_every_name_whole() -> None:
    text = on_terminal("distill", "--list-presets")
    fits(text)
    names = [p.name for p in list_presets()]
    assert len(names) >= 12
    first_words = [line.split()[0] for line in text.splitlines() if line.strip()]
    for name in names:
        assert name in first_words, f"{name!r} is not shown whole at 80 columns:\n{text}"
    assert "(no preset)" in text and "lr_img=buffer's" in text
    assert "max_start_epoch=4" in text  # cifar10-ipc1's value beside its key


def test_list_presets_is_a_table_where_it_fits() -> None:
    text = on_terminal("distill", "--list-presets", columns=200)
    fits(text, 200)
    assert "max_start_epoch" in text and "┃ name" in text


def test_inspect_wraps_at_words() -> None:
    for name in ("buffer.h5", "synset.h5"):
        narrow = on_terminal("inspect", str(RELEASE / name))
        wide = on_terminal("inspect", str(RELEASE / name), columns=250)
        fits(narrow)
        assert max(len(line) for line in wide.splitlines()) > 80  # there was something to wrap
        # Every word of the wide output, in the same order: nothing cropped, nothing cut mid-word.
        assert words(narrow) == words(wide), narrow
