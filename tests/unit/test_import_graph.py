"""The shape of the code: every import arrow among graft's modules points down.

Read from the source (every import statement, those inside functions too, but not those under
``if TYPE_CHECKING:``, which never run): ``engine`` imports neither Ray nor ``cluster``, and the
module graph has no cycle. A store that picks its writer or its Hub pinning by protocol imports
them inside a function; they see ``Storage`` only as a type.
"""
from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGES = ("engine", "cluster")


def _modules() -> dict[str, str]:
    out = {}
    for pkg in PACKAGES:
        for name in sorted(os.listdir(os.path.join(ROOT, pkg))):
            if name.endswith(".py"):
                out[f"{pkg}.{name[:-3]}"] = os.path.join(ROOT, pkg, name)
    return out


def _imports(path: str, module: str) -> set[str]:
    """What ``module`` imports, as dotted names (``graft.`` dropped; relative imports resolved)."""
    found: set[str] = set()

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            test = node.test
            if getattr(test, "id", None) == "TYPE_CHECKING" or getattr(test, "attr", None) == "TYPE_CHECKING":
                for child in node.orelse:
                    self.visit(child)
                return
            self.generic_visit(node)

        def visit_Import(self, node: ast.Import) -> None:
            found.update(alias.name for alias in node.names)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            if not node.level:
                found.add(node.module or "")
                return
            base = module.rsplit(".", node.level)[0]
            if node.module:
                found.add(f"{base}.{node.module}")
            else:
                found.update(f"{base}.{alias.name}" for alias in node.names)

    Visitor().visit(ast.parse(open(path, encoding="utf-8").read(), path))
    return {name.removeprefix("graft.") for name in found}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: {i for i in _imports(p, m) if i in mods and i != m} for m, p in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_engine_imports_neither_ray_nor_the_cluster_package():
    mods = _modules()
    for module, path in mods.items():
        if not module.startswith("engine."):
            continue
        for name in _imports(path, module):
            assert name != "ray" and not name.startswith("ray."), (module, name)
            assert not name.startswith("cluster"), (module, name)


def test_no_import_cycle():
    graph = _graph()
    assert graph["engine.storage"] and graph["engine.job"]  # the graph was read
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [{"a", "b", "c"}]
