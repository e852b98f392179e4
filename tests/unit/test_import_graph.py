"""The shape of the code: every import arrow among graft's modules points down.

Read from the source (every import statement, those inside functions too, but not those under
``if TYPE_CHECKING:``, which never run): ``engine`` imports neither Ray nor ``cluster``, and the
module graph has no cycle. Subpackages count module by module (``engine.storage.base``, ...; a
package is its ``__init__``): the stores register themselves with ``Storage`` by protocol, so the
face never imports them, and readers and writers see ``Storage`` only as a type.
"""
from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGES = ("engine", "cluster")


def _modules() -> dict[str, str]:
    """Dotted module name -> file, for every module of the packages and their subpackages."""
    out = {}
    for pkg in PACKAGES:
        for folder, dirs, files in os.walk(os.path.join(ROOT, pkg)):
            dirs[:] = sorted(d for d in dirs if os.path.exists(os.path.join(folder, d, "__init__.py")))
            prefix = os.path.relpath(folder, ROOT).replace(os.sep, ".")
            for name in sorted(files):
                if name == "__init__.py":
                    out[prefix] = os.path.join(folder, name)
                elif name.endswith(".py"):
                    out[f"{prefix}.{name[:-3]}"] = os.path.join(folder, name)
    return out


def _imports(path: str, module: str) -> set[str]:
    """What ``module`` imports, as dotted names (``graft.`` dropped; relative imports resolved)."""
    found: set[str] = set()
    # A package's relative imports start from the package itself, a module's from its package.
    here = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]

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
                source = node.module or ""
            else:
                base = here.rsplit(".", node.level - 1)[0] if node.level > 1 else here
                source = f"{base}.{node.module}" if node.module else base
            # ``from .storage import cas`` imports a module; ``from .storage import Storage`` a name
            # of the package (dropped below: only modules are kept).
            if node.module:  # ``from . import retry`` imports the module, not the package again
                found.add(source)
            found.update(f"{source}.{alias.name}" for alias in node.names)

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
    assert "engine.storage.base" in graph["engine.storage.s3"]  # subpackages too
    assert "engine.storage.cas" in graph["engine.runmark"]  # a module imported from its package
    stores = {"engine.storage.local", "engine.storage.s3", "engine.storage.hub", "engine.storage.gcs",
              "engine.storage.azure"}
    assert not graph["engine.storage.base"] & stores  # the face never imports a store
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [{"a", "b", "c"}]


# A module longer than this holds more than one concern, unless its docstring says why it must not
# be split ("Long because ...").
MAX_LINES = 420


def test_every_engine_module_is_small_or_says_why():
    long = []
    for module, path in _modules().items():
        if not module.startswith("engine"):
            continue
        text = open(path, encoding="utf-8").read()
        doc = ast.get_docstring(ast.parse(text)) or ""
        if text.count("\n") > MAX_LINES and "Long because" not in doc:
            long.append(f"{module}: {text.count(chr(10))} lines")
    assert not long, long


def test_the_architecture_page_table_names_every_module():
    """The docs' architecture table (docs/architecture.md) is the map a newcomer reads: every module
    is on it, and nothing on it is gone (a storage module is named by its file name in the
    engine/storage/ row)."""
    import re

    text = open(os.path.join(ROOT, "docs", "architecture.md"), encoding="utf-8").read()
    table = text[text.index("| module | role |"):]
    table = table[:table.index("\n\n")]
    rows = {row.split("|")[1]: row for row in table.splitlines()[2:]}
    named = {m for cell in rows for m in re.findall(r"`((?:engine|cluster)/[\w/]+\.py)`", cell)}
    storage_row = next(row for cell, row in rows.items() if "`engine/storage/`" in cell)
    named |= {f"engine/storage/{m}" for m in re.findall(r"`(\w+\.py)`", storage_row)}
    on_disk = {os.path.relpath(p, ROOT) for m, p in _modules().items() if not p.endswith("__init__.py")}
    assert on_disk - named == set(), "modules missing from the table in docs/architecture.md"
    assert named - on_disk == set(), "the table in docs/architecture.md names modules that are gone"
