"""The docs site and the README: the strict build, the generated references against the code, the
README's size and its Measured block against bench/results.json."""
from __future__ import annotations

import argparse
import os
import sys

import pytest
from pydantic import BaseModel, Field

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
for path in (ROOT, os.path.join(ROOT, "docs", "gen")):
    if path not in sys.path:
        sys.path.insert(0, path)

import reference  # noqa: E402  (docs/gen/reference.py, found through the path set above)
from bench import render  # noqa: E402
from examples.effect import render as effect_render  # noqa: E402

README = os.path.join(ROOT, "README.md")


def test_the_docs_site_builds_strictly_with_the_generated_pages(tmp_path, monkeypatch):
    """Broken links and anchors are warnings MkDocs aborts on in strict mode (mkdocs.yml's validation)."""
    from mkdocs.commands.build import build
    from mkdocs.config import load_config

    monkeypatch.setenv("NO_MKDOCS_2_WARNING", "1")
    monkeypatch.chdir(ROOT)  # mkdocs.yml's hook path is relative to it
    site = tmp_path / "site"
    build(load_config(os.path.join(ROOT, "mkdocs.yml"), site_dir=str(site), strict=True))
    spec_html = (site / "reference" / "spec" / "index.html").read_text(encoding="utf-8")
    assert all(k.path in spec_html for k in reference.spec_keys())
    cli_html = (site / "reference" / "cli" / "index.html").read_text(encoding="utf-8")
    assert all(f"graft {name}" in cli_html for name in reference.cli_commands())
    bench_html = (site / "benchmarks" / "index.html").read_text(encoding="utf-8")
    assert "bench:tables" not in bench_html and render.load()["date"] in bench_html
    assert (site / "bench" / "results.png").is_file()
    effect_html = (site / "effect" / "index.html").read_text(encoding="utf-8")
    assert "effect:table" not in effect_html and all(row["name"] in effect_html for row in effect_render.load()["rows"])
    assert (site / "effect" / "accuracy.png").is_file()


def test_a_broken_anchor_fails_the_strict_build(tmp_path, monkeypatch):
    from mkdocs.commands.build import build
    from mkdocs.config import load_config
    from mkdocs.exceptions import Abort

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# Home\n\n[there](other.md#no-such-heading)\n")
    (docs / "other.md").write_text("# Other\n")
    config = tmp_path / "mkdocs.yml"
    config.write_text(open(os.path.join(ROOT, "mkdocs.yml"), encoding="utf-8").read()
                      .split("hooks:")[0] + "validation:\n  anchors: warn\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Abort):
        build(load_config(str(config), site_dir=str(tmp_path / "site"), strict=True))


def test_every_spec_key_has_a_description_and_is_on_the_reference_page():
    keys = {k.path for k in reference.spec_keys()}
    assert {"target", "diffs[].finetuned", "diffs[].rules[].match", "rules[].alpha", "storage_options"} <= keys
    assert reference.undocumented_spec_keys() == []


def test_a_spec_key_without_a_description_is_caught():
    class Rule(BaseModel):
        match: str = Field(description="a regex")
        alpha: float

    class Spec(BaseModel):
        output: str = Field(description="where")
        rules: list[Rule] = Field(default=[], description="rules")

    assert reference.undocumented_spec_keys(Spec) == ["rules[].alpha"]


def test_every_command_and_flag_is_on_the_cli_reference_page():
    commands = reference.cli_commands()
    assert {"run", "diff", "plan", "verify", "report", "inspect", "push", "clean"} <= set(commands)
    assert "--executor" in commands["run"]
    assert reference.undocumented_commands() == []


def test_a_command_without_help_is_caught():
    parser = argparse.ArgumentParser(prog="graft", epilog="exit codes: 0 ok")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("run", help="run a job").add_argument("--fast", action="store_true")
    sub.add_parser("secret")
    assert reference.undocumented_commands(parser) == ["graft secret"]
    assert "exit codes: 0 ok" in reference.cli_page(parser)  # the top-level epilog, whatever it holds


def test_the_bench_page_holds_every_row_and_the_run_s_date_and_machine():
    results = render.load()
    page = render.page(results)
    assert results["date"] in page and results["machine"] in page
    assert all(row["name"] in page for row in results["rows"])


def test_the_readme_measured_block_is_the_render_of_results_json():
    text = open(README, encoding="utf-8").read()
    assert render.BEGIN in text and render.END in text
    assert render.update_readme(text, render.load()) == text, \
        "README.md's Measured block differs from bench/results.json: run python -m bench.render"


def test_the_readme_block_notes_an_executor_change_after_the_run():
    results = render.load()
    assert ("bench/NOTES.md` section 15" in render.readme_block({**results, "date": "2026-11-29"}))
    assert "section 15" not in render.readme_block({**results, "date": "2026-12-10"})


def test_the_readme_is_a_front_door_of_at_most_15000_bytes():
    assert os.path.getsize(README) <= 15_000
    text = open(README, encoding="utf-8").read()
    assert "## The two commands" in text and "+46.9" in text and "θ_out = θ_target + α · (θ_ft − θ_base)" in text
    assert "graft[" not in text  # not on PyPI: no `pip install 'graft[gcs]'`
