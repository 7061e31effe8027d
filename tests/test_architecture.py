"""The package layering of docs/ARCHITECTURE.md, checked on flexserve's import graph as `ast` reads it.

The layer table is parsed from the document itself, so the code and the document cannot drift apart: a new
package, or an import that goes up or sideways, fails here until one of the two is changed on purpose.

Which imports count: all of them, at module top, inside functions (a lazy import is still a dependency, only a
later one) and under `if TYPE_CHECKING:` (a type-only import still breaks when the imported name moves). One
exception: imports under `if __name__ == "__main__":` run only when a file is started as a program
(`python -m flexserve.parallel.generate`), never when it is imported, so they are the command line's and count
as the `cli` package's. The `flexserve/__init__.py` facade resolves its public names lazily by string; it is
no package of the graph, and code inside flexserve imports the defining module instead.
"""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "flexserve"
DOC = REPO / "docs" / "ARCHITECTURE.md"
FACADE = "flexserve"  # the unit name of an import of the top-level package itself
CLI = "cli"


@dataclass(frozen=True)
class Import:
    """One import statement's edge: the file and line it is on, the module it names, the units it joins."""

    file: str  # relative to the repository
    line: int
    statement: str
    target: str  # dotted module name
    source_unit: str
    target_unit: str

    def where(self) -> str:
        return f"{self.file}:{self.line}: `{self.statement}`"


# --- reading the graph -------------------------------------------------------------------------------------------
def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str) -> str:
    """The package (or top-level module) a dotted name belongs to: `flexserve.engine.llm` -> `engine`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else FACADE


def _is_main_guard(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return (isinstance(node, ast.If) and isinstance(test, ast.Compare) and isinstance(test.left, ast.Name)
            and test.left.id == "__name__" and any(isinstance(c, ast.Constant) and c.value == "__main__"
                                                   for c in test.comparators))


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, root: Path) -> list[str]:
    """The flexserve modules an import statement names (a `from X import name` names X.name when that is a
    module of its own)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == root.name]
    if node.level == 0:
        base = node.module or ""
    else:
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[:len(package) - (node.level - 1)]
        base = ".".join(package + ([node.module] if node.module else []))
    if base.split(".")[0] != root.name:
        return []
    out = []
    for alias in node.names:
        sub = root.parent.joinpath(*f"{base}.{alias.name}".split("."))
        out.append(f"{base}.{alias.name}" if sub.with_suffix(".py").is_file() or sub.is_dir() else base)
    return sorted(set(out))


def read_imports(root: Path = PACKAGE) -> list[Import]:
    """Every import between flexserve's units, in every file under `root`."""
    edges = []
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, root)
        if module == root.name:  # the facade (see the module docstring)
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        rel = str(path.relative_to(root.parent))
        stack: list[tuple[ast.AST, bool]] = [(tree, False)]
        while stack:
            node, under_main = stack.pop()
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _targets(node, module, path.name == "__init__.py", root):
                    source_unit = CLI if under_main else unit_of(module)
                    if unit_of(target) != source_unit:
                        edges.append(Import(rel, node.lineno, ast.unparse(node), target, source_unit,
                                            unit_of(target)))
            for child in ast.iter_child_nodes(node):
                stack.append((child, under_main or _is_main_guard(node)))
    return sorted(edges, key=lambda e: (e.file, e.line, e.target))


def all_units(root: Path = PACKAGE) -> set[str]:
    return {p.stem if p.is_file() else p.name for p in root.iterdir()
            if (p.is_dir() and (p / "__init__.py").is_file()) or (p.suffix == ".py" and p.stem != "__init__")}


def unit_graph(imports: list[Import]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for imp in imports:
        graph.setdefault(imp.source_unit, set()).add(imp.target_unit)
    return graph


# --- the rules ---------------------------------------------------------------------------------------------------
def layers_from_doc(text: str) -> dict[str, int]:
    """The layer of every package, from the table of the `## Layers` section (bottom row first)."""
    section = text.split("\n## Layers", 1)[1].split("\n## ", 1)[0]
    layers: dict[str, int] = {}
    for line in section.splitlines():
        row = re.match(r"^\|\s*(\d+)\s*\|([^|]*)\|", line)
        if row:
            for unit in re.findall(r"`(\w+)`", row.group(2)):
                assert unit not in layers, f"{DOC.name}: package {unit!r} is in two layers"
                layers[unit] = int(row.group(1))
    assert layers, f"{DOC.name}: no layer table under '## Layers'"
    return layers


def layering_violations(imports: list[Import], layers: dict[str, int]) -> list[str]:
    """Imports that do not go strictly down the layers (sideways within a layer counts as wrong too)."""
    out = []
    for imp in imports:
        src, dst = imp.source_unit, imp.target_unit
        if dst == FACADE:
            out.append(f"{imp.where()}: import the defining module, not the `flexserve` facade")
        elif src in layers and dst in layers and layers[dst] >= layers[src]:
            out.append(f"{imp.where()}: {src} (layer {layers[src]}) may not import {dst} (layer {layers[dst]})")
    return out


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each sorted: the package cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(cycles)


def describe_cycle(cycle: list[str], imports: list[Import]) -> str:
    members = set(cycle)
    lines = [f"{imp.source_unit} -> {imp.target_unit}  {imp.where()}" for imp in imports
             if imp.source_unit in members and imp.target_unit in members]
    return f"cycle between {', '.join(cycle)}:\n    " + "\n    ".join(lines)


# --- the tests ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def imports() -> list[Import]:
    return read_imports()


@pytest.fixture(scope="module")
def layers() -> dict[str, int]:
    return layers_from_doc(DOC.read_text())


def test_every_package_has_one_layer_in_the_document(layers):
    units = all_units()
    assert not units - set(layers), f"packages missing from the layer table of {DOC}: {sorted(units - set(layers))}"
    assert not set(layers) - units, f"{DOC} lists packages that do not exist: {sorted(set(layers) - units)}"


def test_no_cycle_between_packages(imports):
    cycles = find_cycles(unit_graph(imports))
    assert not cycles, "\n".join(describe_cycle(c, imports) for c in cycles)


def test_every_import_goes_down_the_layers(imports, layers):
    wrong = layering_violations(imports, layers)
    assert not wrong, f"imports against the layers of {DOC.name}:\n" + "\n".join(wrong)


def test_only_the_cli_imports_the_cli(imports):
    wrong = [imp.where() for imp in imports if imp.target_unit == CLI and imp.source_unit != CLI]
    assert not wrong, "the library must not import flexserve.cli (take typed settings instead):\n" + "\n".join(wrong)


def test_the_scheduler_never_imports_torch():
    wrong = []
    for path in sorted((PACKAGE / "scheduler").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            wrong += [f"{path.relative_to(REPO)}:{node.lineno}: `{ast.unparse(node)}`" for n in names
                      if n.split(".")[0] == "torch"]
    assert not wrong, "the scheduler must stay torch-free:\n" + "\n".join(wrong)


def test_the_planner_loads_no_runtime():
    """The cost model is pure arithmetic: loading it must not start the pipeline, the executor or an engine."""
    code = ("import sys, flexserve.planner.parallel; "
            "print(' '.join(m for m in sys.modules if m.startswith(('flexserve.parallel.pipeline', "
            "'flexserve.parallel.launch', 'flexserve.offload.executor', 'flexserve.engine', 'flexserve.cli'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.split() == []


# --- the checker checks ------------------------------------------------------------------------------------------
def _edge(src: str, dst: str, line: int = 1) -> Import:
    return Import(f"flexserve/{src}/m.py", line, f"from ..{dst} import x", f"flexserve.{dst}", src, dst)


def test_the_checker_finds_cycles_and_names_their_imports():
    edges = [_edge("a", "b", 3), _edge("b", "c"), _edge("c", "a", 7), _edge("d", "a"), _edge("e", "f"),
             _edge("f", "e")]
    cycles = find_cycles(unit_graph(edges))
    assert cycles == [["a", "b", "c"], ["e", "f"]]
    message = describe_cycle(cycles[0], edges)
    assert "flexserve/c/m.py:7: `from ..a import x`" in message and "d ->" not in message
    assert find_cycles(unit_graph([_edge("a", "b"), _edge("b", "c"), _edge("a", "c")])) == []


def test_the_checker_finds_imports_up_or_sideways():
    layers = layers_from_doc("# X\n## Layers\n| layer | packages |\n|---|---|\n| 1 | `low` |\n"
                             "| 2 | `mid`, `side` |\n| 3 | `top` |\n## Next\n| 9 | `ignored` |\n")
    assert layers == {"low": 1, "mid": 2, "side": 2, "top": 3}
    wrong = layering_violations([_edge("mid", "low"), _edge("low", "top", 5), _edge("mid", "side"),
                                 _edge("top", FACADE)], layers)
    assert wrong == ["flexserve/low/m.py:5: `from ..top import x`: low (layer 1) may not import top (layer 3)",
                     "flexserve/mid/m.py:1: `from ..side import x`: mid (layer 2) may not import side (layer 2)",
                     "flexserve/top/m.py:1: `from ..flexserve import x`: import the defining module, not the "
                     "`flexserve` facade"]


def test_the_reader_resolves_relative_lazy_and_main_guard_imports(tmp_path):
    root = tmp_path / "flexserve"
    for pkg in ("low", "top", "cli"):
        (root / pkg).mkdir(parents=True)
        (root / pkg / "__init__.py").write_text("")
    (root / "__init__.py").write_text("from .low import x\n")  # the facade: not read
    (root / "errors.py").write_text("")
    (root / "low" / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..top import T\n"
        "def f():\n    from flexserve import errors\n"
        "if __name__ == '__main__':\n    from ..cli import main\n    from flexserve.top import y\n")
    (root / "low" / "__init__.py").write_text("from . import a\nfrom .. import top\n")
    got = {(i.file, i.line, i.source_unit, i.target_unit) for i in read_imports(root)}
    assert got == {("flexserve/low/a.py", 3, "low", "top"),  # under TYPE_CHECKING
                   ("flexserve/low/a.py", 5, "low", "errors"),  # inside a function, a module named in `from`
                   ("flexserve/low/a.py", 8, "cli", "top"),  # under the __main__ guard: the command line's
                   ("flexserve/low/__init__.py", 2, "low", "top")}  # `from .. import package`
    assert all_units(root) == {"low", "top", "cli", "errors"}
