"""The house's layering, read from the source (ast, nothing imported).

* h5py is imported only under mctool/store/ (the one place that reads or writes HDF5);
  typer and rich only under mctool/cli/.
* The top level shows the pipeline: directly under mctool/ live only the stages that are one
  module (experts, demo), the pictures (plots) and the preset loader (presets); everything else
  is in a package by layer (mctool/cli, configs, core, models, matching, store, data, training,
  interop, and the stages convexify, distill, evaluate).
* Who may import whom, bottom up (LAYERS): core imports nothing of mctool above it; the models
  only core; the gradient engine (matching) only core, the models and the torch-free choices;
  the convex trajectory's maths (convexify.trajectory) only core and the choices, since the
  store and training read it; the store only core, the models and that trajectory maths; data
  only core, the choices, the store and the memory model's free_bytes; training only those
  below it; interop no stage; the torch-free settings (configs) no stage; nothing outside the
  CLI imports mctool.cli.
* No import cycle between mctool modules.

Every import counts, wherever it is written: at module level, inside a function (a lazy
import), under `if TYPE_CHECKING:`. A lazy import runs later, but it is still a dependency,
so it must obey the direction rules above (store lazily importing the CLI would still make
the layering lie).

Cycles are judged on two graphs:

* module-level imports only — what runs when a module is first imported: no cycle at all,
  ever (a module-level cycle makes import order matter and breaks partially initialised
  modules);
* every import, lazy ones included — a cycle here is allowed only where every edge stays
  inside one layer and is named in LAZY_CYCLES with the reason it is harmless (none today).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mctool"

# Each cycle is written as the sorted tuple of the modules on it.
LAZY_CYCLES: set[tuple[str, str]] = set()

# Modules allowed directly under mctool/ (a new module joins a layer's package, or is a stage).
TOP_LEVEL = {"mctool", "mctool.__main__", "mctool.experts", "mctool.demo", "mctool.plots", "mctool.presets"}

STORE_MAY_IMPORT = ("mctool", "mctool.core", "mctool.models", "mctool.convexify.trajectory", "mctool.store")
# Each layer (a package, or one module) -> what it may import besides itself (and its own modules).
# "mctool" allows the root package only (its __version__). The stages above them (experts,
# convexify.runner, distill, evaluate, demo, plots) may import any of these, never the CLI.
LAYERS: dict[str, tuple[str, ...]] = {
    "mctool.core": (),
    "mctool.models": ("mctool.core",),  # the networks know nothing of data, files or training
    "mctool.matching": ("mctool.core", "mctool.configs.choices", "mctool.models"),
    "mctool.convexify.trajectory": ("mctool.core", "mctool.configs.choices"),
    "mctool.store": STORE_MAY_IMPORT,
    # datasets asks the memory model how much memory is free before it decodes a dataset
    "mctool.data": ("mctool.core", "mctool.configs.choices", "mctool.store", "mctool.matching.memory"),
    "mctool.training": ("mctool.core", "mctool.models", "mctool.store", "mctool.data", "mctool.convexify.trajectory"),
    "mctool.interop": ("mctool", "mctool.core", "mctool.models", "mctool.store", "mctool.data", "mctool.training",
                       "mctool.matching.memory"),
    # torch-free at module level (tests/test_startup.py); the lazy imports borrow lower checks
    "mctool.configs": ("mctool.core", "mctool.presets", "mctool.data", "mctool.training",
                       "mctool.convexify.trajectory"),
    "mctool.presets": ("mctool.core",),
}


@dataclass(frozen=True)
class Edge:
    """`source` imports `target` (a module: mctool.x.y, or a third-party top-level name)."""

    source: str
    target: str
    file: str
    line: int
    lazy: bool  # inside a function or under `if TYPE_CHECKING:`: not run when the module is imported

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.source} -> {self.target}{' (lazy)' if self.lazy else ''}"


def module_name(path: Path) -> str:
    """mctool/store/files.py -> mctool.store.files; mctool/store/__init__.py -> mctool.store."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    """Every module of the package by dotted name."""
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _walk(node: ast.AST, lazy: bool) -> Iterator[tuple[ast.AST, bool]]:
    """Every node with whether it sits where a module-level import would not reach it.

    Function bodies and `if TYPE_CHECKING:` count as lazy; a class body or a module-level
    `try`/`if` (the tomllib fallback) runs at import and does not."""
    for child in ast.iter_child_nodes(node):
        inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        if isinstance(node, ast.If) and _is_type_checking(node.test) and child in node.body:
            inner = True
        yield child, inner
        yield from _walk(child, inner)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[Edge]:
    """The imports written in one module, resolved to module names.

    `from P import x` imports P.x when that is a module, else P; relative imports are resolved
    against the module's package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if _is_package(path) else name.rpartition(".")[0]
    rel = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
    edges = []
    for node, lazy in _walk(tree, False):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.module == "__future__":
                continue
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.append(sub if sub in modules else base)
        for target in targets:
            if target.split(".")[0] != "mctool":
                target = target.split(".")[0]  # third party: the distribution's top-level name
            edges.append(Edge(name, target, rel, node.lineno, lazy))  # type: ignore[attr-defined]
    return edges


@pytest.fixture(scope="module")
def edges() -> list[Edge]:
    modules = all_modules()
    assert "mctool.store" in modules and "mctool.cli" in modules, "the package layout moved: update this test"
    return [e for name, path in modules.items() for e in imports_of(name, path, modules)]


def under(module: str, *prefixes: str) -> bool:
    """Whether `module` is one of `prefixes` or inside one of them."""
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def layer(module: str) -> str:
    """The layer a module belongs to (for the cycle rule): its package under mctool, or the
    top-level module itself."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1] not in ("__main__",) and (PACKAGE / parts[1]).is_dir():
        return ".".join(parts[:2])
    return module


def violations(edges: list[Edge], allowed: tuple[str, ...], where: str) -> list[str]:
    """The edges out of `where` into mctool modules not under `allowed` (the root package
    "mctool" allows itself only — its __version__ — not everything inside it)."""
    def ok(target: str) -> bool:
        return any(target == a or (a != "mctool" and under(target, a)) for a in allowed)

    return [str(e) for e in edges if under(e.source, where) and under(e.target, "mctool") and not ok(e.target)]


# --------------------------------------------------------------------------- third-party rules


@pytest.mark.parametrize("library, home", [("h5py", "mctool.store"), ("typer", "mctool.cli"), ("rich", "mctool.cli")])
def test_third_party_library_stays_in_its_package(edges: list[Edge], library: str, home: str) -> None:
    bad = [str(e) for e in edges if e.target == library and not under(e.source, home)]
    assert not bad, f"{library} may be imported only under {home.replace('.', '/')}/, but:\n" + "\n".join(bad)
    assert any(e.target == library for e in edges), f"nothing imports {library}: is the scan still reading the code?"


# --------------------------------------------------------------------------- direction rules


def test_nothing_outside_the_cli_imports_it(edges: list[Edge]) -> None:
    bad = [str(e) for e in edges if under(e.target, "mctool.cli")
           and not under(e.source, "mctool.cli") and e.source != "mctool.__main__"]
    assert not bad, "only mctool.cli (and `python -m mctool`) may import mctool.cli:\n" + "\n".join(bad)


def test_the_top_level_holds_only_the_stages() -> None:
    flat = {name for name, path in all_modules().items() if path.parent == PACKAGE}
    assert flat == TOP_LEVEL, (f"modules directly under mctool/ beside the stages: {sorted(flat - TOP_LEVEL)} (move "
                               f"each into its layer's package); gone: {sorted(TOP_LEVEL - flat)} (update TOP_LEVEL)")


@pytest.mark.parametrize("where", sorted(LAYERS))
def test_each_layer_imports_only_what_lies_below_it(edges: list[Edge], where: str) -> None:
    assert any(under(e.source, where) for e in edges), f"no module under {where}: the layout moved, update LAYERS"
    allowed = (*LAYERS[where], where)
    bad = violations(edges, allowed, where)
    assert not bad, (f"{where} may import only {', '.join(allowed)} of mctool (never a stage or the CLI):\n"
                     + "\n".join(bad))


# --------------------------------------------------------------------------- cycles


def cycles(edges: list[Edge]) -> list[list[str]]:
    """The strongly connected components with more than one module (or a self-import),
    by Tarjan's algorithm, each as a sorted list of modules."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        if under(e.target, "mctool"):
            graph.setdefault(e.source, set()).add(e.target)
            graph.setdefault(e.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # recursion depth is bounded by the module count (~60)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def describe(component: list[str], edges: list[Edge]) -> str:
    """A cycle with the import lines that close it."""
    inside = [str(e) for e in edges if e.source in component and e.target in component]
    return " <-> ".join(component) + ":\n    " + "\n    ".join(sorted(set(inside)))


def test_cycle_finder_finds_cycles() -> None:
    """The finder itself: a triangle and a self-import are cycles, a diamond is not."""
    def e(a: str, b: str) -> Edge:
        return Edge(a, b, "x.py", 1, False)

    tri = [e("mctool.a", "mctool.b"), e("mctool.b", "mctool.c"), e("mctool.c", "mctool.a"), e("mctool.c", "mctool.d")]
    assert cycles(tri) == [["mctool.a", "mctool.b", "mctool.c"]]
    assert cycles([e("mctool.a", "mctool.a")]) == [["mctool.a"]]
    diamond = [e("mctool.a", "mctool.b"), e("mctool.a", "mctool.c"), e("mctool.b", "mctool.d"), e("mctool.c", "mctool.d")]
    assert cycles(diamond) == []
    assert cycles([e("mctool.a", "numpy"), e("mctool.b", "mctool.a")]) == []


def test_import_resolution(tmp_path: Path) -> None:
    """Relative imports, `from package import submodule` and lazy/TYPE_CHECKING placement."""
    modules = all_modules()
    src = tmp_path / "mod.py"
    src.write_text("from typing import TYPE_CHECKING\nfrom . import convex\nfrom .files import create\n"
                   "import h5py.h5p\nif TYPE_CHECKING:\n    from mctool.models import Layout\n"
                   "def f():\n    from mctool import distill\n")
    edges = [(e.target, e.lazy) for e in imports_of("mctool.store.mod", src, modules) if e.target != "typing"]
    assert edges == [("mctool.store.convex", False), ("mctool.store.files", False), ("h5py", False),
                     ("mctool.models", True), ("mctool.distill", True)]


def test_direction_rules_catch_an_upward_import() -> None:
    """The whitelist helpers themselves: the store importing the library or the CLI is caught,
    the root package's __version__ and the store's own modules are not."""
    def e(a: str, b: str) -> Edge:
        return Edge(a, b, "x.py", 1, True)

    edges = [e("mctool.store.files", "mctool"), e("mctool.store.files", "mctool.store.fields"),
             e("mctool.store.meta", "mctool.models.convnet"), e("mctool.store.files", "mctool.experts"),
             e("mctool.store.summary", "mctool.cli.render"), e("mctool.store.convex", "mctool.convexify.trajectory"),
             e("mctool.store.convex", "mctool.convexify.runner")]
    assert violations(edges, STORE_MAY_IMPORT, "mctool.store") == [
        "x.py:1: mctool.store.files -> mctool.experts (lazy)",
        "x.py:1: mctool.store.summary -> mctool.cli.render (lazy)",
        "x.py:1: mctool.store.convex -> mctool.convexify.runner (lazy)"]


@pytest.mark.parametrize("where", sorted(LAYERS))
def test_each_layer_rule_can_fail(where: str) -> None:
    """Each layer importing a stage (the distill package) or the CLI is caught; importing itself
    and what it is allowed is not."""
    def e(b: str) -> Edge:
        return Edge(f"{where}.x", b, "x.py", 1, True)

    allowed = (*LAYERS[where], where)
    fine = [e(f"{a}.y" if a != "mctool" else a) for a in allowed]
    assert violations(fine, allowed, where) == []
    wrong = [e("mctool.distill.runner"), e("mctool.cli.render"), e("mctool.evaluate.evaluation")]
    assert len(violations(wrong, allowed, where)) == 3


def test_no_module_level_import_cycle(edges: list[Edge]) -> None:
    found = cycles([e for e in edges if not e.lazy])
    assert not found, "import cycle(s) at module level:\n" + "\n".join(describe(c, edges) for c in found)


def test_lazy_imports_close_no_cycle_but_the_known_harmless_one(edges: list[Edge]) -> None:
    found = cycles(edges)
    unexpected = [c for c in found if tuple(c) not in LAZY_CYCLES]
    assert not unexpected, ("import cycle(s) through lazy imports (see this module's docstring):\n"
                            + "\n".join(describe(c, edges) for c in unexpected))
    for c in found:
        layers = {layer(m) for m in c}
        assert len(layers) == 1, f"a cycle across layers {sorted(layers)}:\n{describe(c, edges)}"
    stale = LAZY_CYCLES - {tuple(c) for c in found}
    assert not stale, f"LAZY_CYCLES lists cycles that no longer exist; remove them: {sorted(stale)}"
