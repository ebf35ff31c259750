"""Rewrite references to mctool's flat modules after the regroup into layer packages (0.3.0).

The regroup moved 23 flat modules of mctool/ into packages by layer (MOVES below) with `git mv`.
This script rewrites every reference to an old module path in the tracked text files:
`from mctool.X import`, `import mctool.X`, `from mctool import X`, dotted strings
("mctool.X.attr": monkeypatch targets, docstrings) and paths (mctool/X.py). It is idempotent:
run it again after merging a branch written against the old layout, then check the diff (a bare
`mctool.data`, `mctool.matching` or `mctool.evaluate` is taken for the old module, so a new
reference to one of those packages themselves must be written as `mctool/data/` or by hand in SKIP).
CHANGELOG.md is rewritten only above its first released section (history keeps the old paths).

    python tools/regroup.py            # rewrite in place, list the files changed
    python tools/regroup.py --check    # list what would change, exit 1 if anything would

Delete this script once no branch predates the regroup.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# old module under mctool. -> new module under mctool.
MOVES = {
    "errors": "core.errors", "settings": "core.settings", "progress": "core.progress", "device": "core.device",
    "distributed": "core.distributed", "allocator": "core.allocator", "text": "core.text",
    "data": "data.datasets", "prepared": "data.prepared", "augment": "data.augment",
    "functional": "models.functional",
    "train": "training.train", "ensemble": "training.ensemble", "labels": "training.labels",
    "matching": "matching.loss", "secondorder": "matching.secondorder", "fastgrad": "matching.fastgrad",
    "microbatch": "matching.microbatch", "memory": "matching.memory",
    "convex": "convexify.runner", "trajectory": "convexify.trajectory",
    "evaluate": "evaluate.evaluation", "scores": "evaluate.scores",
}
SUFFIXES = {".py", ".md", ".sh", ".toml", ".txt", ".cfg"}
EXTRA = {".ci/run"}
# Written for the new layout, naming the packages data, matching and evaluate, which the old
# module names cannot be told from: never rewritten.
SKIP = {"tools/regroup.py", "tests/test_imports.py"}


def _submodules(package: str) -> list[str]:
    return sorted(new.split(".")[1] for new in MOVES.values() if new.split(".")[0] == package)


def _dotted(old: str) -> re.Pattern[str]:
    """mctool.OLD as a whole dotted name; where the new package has OLD's name (data, matching,
    evaluate), not mctool.OLD.<its submodule> nor `mctool.OLD import <its submodule>` (already new)."""
    guard = ""
    if old in {new.split(".")[0] for new in MOVES.values()}:
        subs = "|".join(_submodules(old))
        guard = rf"(?!\.(?:{subs})\b)(?! import (?:{subs})\b)"
    return re.compile(rf"(?<![\w.])mctool\.{old}(?!\w){guard}")


DOTTED = [(_dotted(old), f"mctool.{new}") for old, new in MOVES.items()]
PATHS = [(re.compile(rf"(?<![\w.-])mctool/{old}\.py\b"), f"mctool/{new.replace('.', '/')}.py")
         for old, new in MOVES.items()]
FROM_ROOT = re.compile(r"^(?P<indent>\s*)from mctool import (?P<names>[\w ,]+?)(?P<tail>\s*(?:#.*)?)$")


def _from_root(line: str) -> str:
    """`from mctool import a, b as c` with moved names split into `from mctool.PKG import LEAF [as NAME]`."""
    m = FROM_ROOT.match(line)
    if not m:
        return line
    kept: list[str] = []
    moved: list[str] = []
    for part in (p.strip() for p in m["names"].split(",")):
        name, _, alias = (s.strip() for s in part.partition(" as "))
        if name not in MOVES:
            kept.append(part)
            continue
        package, leaf = MOVES[name].split(".")
        local = alias or name
        moved.append(f"from mctool.{package} import {leaf}" + (f" as {local}" if local != leaf else ""))
    if not moved:
        return line
    lines = ([f"from mctool import {', '.join(kept)}"] if kept else []) + moved
    return "\n".join(m["indent"] + s for s in lines) + m["tail"]


def rewrite(text: str) -> str:
    out = []
    for line in text.split("\n"):
        line = _from_root(line)
        for pattern, new in DOTTED:
            line = pattern.sub(new, line)
        for pattern, new in PATHS:
            line = pattern.sub(new, line)
        out.append(line)
    return "\n".join(out)


def rewrite_file(path: Path) -> str:
    text = path.read_text()
    if path.name == "CHANGELOG.md":  # only the unreleased part: released entries name the paths of their time
        head, sep, rest = text.partition("\n## [0.")
        return rewrite(head) + sep + rest
    return rewrite(text)


def main() -> int:
    check = "--check" in sys.argv[1:]
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    changed = []
    for name in files:
        path = ROOT / name
        if name in SKIP or path.is_symlink() or not path.is_file():
            continue
        if path.suffix not in SUFFIXES and name not in EXTRA:
            continue
        old = path.read_text()
        new = rewrite_file(path)
        if new != old:
            changed.append(name)
            if not check:
                path.write_text(new)
    print("\n".join(changed))
    return 1 if check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
