"""MkDocs hooks (``hooks:`` in mkdocs.yml): the generated pages, made at build time.

A hook rather than a plugin or a pre-build script: it runs inside every ``mkdocs build`` and
``mkdocs serve`` (so the strict build in ``make test`` checks exactly what is published), needs no
package of its own, and its pages exist only in the build, never as committed files that could go
stale. It adds ``reference/spec.md`` and ``reference/cli.md`` (``docs/gen/reference.py``), the
benchmark figures under ``bench/``, and fills the benchmark page's tables from
``bench/results.json`` (``bench/render.py``).
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

BENCH_MARKER = "<!-- bench:tables -->"
FIGURES = ("results.png", "report.png")


def on_files(files: Files, config) -> Files:
    files.append(File.generated(config, "reference/spec.md", content=reference.spec_page()))
    files.append(File.generated(config, "reference/cli.md", content=reference.cli_page()))
    for name in FIGURES:
        files.append(File.generated(config, f"bench/{name}", abs_src_path=os.path.join(ROOT, "bench", name)))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri == "benchmarks.md":
        if BENCH_MARKER not in markdown:
            raise ValueError(f"docs/benchmarks.md: the marker {BENCH_MARKER} is missing; put it where the "
                             "tables of bench/results.json go")
        return markdown.replace(BENCH_MARKER, render.page(render.load()))
    return markdown
