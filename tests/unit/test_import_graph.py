"""The shape of the code: every import arrow among graft's modules points down.

Read from the source (every import statement, those inside functions too, but not those under
``if TYPE_CHECKING:``, which never run): ``engine`` imports neither Ray nor ``cluster``; the
engine's packages import only the packages before them in ``LAYERS`` (the pipeline's order, each
package's ``__init__`` docstring says the same and a test holds it to that); and the module graph has
no cycle. Subpackages count module by module (``engine.storage.base``, ...; a package is its
``__init__``): the stores register themselves with ``Storage`` by protocol and choose their own
readers and writers, so the face imports neither, and readers and writers see ``Storage`` only as a
type.
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
    assert graph["engine.storage"] and graph["engine.run.job"]  # the graph was read
    assert "engine.storage.base" in graph["engine.storage.generic"]  # subpackages too
    assert "engine.storage.cas" in graph["engine.run.runmark"]  # a module imported from its package
    assert "engine.run.runmark" in graph["engine.run.session"]  # a module of the same package
    assert _cycles(graph) == []


def test_the_storage_face_imports_no_store_reader_or_writer():
    graph = _graph()
    storage = {m for m in graph if m.startswith("engine.storage.")}
    assert graph["engine.storage.base"] & storage == {"engine.storage.retry"}
    for module in ("engine.storage.readers", "engine.storage.writers", "engine.storage.atomic"):
        assert "engine.storage.base" not in graph[module], module


# The engine's packages in the pipeline's order: a module may import its own package and those
# before it, never one after (``engine`` itself, ``errors`` and ``redaction`` come first; ``cluster``
# sits above them all).
LAYERS = ("engine", "engine.storage", "engine.formats", "engine.plan", "engine.compute", "engine.run")


def _layer(module: str) -> int:
    if module.split(".")[0] == "cluster":
        return len(LAYERS)
    package = ".".join(module.split(".")[:2])
    return LAYERS.index(package) if package in LAYERS else 0


def _upward(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps if _layer(d) > _layer(m))


def test_every_arrow_between_the_engine_packages_points_down():
    graph = _graph()
    assert {m for m in graph if _layer(m) == 0} == {"engine", "engine.errors", "engine.redaction"}
    assert {".".join(m.split(".")[:2]) for m in graph if m.startswith("engine.")} >= set(LAYERS[1:])
    assert _upward(graph) == []


def test_an_upward_arrow_is_found():
    assert _upward({"engine.plan.tasks": {"engine.run.job"}, "engine.run.job": {"engine.plan.tasks"}}) == [
        "engine.plan.tasks -> engine.run.job"]


def test_each_package_says_what_it_may_import_and_that_is_what_the_order_allows():
    """The ``May import:`` sentence of each package's docstring names the packages before it."""
    import re

    mods = _modules()
    for i, package in enumerate(LAYERS[1:], start=1):
        doc = ast.get_docstring(ast.parse(open(mods[package], encoding="utf-8").read())) or ""
        assert "May import:" in doc, package
        said = re.split(r"\.(?:\s|$)", doc[doc.index("May import:"):])[0]
        named = set(re.findall(r"``(engine(?:\.\w+)?)``", said))
        allowed = {"engine.errors", "engine.redaction"} | set(LAYERS[1:i])
        assert named == allowed, (package, named, allowed)


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [{"a", "b", "c"}]


# A module longer than this holds more than one concern, unless its docstring says why it must not
# be split ("Long because ...").
MAX_LINES = 420


def test_every_module_is_small_or_says_why():
    long = []
    for module, path in _modules().items():
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
