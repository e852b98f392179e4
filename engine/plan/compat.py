"""Whether the checkpoints of a job belong together: one model family, one architecture.

The planner asks these before it matches a single tensor, and lists every problem at once
(``refusal``): a different ``model_type`` (refused unless ``allow_family_mismatch``), a fine-tune
or base that holds few of the target's tensors (another architecture, said plainly instead of
hundreds of missing names), and the config.json fields worth a warning when they differ.
"""
from __future__ import annotations

from typing import Any, Mapping

from ..errors import PlanError
from ..formats.checkpoint import Checkpoint
from ..formats.safetensors import FLOATING_DTYPES
from .quant import Stored
from .spec import JobSpec
from .vocab import config_entries

__all__ = ["refusal", "family_warnings", "family_problems", "overlap_problems", "config_warnings",
           "examples", "describe_shapes"]


# config.json fields that name the model family: the three checkpoints must agree on them (a
# difference vector taken in one family means nothing in another) unless allow_family_mismatch.
_FAMILY_FIELDS = ("model_type", "architectures")


# Fields whose disagreement between target and finetuned is worth a warning: new base versions
# legitimately change them (Llama 3.1 changed rope_scaling and the context length of 3.0).
_CONFIG_FIELDS = ("vocab_size", "max_position_embeddings", "rope_scaling", "rope_parameters",
                  "tie_word_embeddings")


# Below this share of the target's tensors to combine found in finetuned or base, the checkpoints
# are not the same architecture, whatever on_missing says (it is for a few odd tensors).
_MIN_OVERLAP = 0.5


def refusal(problems: list[str], kind: type[PlanError] = PlanError) -> PlanError:
    """One error for every problem found: the first one's message, how many more, all of them listed."""
    more = f" (and {len(problems) - 1} more problem(s); run graft plan to list them)" if len(problems) > 1 else ""
    return kind(problems[0] + more, problems)


def family_warnings(spec: JobSpec, checkpoints: Mapping[str, Checkpoint],
                    configs: Mapping[str, Mapping[str, Any] | None], roles: list[str]) -> list[str]:
    """The warnings about checkpoints of different model families (``allow_family_mismatch``);
    without it they are refused, before anything else (another family's quantization or tensor
    names would only add noise)."""
    family = family_problems(configs, {r: checkpoints[r].uri for r in roles})
    if spec.allow_family_mismatch or not family:
        return family
    raise PlanError(family[0] + "; set allow_family_mismatch: true if this is really intended",
                    [f"{p}; set allow_family_mismatch: true if this is really intended" for p in family])


def examples(names: list[str], n: int = 3) -> str:
    shown = ", ".join(repr(x) for x in names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def describe_shapes(shapes: Mapping[str, tuple[int, ...]], checkpoints: Mapping[str, Checkpoint]) -> str:
    return ", ".join(f"{list(s)} in {r} ({checkpoints[r].uri})" for r, s in shapes.items())


def family_problems(configs: Mapping[str, Mapping[str, Any] | None], uris: Mapping[str, str]) -> list[str]:
    """One line per config.json family field on which the checkpoints that have one disagree."""
    have = {r: c for r in uris if isinstance(c := configs.get(r), Mapping)}
    out = []
    for key in _FAMILY_FIELDS:
        values = {r: c[key] for r, c in have.items() if c.get(key) is not None}  # absent: unknown
        if len({repr(v) for v in values.values()}) > 1:
            shown = ", ".join(f"{r} {v!r}" for r, v in values.items())
            out.append(f"the checkpoints are different model families: config.json {key} is {shown} "
                       f"({', '.join(f'{r}: {uris[r]}' for r in values)}); a fine-tuning difference "
                       f"only transfers within one family")
            break  # architectures follow model_type: one line says it
    return out


def overlap_problems(spec: JobSpec, checkpoints: Mapping[str, Checkpoint],
                     logical: Mapping[str, Mapping[str, Stored]]) -> list[str]:
    """A finetuned or base that holds few of the target's tensors is another architecture: say so
    plainly instead of listing hundreds of missing tensors (or carrying them all)."""
    out = []
    for i in range(len(spec.diffs)):
        wanted = [n for n, t in logical["target"].items()
                  if t.codes.dtype in FLOATING_DTYPES and spec.alpha_for(n, i) != 0.0]
        for role in spec.diff_roles(i):
            if role in logical:  # an adapter changes what it has factors for, and leaves the rest
                out.extend(_overlap(role, checkpoints, logical[role], wanted))
    return out


def _overlap(role: str, checkpoints: Mapping[str, Checkpoint], have: Mapping[str, Stored],
             wanted: list[str]) -> list[str]:
    found = sum(n in have for n in wanted)
    if not wanted or found >= _MIN_OVERLAP * len(wanted):
        return []
    lacking = examples([n for n in wanted if n not in have], 2)
    return [f"{role} ({checkpoints[role].uri}) holds only {found} of the {len(wanted)} tensors of the "
            f"target ({checkpoints['target'].uri}) to combine, e.g. not {lacking}; it is not the target's "
            f"architecture: check the path (a rule with alpha: 0 carries the tensors it lacks, if that "
            f"is really intended)"]


def config_warnings(spec: JobSpec, configs: Mapping[str, Mapping[str, Any] | None]) -> list[str]:
    """The ``_CONFIG_FIELDS`` on which the target's and each fine-tune's config.json differ, at the top
    level or in a text sub-config (``vocab.config_entries``), and which config.json the output gets."""
    out = []
    tc = configs.get("target")
    donor = spec.donor_for("config.json")
    gets = (f"the output takes {donor}'s config.json, its vocab_size, tie_word_embeddings and "
            f"quantization_config set to describe the output's weights" if donor and configs.get(donor)
            else f"the output has no config.json ({f'{donor} has none' if donor else 'files says none'})")
    for i in range(len(spec.diffs)):
        ft = spec.diff_roles(i)[0]
        fc = configs.get(ft)
        if not tc or not fc:
            continue
        diffs = []
        for k in _CONFIG_FIELDS:
            mine, theirs = config_entries(tc, k), config_entries(fc, k)
            diffs += [f"{p}: target {mine.get(p)!r} vs {ft} {theirs.get(p)!r}"
                      for p in dict.fromkeys([*mine, *theirs]) if mine.get(p) != theirs.get(p)]
        if diffs:
            out.append(f"config.json differs between target and {ft} in {'; '.join(diffs)}; {gets}")
    return out
