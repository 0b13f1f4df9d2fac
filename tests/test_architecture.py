"""The layering of README's "Architecture": imports run downward only (flows → tasks → storage →
tasks.core), no cycles, tasks/ holds subpackages only, and one module per subpackage imports Prefect.

Read from the source with ``ast`` (nothing is imported), so a violation fails here before it
becomes a circular-import error at some user's first run."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("flows", "tasks", "storage")
IMPORT_PACKAGE = "xai_audit."  # installed, the folders above are its subpackages; the graph names them without it


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    where: str  # file:line
    target: str  # the imported module, absolute
    module_level: bool  # runs when the source is imported (not inside a function or TYPE_CHECKING)
    runs: bool = True  # runs at all (False only under TYPE_CHECKING): a function-level import can close a cycle


@dataclass
class Graph:
    modules: dict[str, Path]  # module name -> file, relative to the root
    imports: list[Import]


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _is_prefect(module: str) -> bool:
    return module.split(".")[0] == "prefect" or module.startswith("prefect_")


def _module_name(relative: Path) -> str:
    parts = relative.with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str]) -> list[str]:
    """The modules one import statement loads; ``from pkg import sub`` loads pkg.sub when that is a module."""
    if isinstance(node, ast.Import):
        return [alias.name.removeprefix(IMPORT_PACKAGE) for alias in node.names]
    base = (node.module or "").removeprefix(IMPORT_PACKAGE)
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([node.module] if node.module else []))
    return sorted({f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names})


def build_graph(root: Path) -> Graph:
    """Every import of every module under ``root``'s flows/, tasks/ and storage/."""
    files = sorted(p for package in PACKAGES for p in (root / package).rglob("*.py"))
    modules = {_module_name(p.relative_to(root)): p.relative_to(root) for p in files}
    known = set(modules)
    imports: list[Import] = []

    def visit(nodes: list[ast.AST], module: str, path: Path, module_level: bool, runs: bool) -> None:
        for node in nodes:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _targets(node, module, path.name == "__init__.py", known):
                    imports.append(Import(module, f"{path}:{node.lineno}", target, module_level, runs))
            elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.body, module, path, False, False)  # never runs
                visit(node.orelse, module, path, module_level, runs)
            else:
                local = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                visit(list(ast.iter_child_nodes(node)), module, path, module_level and not local, runs)

    for module, path in modules.items():
        visit(ast.parse((root / path).read_text(), str(path)).body, module, path, True, True)
    return Graph(modules, imports)


def _offenders(imports: list[Import]) -> list[str]:
    return [f"{i.where} -> {i.target}" for i in imports]


def storage_layer_violations(graph: Graph) -> list[str]:
    """storage/ may import only tasks.core from the project."""
    return _offenders(
        [
            i
            for i in graph.imports
            if _in(i.source, "storage")
            and (_in(i.target, "flows") or (_in(i.target, "tasks") and not _in(i.target, "tasks.core")))
        ]
    )


def core_layer_violations(graph: Graph) -> list[str]:
    """tasks.core is the bottom layer: nothing of the project above it."""
    return _offenders(
        [
            i
            for i in graph.imports
            if _in(i.source, "tasks.core")
            and any(_in(i.target, p) for p in PACKAGES)
            and not _in(i.target, "tasks.core")
        ]
    )


def tasks_import_flows(graph: Graph) -> list[str]:
    return _offenders([i for i in graph.imports if _in(i.source, "tasks") and _in(i.target, "flows")])


def import_cycles(graph: Graph) -> list[list[str]]:
    """One cycle per strongly connected component of the import graph (Tarjan), function-level imports
    included: a cycle closed inside a function still ties the two modules into one unit of change."""
    edges: dict[str, set[str]] = {m: set() for m in graph.modules}
    for i in graph.imports:
        if i.runs and i.target in graph.modules:
            edges[i.source].add(i.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def connect(node: str) -> None:  # recursion depth is bounded by the module count
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(edges[node]):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1 or node in edges[node]:
                components.append(component)

    for node in sorted(edges):
        if node not in index:
            connect(node)
    return [_cycle_through(sorted(c)[0], set(c), edges) for c in components]


def _cycle_through(start: str, component: set[str], edges: dict[str, set[str]]) -> list[str]:
    """A shortest path start -> ... -> start inside one component (breadth-first)."""
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(edges[node] & component):
                if nxt == start:
                    return paths[node] + [start]
                if nxt not in paths:
                    paths[nxt] = paths[node] + [nxt]
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"{start} is in a component without a cycle")


def loose_task_modules(graph: Graph) -> list[str]:
    """Modules directly in tasks/ (besides its __init__): every module belongs to a subpackage."""
    return sorted(str(p) for p in graph.modules.values() if p.parent == Path("tasks") and p.name != "__init__.py")


def prefect_violations(graph: Graph) -> list[str]:
    """Per tasks/ subpackage at most one module imports Prefect; tasks.core none at all."""
    importers: dict[str, set[str]] = {}
    for i in graph.imports:
        if _in(i.source, "tasks") and i.source.count(".") >= 1 and _is_prefect(i.target):
            importers.setdefault(".".join(i.source.split(".")[:2]), set()).add(i.source)
    problems = [f"tasks.core: {', '.join(sorted(importers.pop('tasks.core')))}"] if "tasks.core" in importers else []
    return problems + [
        f"{package}: {', '.join(sorted(mods))}" for package, mods in sorted(importers.items()) if len(mods) > 1
    ]


@pytest.fixture(scope="module")
def repo() -> Graph:
    return build_graph(REPO)


def _none(found: list[str], rule: str) -> None:
    assert not found, rule + ":\n  " + "\n  ".join(found)


def test_storage_imports_only_tasks_core(repo):
    _none(storage_layer_violations(repo), "storage/ imports above tasks.core")


def test_tasks_core_imports_nothing_above_it(repo):
    _none(core_layer_violations(repo), "tasks.core imports the layers above it")


def test_tasks_never_import_flows(repo):
    _none(tasks_import_flows(repo), "tasks/ imports flows/")


def test_no_import_cycles(repo):
    _none([" -> ".join(cycle) for cycle in import_cycles(repo)], "import cycles")


def test_tasks_holds_subpackages_only(repo):
    _none(loose_task_modules(repo), "modules directly in tasks/ (move each into a subpackage)")


def test_prefect_is_imported_by_one_module_per_subpackage(repo):
    _none(prefect_violations(repo), "Prefect imported by more than one module of a subpackage (or by tasks.core)")


def test_checks_catch_planted_violations(tmp_path):
    sources = {
        "flows/__init__.py": "",
        "storage/__init__.py": "",
        "tasks/__init__.py": "",
        "tasks/explain/__init__.py": "",
        "tasks/core/__init__.py": "",
        "tasks/world/__init__.py": "",
        "storage/x.py": (
            "import os\nfrom xai_audit.tasks.explain.stage import explain\nfrom xai_audit.tasks.core import errors\n"
        ),
        "tasks/explain/stage.py": "from .. import world\ndef explain():\n    import xai_audit.flows.cli\n",
        "tasks/core/errors.py": "class E(Exception):\n    def f(self):\n        from prefect import task\n",
        "tasks/core/config.py": "def load():\n    from xai_audit.tasks.explain import stage\n",
        "tasks/world/a.py": "import prefect\nfrom . import b\n",
        "tasks/world/b.py": "from prefect import flow\nfrom xai_audit.tasks.world.a import thing\n",
        "tasks/world/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import d\n",
        "tasks/world/d.py": "from xai_audit.tasks.world import c\n",
        "tasks/world/e.py": "def later():\n    from xai_audit.tasks.world import f\n",
        "tasks/world/f.py": "from xai_audit.tasks.world import e\n",
        "tasks/loose.py": "",
    }
    for name, text in sources.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = build_graph(tmp_path)

    assert storage_layer_violations(graph) == ["storage/x.py:2 -> tasks.explain.stage"]
    assert core_layer_violations(graph) == ["tasks/core/config.py:2 -> tasks.explain.stage"]
    assert tasks_import_flows(graph) == ["tasks/explain/stage.py:3 -> flows.cli"]
    # c <-> d is closed only under TYPE_CHECKING, which never runs, so it is no cycle; e <-> f is
    # closed by an import inside a function, which does run.
    assert import_cycles(graph) == [
        ["tasks.world.a", "tasks.world.b", "tasks.world.a"],
        ["tasks.world.e", "tasks.world.f", "tasks.world.e"],
    ]
    assert loose_task_modules(graph) == ["tasks/loose.py"]
    assert prefect_violations(graph) == ["tasks.core: tasks.core.errors", "tasks.world: tasks.world.a, tasks.world.b"]
