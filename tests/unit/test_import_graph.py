"""The import graph of the distribution: no cycle anywhere, and dependencies that point one way.

Built from the source with ``ast`` (every import a module makes when it runs, function-local ones included,
``if TYPE_CHECKING:`` blocks excluded); importing a submodule also imports its parent packages, except those
the importer sits in (Python has initialised them before it runs).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("store", "workers", "projections", "eventfleet")


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(tree: ast.AST) -> list[tuple[str, list[str]]]:
    """(module, imported names) of every import outside ``if TYPE_CHECKING:`` blocks."""
    out: list[tuple[str, list[str]]] = []

    def visit(node: ast.AST) -> None:
        if _type_checking_only(node):
            return
        if isinstance(node, ast.Import):
            out.extend((alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, [alias.name for alias in node.names]))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def _with_parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for module, names in _imports(ast.parse(path.read_text(), str(path))):
            targets = [f"{module}.{n}" for n in names if f"{module}.{n}" in modules] or [module]
            for target in targets:
                graph[name].update(m for m in _with_parents(target)
                                   if m in modules and m != name and not name.startswith(f"{m}."))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
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
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_the_graph_sees_the_modules_and_their_imports() -> None:
    graph = import_graph()
    assert "workers.handlers" in graph["workers.projector.parking"]
    assert "workers.rebuild" in graph["workers.admin.migrate"]  # importing a submodule imports its package
    assert "workers.projector" not in graph["workers.projector.checkpoints"]  # initialised before it runs


def test_a_cycle_is_found_when_there_is_one() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_imports_itself_back() -> None:
    assert cycles(import_graph()) == []


def test_the_store_imports_nothing_of_the_runtime_projections_or_facade() -> None:
    graph = import_graph()
    leaks = {(m, t) for m, ts in graph.items() if m.split(".")[0] == "store" for t in ts
             if t.split(".")[0] != "store"}
    assert leaks == set()


def test_projections_import_only_the_store() -> None:
    graph = import_graph()
    leaks = {(m, t) for m, ts in graph.items() if m.split(".")[0] == "projections" for t in ts
             if t.split(".")[0] not in ("store", "projections")}
    assert leaks == set()


def test_the_projector_and_the_rebuild_import_nothing_of_each_other() -> None:
    """Both apply events through ``workers.handlers``; the worker is handed the backfill job by its caller."""
    graph = import_graph()
    rooms = ("workers.projector", "workers.rebuild")
    crossing = {(m, t) for m, ts in graph.items() for t in ts for mine, other in (rooms, rooms[::-1])
                if (m == mine or m.startswith(f"{mine}.")) and (t == other or t.startswith(f"{other}."))}
    assert crossing == set()


def test_no_module_of_workers_sits_outside_a_room_but_the_shared_five() -> None:
    loose = {p.name for p in (ROOT / "workers").glob("*.py")}
    assert loose == {"__init__.py", "__main__.py", "broker.py", "config.py", "errors.py", "handlers.py", "locks.py"}
