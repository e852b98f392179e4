"""The job spec as every module sees it: frozen dataclasses (``JobSpec``, ``Diff``, ``Rule``).

YAML comes in at ``specfile.py`` (pydantic validation, one-line ``SpecError``s, ``--set``
overrides) and leaves as a ``JobSpec``; this module holds its fields, defaults and the questions
the planner asks it (roles, alpha per tensor, donors), and its redacted JSON form for manifests.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Any

from ..errors import SpecError
from ..redaction import redact, redact_uri

__all__ = [
    "DONORS",
    "Diff",
    "DEFAULT_FILES",
    "DEFAULT_MAX_SIDE_FILE_SIZE",
    "Rule",
    "JobSpec",
    "donor_role",
    "parse_size",
    "redact",
]

DONORS = ("target", "finetuned", "base", "none")
# A donor or role of a spec with several diffs: ``diffs[1].finetuned``.
_DIFF_ROLE = re.compile(r"diffs\[(\d+)\]\.(finetuned|base|diff)")

# Which checkpoint donates each non-weight file (fnmatch patterns, first match wins). The output
# behaves like the fine-tuned model (its tokenizer, chat template and generation defaults) on the
# target's architecture (its config.json).
DEFAULT_FILES: tuple[tuple[str, str], ...] = (
    ("config.json", "target"),
    ("generation_config.json", "finetuned"),
    ("tokenizer.json", "finetuned"),
    ("tokenizer_config.json", "finetuned"),
    ("special_tokens_map.json", "finetuned"),
    ("tokenizer.model", "finetuned"),
    ("added_tokens.json", "finetuned"),
    ("chat_template.*", "finetuned"),
    ("vocab.json", "finetuned"),
    ("vocab.txt", "finetuned"),
    ("merges.txt", "finetuned"),
)

# Side files are read whole into memory when the output is committed. The largest real ones (a
# multilingual tokenizer.json) are tens of MB; a file ten times that is not a tokenizer or a config
# but weights a pattern picked up (e.g. "*.bin" matching pytorch_model.bin), refused at plan time.
DEFAULT_MAX_SIDE_FILE_SIZE = 512 * 2**20

_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def parse_size(value: int | str, what: str) -> int:
    """``"5GB"`` -> 5_000_000_000, ``"16MiB"`` -> 16_777_216; plain ints are bytes."""
    if isinstance(value, bool):
        raise SpecError(f"{what}: expected a size like 5GB or 512MiB, got {value!r}")
    if isinstance(value, int):
        n = value
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", value) if isinstance(value, str) else None
        if not m or m.group(2).lower() not in _SIZE_UNITS:
            raise SpecError(f"{what}: expected a size like 5GB or 512MiB, got {value!r}")
        # Exact decimal arithmetic: "2.01KB" is 2010 bytes, which float arithmetic gets wrong.
        n = int(Fraction(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
    if n <= 0:
        raise SpecError(f"{what}: must be positive, got {value!r}")
    return n


@dataclass(frozen=True)
class Rule:
    """Tensors whose name matches ``match`` (``re.search``) use ``alpha`` instead of the global one."""

    match: str
    alpha: float


@dataclass(frozen=True)
class Diff:
    """One diff vector ``alpha * (finetuned - base)``; its own ``rules`` come before the job's. With
    no ``base`` (``""``), ``finetuned`` is a stored difference written by ``graft diff`` (the spec's
    ``diff`` key)."""

    finetuned: str
    base: str
    alpha: float = 1.0
    rules: tuple[Rule, ...] = ()

    @property
    def stored(self) -> bool:
        return not self.base


@dataclass(frozen=True)
class JobSpec:
    """A validated job. ``kind`` "transfer": out = target + sum_i alpha_i * (finetuned_i - base_i),
    per tensor; one diff (the ``finetuned``/``base``/``alpha`` keys, or ``diff``) or several
    (``diffs``). ``kind`` "diff" (``graft diff``): no target; out = finetuned - base of its one diff,
    written as ``diff_dtype``."""

    target: str
    diffs: tuple[Diff, ...]
    output: str
    compute_dtype: str = "float32"
    output_format: str = "target"
    vocab: str = "error"
    rules: tuple[Rule, ...] = ()
    on_missing: str = "error"
    allow_nonfinite: bool = False
    allow_family_mismatch: bool = False
    files: tuple[tuple[str, str], ...] = DEFAULT_FILES
    max_shard_size: int | None = None
    max_side_file_size: int = DEFAULT_MAX_SIDE_FILE_SIZE
    chunk_size: int = 16 * 2**20
    read_concurrency: int = 4
    report: str = "sampled"
    storage_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    kind: str = "transfer"
    diff_dtype: str = "float32"

    # The first diff's locations and alpha: the only diff of a spec written with finetuned/base.
    @property
    def finetuned(self) -> str:
        return self.diffs[0].finetuned

    @property
    def base(self) -> str:
        return self.diffs[0].base

    @property
    def alpha(self) -> float:
        return self.diffs[0].alpha

    def diff_roles(self, i: int) -> tuple[str, ...]:
        """The role names of diff ``i``'s fine-tune and base: ``finetuned``/``base`` for a job with one
        diff, ``diffs[i].finetuned``/``diffs[i].base`` for several; a stored diff's one role is
        ``diff`` / ``diffs[i].diff``."""
        prefix = "" if len(self.diffs) == 1 else f"diffs[{i}]."
        if self.diffs[i].stored:
            return (f"{prefix}diff",)
        return f"{prefix}finetuned", f"{prefix}base"

    @property
    def roles(self) -> dict[str, str]:
        """Every input checkpoint's role -> location, target first (a transfer), then each diff's
        fine-tune and base (or its stored diff)."""
        out = {"target": self.target} if self.kind == "transfer" else {}
        for i, d in enumerate(self.diffs):
            out.update(zip(self.diff_roles(i), (d.finetuned, d.base)))
        return out

    def alpha_for(self, tensor_name: str, diff: int = 0) -> float:
        """Diff ``diff``'s alpha for ``tensor_name``: the first of its own rules that matches, else
        the first of the job's rules, else its alpha."""
        for rule in (*self.diffs[diff].rules, *self.rules):
            if re.search(rule.match, tensor_name):
                return rule.alpha
        return self.diffs[diff].alpha

    def donor_for(self, file_name: str) -> str | None:
        """Which checkpoint donates ``file_name`` (None: the file is not copied)."""
        for pattern, donor in self.files:
            if fnmatch.fnmatchcase(file_name, pattern):
                return None if donor == "none" else donor
        return None

    def is_default_donor(self, pattern: str, donor: str) -> bool:
        """``files`` entry (pattern, donor) is graft's default (as this job names its roles)."""
        default = dict(DEFAULT_FILES).get(pattern)
        return default is not None and donor == donor_role("finetuned" if self.kind == "diff" else default,
                                                        self.diffs, "", self.kind)

    def to_dict(self, *, redact_secrets: bool = True) -> dict[str, Any]:
        """Plain-JSON form for the manifest and ``graft plan``; secrets hidden (``redaction``): in
        storage options and in the locations (a password in the userinfo, a signed query)."""
        d = asdict(self)
        d["rules"] = [asdict(r) for r in self.rules]
        d["files"] = {p: donor for p, donor in self.files}
        d.pop("diffs")
        hide = redact_uri if redact_secrets else (lambda u: u)

        def where(x: Diff) -> dict[str, str]:
            return {"diff": hide(x.finetuned)} if x.stored else {"finetuned": hide(x.finetuned),
                                                                 "base": hide(x.base)}

        if self.kind == "diff":
            for key in ("target", "compute_dtype", "output_format", "vocab", "rules", "report"):
                d.pop(key)
            d.update(where(self.diffs[0]))
        elif len(self.diffs) == 1:  # the form it was written in (the manifests of earlier runs too)
            d.update(where(self.diffs[0]), alpha=self.alpha)
            d.pop("diff_dtype")
        else:
            d["diffs"] = [{**where(x), "alpha": x.alpha, "rules": [asdict(r) for r in x.rules]}
                          for x in self.diffs]
            d.pop("diff_dtype")
        if redact_secrets:
            d["storage_options"] = redact(self.storage_options)
            for role in ("target", "output"):
                if role in d:
                    d[role] = redact_uri(d[role])
        return d


def donor_role(value: str, diffs: tuple[Diff, ...], where: str, job: str = "transfer") -> str:
    """A ``files`` donor as the role it names: ``finetuned``/``base`` are the first diff's, and with
    several diffs ``diffs[i].finetuned``/``diffs[i].base`` name diff ``i``'s (in a one-diff spec
    ``diffs[0].finetuned`` is ``finetuned``). A stored diff holds its fine-tune's side files: its
    ``finetuned`` is its ``diff``, and it has no ``base``."""
    m = _DIFF_ROLE.fullmatch(value)
    if value in DONORS or value == "diff" or m:
        i, kind = (int(m.group(1)), m.group(2)) if m else (0, value)
        if kind == "none" or (kind == "target" and job == "transfer"):
            return kind
        if kind == "target":
            raise SpecError(f"{where}: graft diff has no target; use finetuned, base or none")
        if i >= len(diffs):
            raise SpecError(f"{where}: {value!r} names diff {i}, but the job has {len(diffs)} diff(s)")
        if diffs[i].stored:
            if kind == "base":
                raise SpecError(f"{where}: {value!r}: that diff is a stored difference, which has no base")
            kind = "diff"
        elif kind == "diff":
            raise SpecError(f"{where}: {value!r}: that diff is a fine-tune and its base, not a stored diff")
        return kind if len(diffs) == 1 else f"diffs[{i}].{kind}"
    more = ", diffs[i].finetuned, diffs[i].base" if len(diffs) > 1 else ""
    raise SpecError(f"{where}: unknown donor {value!r}; use one of {', '.join(DONORS)}{more}")
