"""Hostile artifacts (issue 14 item 2): an artifact is data, never a pointer.

Each file below is refused on open with one line — before anything is read from or written to
a file outside the artifact (a sentinel file watched with inotify, and its bytes compared) and
before any large allocation — and no escape sequence from a file ever reaches the terminal.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.conftest import cli
from tests.damage import ESC, Watch, command, digest, one_line_refusal

RELEASE = Path(__file__).parent / "data" / "release-0.1.0"
BUFFER_COMMANDS = ("inspect", "inspect-json", "inspect-png", "convexify", "convexify-o", "distill", "distill-mtt",
                   "experts")
SYNSET_COMMANDS = ("inspect", "inspect-json", "inspect-png", "evaluate", "distill-resume")
OSC_TITLE = "\x1b]0;pwned\x07"  # sets the terminal (tmux pane) title
OSC_CLIPBOARD = "\x1b]52;c;cm0gLXJmIH4=\x07"  # writes the clipboard
CSI_CLEAR = "\x1b[2J\x1b[H"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, buffer: Path) -> Path:
    """A folder with a sentinel data file and a sentinel HDF5 file that hostile artifacts point at."""
    root = tmp_path_factory.mktemp("hostile")
    rng = np.random.default_rng(0)
    (root / "sentinel.bin").write_bytes(rng.bytes(1 << 20))
    with h5py.File(root / "sentinel.h5", "w") as f:
        with h5py.File(buffer) as b:
            f.create_dataset("trajectories", data=b["experts/trajectories"][()])
        f.create_group("dataset")
    return root


def _hostile(root: Path, name: str, base: Path, change: Callable[[h5py.File, Path], None]) -> Path:
    p = root / name
    shutil.copyfile(base, p)
    with h5py.File(p, "r+", libver="latest") as f:  # new objects may hold big (dense) attributes
        change(f, root)
    return p


def _half_done(f: h5py.File) -> None:
    """Expert 1 not done: `mctool experts --n 3` would resume and write its row."""
    f["experts/done"][1] = False


def external_storage(f: h5py.File, root: Path) -> None:
    """/experts/trajectories keeps its values in sentinel.bin (HDF5 external raw storage)."""
    old = f["experts/trajectories"]
    shape, dtype = old.shape, old.dtype
    del f["experts/trajectories"]
    nbytes = int(np.prod(shape)) * dtype.itemsize
    f.create_dataset("experts/trajectories", shape=shape, dtype=dtype,
                     external=[(str(root / "sentinel.bin"), 0, nbytes)])
    _half_done(f)


def external_storage_relative(f: h5py.File, root: Path) -> None:
    """The same with a relative name (resolved against the working directory or the file's folder)."""
    f.create_dataset("experts/extra", shape=(16,), dtype="f4", external=[("sentinel.bin", 0, 64)])


def virtual_dataset(f: h5py.File, root: Path) -> None:
    """/experts/trajectories is a virtual dataset mapping sentinel.h5."""
    shape = f["experts/trajectories"].shape
    del f["experts/trajectories"]
    layout = h5py.VirtualLayout(shape=shape, dtype="f4")
    layout[...] = h5py.VirtualSource(str(root / "sentinel.h5"), "trajectories", shape=shape)
    f.create_virtual_dataset("experts/trajectories", layout)
    _half_done(f)


def external_link(f: h5py.File, root: Path) -> None:
    """/dataset is a link to a group in sentinel.h5."""
    del f["dataset"]
    f["dataset"] = h5py.ExternalLink(str(root / "sentinel.h5"), "/dataset")


def external_link_extra(f: h5py.File, root: Path) -> None:
    """An extra external link nobody reads (inspect followed them before)."""
    f["experts/elsewhere"] = h5py.ExternalLink(str(root / "sentinel.h5"), "/trajectories")


def soft_link(f: h5py.File, root: Path) -> None:
    """/convex is a soft link (to /experts)."""
    if "convex" in f:
        del f["convex"]
    f["convex"] = h5py.SoftLink("/experts")


def dangling_soft_link(f: h5py.File, root: Path) -> None:
    """A soft link to nothing."""
    f["model/missing"] = h5py.SoftLink("/no/such/thing")


def hard_link_cycle(f: h5py.File, root: Path) -> None:
    """A group that contains itself."""
    f["experts/again"] = f["experts"]


def plugin_filter(f: h5py.File, root: Path) -> None:
    """A dataset whose pipeline names filter 32004 (LZ4), which HDF5 would load from a plugin."""
    f.create_dataset("experts/packed", shape=(64,), dtype="f4", chunks=(16,), compression=32004,
                     allow_unknown_filter=True)


def big_attribute(f: h5py.File, root: Path) -> None:
    """A 100 MB attribute (on a new group: only new-style object headers hold big attributes)."""
    f.create_group("experts/notes").attrs["blob"] = np.zeros(100_000_000 // 8)


def big_text_attribute(f: h5py.File, root: Path) -> None:
    """20 MB of variable-length text in an attribute every command reads (its storage outside
    the attribute: the open checks see a 16-byte pointer)."""
    f["experts"].attrs["config"] = "x" * 20_000_000


def many_attributes(f: h5py.File, root: Path) -> None:
    """Thousands of small attributes on one group."""
    for i in range(2000):
        f["model"].attrs[f"a{i}"] = i


def many_objects(f: h5py.File, root: Path) -> None:
    """More groups than any artifact could hold."""
    g = f.create_group("junk")
    for i in range(10_050):
        g.create_group(str(i))


def huge_done(f: h5py.File, root: Path) -> None:
    """A million experts of K = 399 epochs declared done by a fill value: 1.6 GB of accuracies
    to read (under the read limit), none of it stored."""
    del f["experts/trajectories"]
    f["experts"].attrs["epochs"] = 399
    for name in ("done", "seeds", "test_accuracy", "train_loss"):
        dtype = f[f"experts/{name}"].dtype
        del f[f"experts/{name}"]
        shape = (1_000_000,) if name in ("done", "seeds") else (1_000_000, 400)
        f.create_dataset(f"experts/{name}", shape=shape, dtype=dtype, chunks=(4096, *shape[1:])[:len(shape)],
                         fillvalue=True if name == "done" else 0)


def huge_loss(f: h5py.File, root: Path) -> None:
    """A synset's loss declared as 4e9 values in a small file."""
    g = f[f"synsets/{next(iter(f['synsets']))}"]
    del g["loss"]
    g.create_dataset("loss", shape=(4_000_000_000,), dtype="f4", chunks=(1 << 20,))


def huge_loss_2d(f: h5py.File, root: Path) -> None:
    """The issue's [2, 4e9] declared shape."""
    g = f[f"synsets/{next(iter(f['synsets']))}"]
    del g["loss"]
    g.create_dataset("loss", shape=(2, 4_000_000_000), dtype="f4", chunks=(1, 1 << 20))


def huge_images(f: h5py.File, root: Path) -> None:
    """Images (and a dataset, model and velocity to match) of 4096x4096: 1 GB each, never stored."""
    d = f["dataset"]
    d.attrs["height"] = d.attrs["width"] = 4096
    d.attrs["normalization"] = json.dumps({"mean": [0.5], "std": [0.5]})
    m = f["model"]
    m.attrs["im_size"] = "[4096, 4096]"
    from mctool.models import ModelSpec, layer_sizes, layout_json, layout_of

    spec = ModelSpec(depth=int(m.attrs["depth"]), width=int(m.attrs["width"]), channels=1, num_classes=10,
                     im_size=(4096, 4096))
    m.attrs["layers"] = layout_json(layout_of(spec))
    m.attrs["num_params"] = sum(layer_sizes(layout_of(spec)))
    g = f[f"synsets/{next(iter(f['synsets']))}"]
    n = g["images"].shape[0]
    for name in ("images", "checkpoint/images_velocity"):
        del g[name]
        g.create_dataset(name, shape=(n, 1, 4096, 4096), dtype="f4", chunks=(1, 1, 256, 256))


# (name, base ("buffer" | "synset"), change, what the line must say, commands)
CORPUS = [
    ("external-storage", "buffer", external_storage, "external storage", BUFFER_COMMANDS),
    ("external-storage-relative", "buffer", external_storage_relative, "external storage", BUFFER_COMMANDS),
    ("virtual-dataset", "buffer", virtual_dataset, "virtual dataset", BUFFER_COMMANDS),
    ("external-link", "buffer", external_link, "link to another file", BUFFER_COMMANDS),
    ("external-link-extra", "buffer", external_link_extra, "link to another file", BUFFER_COMMANDS),
    ("soft-link", "buffer", soft_link, "SoftLink", BUFFER_COMMANDS),
    ("dangling-soft-link", "buffer", dangling_soft_link, "SoftLink", BUFFER_COMMANDS),
    ("hard-link-cycle", "buffer", hard_link_cycle, "links back", BUFFER_COMMANDS),
    ("plugin-filter", "buffer", plugin_filter, "filter 32004", BUFFER_COMMANDS),
    ("big-attribute", "buffer", big_attribute, "attribute 'blob'", ("inspect", "convexify", "experts")),
    ("big-text-attribute", "buffer", big_text_attribute, "attribute 'config'", ("inspect", "convexify", "experts")),
    ("many-attributes", "buffer", many_attributes, "attributes", ("inspect", "experts")),
    ("many-objects", "buffer", many_objects, "objects", ("inspect", "experts")),
    ("huge-done", "buffer", huge_done, "/experts/", BUFFER_COMMANDS),
    ("huge-loss", "synset", huge_loss, "/loss", SYNSET_COMMANDS),
    ("huge-loss-2d", "synset", huge_loss_2d, "/loss", SYNSET_COMMANDS),
    ("huge-images", "synset", huge_images, "/images", SYNSET_COMMANDS),
]


@pytest.fixture(scope="module")
def hostile(corpus: Path, buffer: Path) -> Callable[[str], Path]:
    """Hostile files, made once each."""
    made: dict[str, Path] = {}
    bases = {"buffer": buffer, "synset": RELEASE / "synset.h5"}

    def get(name: str) -> Path:
        if name not in made:
            _, base, change, _, _ = next(c for c in CORPUS if c[0] == name)
            made[name] = _hostile(corpus, f"{name}.h5", bases[base], change)
        return made[name]

    yield get
    for p in made.values():
        p.unlink(missing_ok=True)  # the 100 MB one


@pytest.mark.parametrize("name,base,change,says,commands", CORPUS, ids=[c[0] for c in CORPUS])
def test_hostile_file_is_refused_before_touching_anything_else(name, base, change, says, commands, hostile,
                                                               corpus: Path, data_dir: Path, tmp_path: Path,
                                                               monkeypatch) -> None:
    f = hostile(name)
    before = digest(f)
    sentinels = {p: digest(p) for p in (corpus / "sentinel.bin", corpus / "sentinel.h5")}
    monkeypatch.chdir(corpus)  # a relative external file name would resolve here
    watches = {p: Watch(p) for p in sentinels}
    try:
        for cmd in commands:
            work = tmp_path / cmd
            work.mkdir()
            argv = command(cmd, f, work, data_dir, buffer=RELEASE / "compact.h5", synset="mct-ipc2")
            if cmd == "experts":
                argv[argv.index("--n") + 1] = "2"  # resume the half-done buffer: expert 1 would be written
            for w in watches.values():
                w.__enter__()
            r = cli(*argv)
            for w in watches.values():
                w.__exit__()
            one_line_refusal(r, f, says)
            for p, w in watches.items():
                assert not w.touched, f"{cmd} opened or read {p.name}"
            assert not list(work.iterdir()), f"{cmd} wrote {list(work.iterdir())}"
    finally:
        for w in watches.values():
            w.close()
    assert digest(f) == before
    assert {p: digest(p) for p in sentinels} == sentinels


def _inspect_under_memory_limit(files: list[Path], headroom: int) -> list[dict]:
    """`mctool inspect --json` of each file, in one process that may map only `headroom` bytes
    more than it has once its modules are imported (torch alone maps gigabytes of address space):
    a list of {exit_code, stderr}."""
    code = (
        "import json, resource, sys\n"
        "from typer.testing import CliRunner\n"
        "from mctool.cli import app\n"
        "import mctool.plots\n"
        "runner = CliRunner()\n"
        "runner.invoke(app, ['inspect', '--help'])\n"
        "pages = int(open('/proc/self/statm').read().split()[0])\n"
        f"limit = pages * resource.getpagesize() + {headroom}\n"
        "resource.setrlimit(resource.RLIMIT_AS, (limit, limit))\n"
        "out = []\n"
        f"for f in {[str(f) for f in files]!r}:\n"
        "    r = runner.invoke(app, ['inspect', f, '--json'])\n"
        "    out.append({'exit_code': r.exit_code, 'stderr': r.stderr})\n"
        "print(json.dumps(out))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env,
                       cwd=Path(__file__).parent.parent)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_huge_declared_shapes_are_refused_without_allocating(hostile, buffer: Path) -> None:
    """With 1 GiB of address space to spare inspect still reads a normal file, and refuses each
    huge declared shape with its one line (a MemoryError would be an internal error)."""
    names = ["huge-done", "huge-loss", "huge-loss-2d", "huge-images"]
    files = [hostile(n) for n in names]
    ok, *refused = _inspect_under_memory_limit([buffer, *files], 1 << 30)
    assert ok["exit_code"] == 0, ok
    for name, f, r in zip(names, files, refused):
        lines = r["stderr"].strip().splitlines()
        assert r["exit_code"] == 2 and len(lines) == 1 and lines[0].startswith("mctool: error: "), (name, r)
        assert "internal error" not in r["stderr"] and "Memory" not in r["stderr"], r
        assert f.stat().st_size < 2_000_000  # small files, whatever they declare


# --------------------------------------------------------------------------- escape sequences


def _escapes(f: h5py.File, root: Path) -> None:
    """Escape sequences in every string a summary shows, and in names nobody reads."""
    f["dataset"].attrs["name"] = f"mnist{OSC_TITLE}"
    f["dataset"].attrs["class_names"] = json.dumps([f"c{i}{OSC_CLIPBOARD}" for i in range(10)])
    f.attrs["mctool_version"] = f"0.1{CSI_CLEAR}"
    f.attrs["created"] = f"today{OSC_TITLE}"
    f["experts"].attrs["argv"] = json.dumps([OSC_CLIPBOARD])
    f["experts"].attrs["augmentation"] = f"none{OSC_TITLE}"
    f.create_group(f"notes{OSC_CLIPBOARD}").attrs[f"k{OSC_TITLE}"] = f"v{OSC_TITLE}"


def _synset_escapes(f: h5py.File, root: Path) -> None:
    g = f[f"synsets/{next(iter(f['synsets']))}"]
    g.attrs["preset"] = f"p{OSC_TITLE}"
    g.attrs["method"] = f"mct{CSI_CLEAR}"
    evaluations = json.loads(g.attrs["evaluations"])
    evaluations[0]["model"] = f"ConvNet{OSC_CLIPBOARD}"
    evaluations[0][f"key{OSC_TITLE}"] = OSC_TITLE
    g.attrs["evaluations"] = json.dumps(evaluations)


@pytest.mark.parametrize("cmd", ["inspect", "inspect-json", "inspect-png"])
def test_escape_sequences_never_reach_the_terminal(cmd: str, corpus: Path, buffer: Path, data_dir: Path,
                                                   tmp_path: Path) -> None:
    for name, base, change in (("esc-buffer", buffer, _escapes), ("esc-synset", RELEASE / "synset.h5", _synset_escapes)):
        f = _hostile(tmp_path, f"{name}{OSC_TITLE}.h5", base, change)  # the file name too
        r = cli(*command(cmd, f, tmp_path, data_dir))
        assert r.exit_code == 0, r.output
        assert ESC not in r.stdout and ESC not in r.stderr and "\x07" not in r.output, r.output
        if cmd == "inspect-json":
            assert "\\u001b" not in r.stdout and "\\u0007" not in r.stdout  # not even escaped
        if cmd == "inspect-png":
            written = [p for p in tmp_path.iterdir() if p.suffix == ".png"]
            assert written and all(ESC not in p.name for p in written)


def test_escape_sequences_in_error_lines(tmp_path: Path, buffer: Path, data_dir: Path) -> None:
    """A refusal quoting a name or value from the file, or the file's own name, is cleaned too."""
    f = _hostile(tmp_path, f"bad{OSC_TITLE}.h5", buffer,
                 lambda h, root: h["convex" if "convex" in h else "experts"].attrs.__setitem__(
                     "strategy" if "convex" in h else "epochs", f"x{OSC_CLIPBOARD}"))
    g = _hostile(tmp_path, "synset-name.h5", RELEASE / "synset.h5",
                 lambda h, root: h.move("synsets/mct-ipc2", f"synsets/evil{OSC_TITLE}"))
    for argv in (["inspect", f], ["convexify", f], ["evaluate", g, "--data-dir", data_dir], ["inspect", g],
                 ["distill", "--buffer", f, "-o", tmp_path / "s.h5", "--data-dir", data_dir]):
        r = cli(*argv)
        assert r.exit_code == 2 and ESC not in r.output and "\x07" not in r.output, r.output
        assert len(r.stderr.splitlines()) == 1 and "internal error" not in r.stderr
