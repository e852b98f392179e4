"""The docs site's reference pages, generated from the code at build time (``docs/gen/hooks.py``).

``spec_keys()`` walks the job spec's pydantic model (``graft.engine.plan.specfile``), nested models
included, and ``spec_page()`` renders every key with its type, default and the description on its
field. ``cli_commands()`` walks ``graft.cluster.cli.build_parser()`` and ``cli_page()`` renders every
command and flag with its help, and the top-level parser's description and epilog as they are. The
pages are never committed, so they cannot go stale; the unit tests call these functions to check
that every key and every flag is documented.
"""
from __future__ import annotations

import argparse
import json
import os
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

__all__ = ["SpecKey", "spec_keys", "spec_page", "cli_commands", "cli_page", "undocumented_spec_keys",
           "undocumented_commands"]


@dataclass(frozen=True)
class SpecKey:
    """One key of the job spec: its dotted path (``diffs[].rules[].match``), type, default, description."""

    path: str
    type: str
    default: str
    description: str


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds (itself, or in a list / optional), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return "any value"
    if origin is Literal:
        return "one of " + ", ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        named = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(named)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return f"mapping of {_type_name(args[0])} to {_type_name(args[1])}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping (keys below)"
    return {str: "string", float: "number", int: "integer", bool: "boolean"}.get(annotation, str(annotation))


def _default(field: Any) -> str:
    if field.is_required():
        return "required"
    if field.default is PydanticUndefined or field.default is None:
        return "—"
    if field.annotation is Any and isinstance(field.default, int):  # a size in bytes
        return f"`{field.default}` ({field.default / 2**20:g} MiB)"
    return f"`{json.dumps(field.default)}`"


def spec_keys(model: type[BaseModel] | None = None, prefix: str = "") -> list[SpecKey]:
    """Every key of the spec model (default: the job spec's), nested models' keys after their parent's."""
    if model is None:
        from graft.engine.plan.specfile import _SpecModel

        model = _SpecModel
    out: list[SpecKey] = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        # The spec's untyped keys are sizes, checked by parse_size (pydantic would coerce YAML `true`).
        kind = "size (`16MiB`, `5GB`) or bytes" if field.annotation is Any else _type_name(field.annotation)
        out.append(SpecKey(path, kind, _default(field), (field.description or "").strip()))
        nested = _model_of(field.annotation)
        if nested is not None:
            many = typing.get_origin(field.annotation) is list or any(
                typing.get_origin(a) is list for a in typing.get_args(field.annotation))
            out.extend(spec_keys(nested, f"{path}[]." if many else f"{path}."))
    return out


def _cell(text: str) -> str:
    """Text for one table cell: one line, pipes escaped outside code spans (inside them a table
    already keeps a pipe, and a backslash would show)."""
    parts = " ".join(text.split()).split("`")
    return "`".join(p if i % 2 else p.replace("|", "\\|") for i, p in enumerate(parts))


def spec_page() -> str:
    """The spec reference page (markdown)."""
    lines = [
        "# Spec reference",
        "",
        "Every key of a job spec (`graft run`, `graft plan`) and of a `graft diff` spec, generated from the "
        "pydantic model in `engine/plan/specfile.py` when the site is built: the descriptions live on the model's "
        "fields. `diffs[].x` is key `x` of each entry of the list `diffs`. The guide with examples is "
        "[the job spec](../spec.md); unknown keys are errors naming the closest valid key.",
        "",
        "| key | type | default | description |",
        "|---|---|---|---|",
    ]
    for k in spec_keys():
        lines.append(f"| `{k.path}` | {_cell(k.type)} | {k.default} | {_cell(k.description)} |")
    from graft.engine.plan.specfile import _DIFF_JOB_KEYS

    lines += ["", "A `graft diff` spec takes the keys that make sense without a target: "
              + ", ".join(f"`{k}`" for k in _DIFF_JOB_KEYS) + "."]
    return "\n".join(lines) + "\n"


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, tuple[str, argparse.ArgumentParser]]:
    """Each command's name -> (its one-line help, its parser), in the order they were added."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            return {name: (helps.get(name, ""), p) for name, p in action.choices.items()}
    return {}


def cli_commands(parser: argparse.ArgumentParser | None = None) -> dict[str, list[str]]:
    """Each command -> every flag it takes (each option string; positionals by their metavar or name;
    not -h, which every command has)."""
    if parser is None:
        from graft.cluster.cli import build_parser

        parser = build_parser()
    return {name: [s for a in p._actions if not isinstance(a, argparse._HelpAction)
                   for s in (a.option_strings or [a.metavar or a.dest])]
            for name, (_, p) in _subcommands(parser).items()}


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    if not action.help or action.help == argparse.SUPPRESS:
        return ""
    # argparse's own expansion of %(default)s and the like, as `graft CMD --help` shows it.
    return parser._get_formatter()._expand_help(action)


def _flag(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest}`"
    takes = action.nargs != 0
    meta = (action.metavar or action.dest.upper()) if takes else ""
    names = ", ".join(f"`{s}{' ' + meta if meta else ''}`" for s in action.option_strings)
    return names


def cli_page(parser: argparse.ArgumentParser | None = None) -> str:
    """The CLI reference page (markdown): the top-level help text, then every command and flag.

    Usage lines are wrapped at 100 columns whatever the terminal of the build (argparse reads
    ``COLUMNS``), so the page is the same on every machine."""
    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        return _cli_page(parser)
    finally:
        if columns is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = columns


def _cli_page(parser: argparse.ArgumentParser | None) -> str:
    if parser is None:
        from graft.cluster.cli import build_parser

        parser = build_parser()
    lines = ["# CLI reference", "",
             "Generated from `graft.cluster.cli.build_parser()` when the site is built: what `graft --help` "
             "and `graft COMMAND --help` print. The guide is [Commands](../cli.md).", ""]
    if parser.description:
        lines += [parser.description, ""]
    lines += ["```text", parser.format_usage().strip(), "```", ""]
    top = [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]
    if top:
        lines += ["| option | help |", "|---|---|", *(f"| {_flag(a)} | {_cell(_help(parser, a))} |" for a in top), ""]
    if parser.epilog:
        # Rendered as it is printed: the epilog may be laid out by hand (a table of exit codes).
        lines += ["```text", parser.epilog.strip("\n"), "```", ""]
    for name, (summary, sub) in _subcommands(parser).items():
        lines += [f"## graft {name}", ""]
        if summary:
            lines += [summary[0].upper() + summary[1:] + ("" if summary.endswith(".") else "."), ""]
        if sub.description and sub.description != summary:
            lines += [sub.description, ""]
        lines += ["```text", sub.format_usage().strip(), "```", "",
                  "| argument | help | default |", "|---|---|---|"]
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            default = action.default
            shown = "" if default in (None, False, [], argparse.SUPPRESS) or not action.option_strings \
                else f"`{default}`"
            lines.append(f"| {_flag(action)} | {_cell(_help(sub, action))} | {shown} |")
        if sub.epilog:
            lines += ["", "```text", sub.epilog.strip("\n"), "```"]
        lines.append("")
    return "\n".join(lines)


def undocumented_spec_keys(model: type[BaseModel] | None = None) -> list[str]:
    """The spec keys with no description on their field, or missing from the reference page."""
    keys = spec_keys(model)
    page = spec_page() if model is None else "\n".join(f"`{k.path}`" for k in keys if k.description)
    return [k.path for k in keys if not k.description or f"`{k.path}`" not in page]


def undocumented_commands(parser: argparse.ArgumentParser | None = None) -> list[str]:
    """The commands with no help line, and the flags missing from the CLI page, as ``graft CMD FLAG``."""
    if parser is None:
        from graft.cluster.cli import build_parser

        parser = build_parser()
    page = cli_page(parser)
    out = []
    sections = page.split("\n## graft ")[1:]
    on_page = {s.split("\n", 1)[0]: s for s in sections}
    for name, (summary, _) in _subcommands(parser).items():
        if not summary.strip() or name not in on_page:
            out.append(f"graft {name}")
            continue
        out += [f"graft {name} {flag}" for flag in cli_commands(parser)[name] if f"`{flag}" not in on_page[name]]
    return out
