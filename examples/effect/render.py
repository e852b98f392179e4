"""Markdown from ``results.json``: the one renderer of the example's figures.

``page(results)`` is ``results.md`` and the table on the docs site's page (docs/gen/hooks.py calls
it at build time), so every number published comes from the committed ``results.json``. Nothing
here imports torch or transformers.
"""
from __future__ import annotations

import json
import os

__all__ = ["RESULTS", "load", "page"]

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "results.json")


def load(path: str = RESULTS) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def page(results: dict) -> str:
    """The table of every evaluated model, then the run's facts (seed, scale, machine, time)."""
    lines = [
        "| model | what it is | task accuracy (held-out, exact match) | loss on language A (ppl) "
        "| loss on language B (ppl) |",
        "|---|---|---:|---:|---:|",
    ]
    for row in results["rows"]:
        lines.append(f"| {row['name']} | {row['what']} | {_pct(row['accuracy'])} "
                     f"| {row['loss_a']:.3f} ({row['ppl_a']:.2f}) | {row['loss_b']:.3f} ({row['ppl_b']:.2f}) |")
    floor = results["entropy"]
    lines += [
        "",
        f"Chance on the task is {_pct(results['chance'])}; the lowest loss any model can reach is about "
        f"{floor['a']:.3f} on A and {floor['b']:.3f} on B (the languages' entropy rates, plus the first "
        "word of each sequence, which is uniform).",
        "",
        f"Seed {results['seed']}, scale `{results['scale']}` ({results['held_out']} held-out task items, "
        f"{results['text_held_out']} held-out sequences per language). Run on {results['date']} on "
        f"{results['machine']} (CPU only, torch on {results['threads']} thread{'s' if results['threads'] > 1 else ''}); it took "
        f"{results['seconds']:.0f} s in all, of which {results['graft_seconds']:.1f} s in graft "
        f"({results['transfers']} transfers).",
    ]
    return "\n".join(lines) + "\n"
