"""MkDocs hooks (``hooks:`` in mkdocs.yml): the generated pages, made at build time.

A hook rather than a plugin or a pre-build script: it runs inside every ``mkdocs build`` and
``mkdocs serve`` (so the strict build in ``make test`` checks exactly what is published), needs no
package of its own, and its pages exist only in the build, never as committed files that could go
stale. It adds ``reference/spec.md`` and ``reference/cli.md`` (``docs/gen/reference.py``), the
benchmark figures under ``bench/``, and fills the benchmark page's tables from
``bench/results.json`` (``bench/render.py``), and the effect page's table and figure from
``examples/effect/results/`` (``examples/effect/render.py``).
"""
from __future__ import annotations

import os
import sys

from mkdocs.structure.files import File, Files

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
for path in (ROOT, os.path.join(ROOT, "docs", "gen")):
    if path not in sys.path:
        sys.path.insert(0, path)

import reference  # noqa: E402  (found through the path set just above)
from bench import render  # noqa: E402
from examples.effect import render as effect_render  # noqa: E402

BENCH_MARKER = "<!-- bench:tables -->"
FIGURES = ("results.png", "report.png")
EFFECT_MARKER = "<!-- effect:table -->"
EFFECT_FIGURE = os.path.join(ROOT, "examples", "effect", "results", "accuracy.png")


def on_files(files: Files, config) -> Files:
    files.append(File.generated(config, "reference/spec.md", content=reference.spec_page()))
    files.append(File.generated(config, "reference/cli.md", content=reference.cli_page()))
    for name in FIGURES:
        files.append(File.generated(config, f"bench/{name}", abs_src_path=os.path.join(ROOT, "bench", name)))
    files.append(File.generated(config, "effect/accuracy.png", abs_src_path=EFFECT_FIGURE))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri == "benchmarks.md":
        if BENCH_MARKER not in markdown:
            raise ValueError(f"docs/benchmarks.md: the marker {BENCH_MARKER} is missing; put it where the "
                             "tables of bench/results.json go")
        return markdown.replace(BENCH_MARKER, render.page(render.load()))
    if page.file.src_uri == "effect.md":
        if EFFECT_MARKER not in markdown:
            raise ValueError(f"docs/effect.md: the marker {EFFECT_MARKER} is missing; put it where the table of "
                             "examples/effect/results/results.json goes")
        return markdown.replace(EFFECT_MARKER, effect_render.page(effect_render.load()))
    return markdown
