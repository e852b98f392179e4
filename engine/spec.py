"""The job spec: YAML in, validated by pydantic at the edge, a frozen dataclass everywhere else.

Order of use: ``load_spec(path, overrides)`` (or ``spec_from_mapping``) -> ``JobSpec``. Every error is a
``SpecError`` whose one-line message names the key and what is allowed.
"""
from __future__ import annotations

import difflib
import fnmatch
import math
import os
import re
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Any, Literal, Mapping, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import SpecError
from .redaction import redact, redact_uri

__all__ = [
    "DONORS",
    "Diff",
    "DEFAULT_FILES",
    "DEFAULT_MAX_SIDE_FILE_SIZE",
    "Rule",
    "JobSpec",
    "load_spec",
    "spec_from_mapping",
    "apply_overrides",
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
        return default is not None and donor == _donor("finetuned" if self.kind == "diff" else default,
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


def _no_bool(v: Any) -> Any:
    # YAML reads yes/no/true/false as booleans, which pydantic would take as 1.0 and 0.0.
    if isinstance(v, bool):
        raise ValueError("expected a number like 1.0 or 0.5, not a boolean")
    return v


class _RuleModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    match: str
    alpha: float

    _alpha_not_bool = field_validator("alpha", mode="before")(_no_bool)

    @field_validator("match")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"invalid regular expression {v!r}: {e}") from None
        return v


class _DiffModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    finetuned: str | None = Field(default=None, min_length=1)
    base: str | None = Field(default=None, min_length=1)
    diff: str | None = Field(default=None, min_length=1)
    alpha: float = 1.0
    rules: list[_RuleModel] = []

    _alpha_not_bool = field_validator("alpha", mode="before")(_no_bool)


class _SpecModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    target: str | None = Field(default=None, min_length=1)
    finetuned: str | None = Field(default=None, min_length=1)
    base: str | None = Field(default=None, min_length=1)
    diff: str | None = Field(default=None, min_length=1)
    diff_dtype: Literal["float32", "bf16"] = "float32"
    diffs: list[_DiffModel] | None = Field(default=None, min_length=1)
    output: str = Field(min_length=1)
    alpha: float = 1.0
    compute_dtype: Literal["float32", "float64"] = "float32"
    output_format: Literal["target", "bf16"] = "target"
    vocab: Literal["error", "pad", "align"] = "error"
    rules: list[_RuleModel] = []
    on_missing: Literal["error", "carry_target"] = "error"
    allow_nonfinite: bool = False
    allow_family_mismatch: bool = False
    files: dict[str, str] = {}
    # Validated by parse_size: pydantic's int|str would turn YAML `true` into 1 first.
    max_shard_size: Any = None
    max_side_file_size: Any = DEFAULT_MAX_SIDE_FILE_SIZE
    chunk_size: Any = "16MiB"
    read_concurrency: int = Field(default=4, ge=1, le=64, strict=True)
    report: Literal["sampled", "exact", "off"] = "sampled"
    storage_options: dict[str, dict[str, Any]] = {}

    _alpha_not_bool = field_validator("alpha", mode="before")(_no_bool)

    @field_validator("report", mode="before")
    @classmethod
    def _off(cls, v: Any) -> Any:
        return "off" if v is False else v  # YAML 1.1 reads a bare `off` as false


_KEYS = tuple(k for k in _SpecModel.model_fields if k != "diff_dtype")
# graft diff: a fine-tune and its base in, their difference out (no target, alpha, rules, report).
_DIFF_JOB_KEYS = ("finetuned", "base", "output", "diff_dtype", "on_missing", "allow_nonfinite",
                  "allow_family_mismatch", "files", "max_shard_size", "max_side_file_size", "chunk_size",
                  "read_concurrency", "storage_options")
_RULE_KEYS = tuple(_RuleModel.model_fields)
_DIFF_KEYS = tuple(_DiffModel.model_fields)


def _check_keys(data: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
    for key in data:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(allowed)}"
            raise SpecError(f"{where}: unknown key '{key}'; {hint}")


def _normalize_location(uri: str) -> str:
    # Local paths become absolute so the manifest records where the bytes really were.
    if "://" in uri:
        return uri.rstrip("/")
    return os.path.abspath(os.path.expanduser(uri))


def _diff_form(d: Mapping[str, Any], where: str) -> None:
    """A diff is a fine-tune and its base, or one stored difference (``diff``), not both."""
    if "diff" in d and ("finetuned" in d or "base" in d):
        raise SpecError(f"{where}: key 'diff': give either diff (a difference written by graft diff) or "
                        f"finetuned and base, not both")
    if "diff" not in d:
        for key in ("finetuned", "base"):
            if key not in d:
                raise SpecError(f"{where}: key '{key}': field required (or diff: a difference written "
                                f"by graft diff)")


def spec_from_mapping(data: Any, source: str = "spec", kind: str = "transfer") -> JobSpec:
    """Validate a parsed YAML mapping; ``source`` (the file name) prefixes every error. ``kind``
    "diff" validates a ``graft diff`` spec (finetuned, base, output, diff_dtype, ...)."""
    if not isinstance(data, Mapping):
        raise SpecError(f"{source}: expected a mapping of keys (target, finetuned, base, output, ...)")
    if kind == "diff":
        _check_keys(data, _DIFF_JOB_KEYS, f"{source} (graft diff)")
        for key in ("finetuned", "base"):
            if key not in data:
                raise SpecError(f"{source}: key '{key}': field required (graft diff writes finetuned - base)")
    else:
        _check_keys(data, _KEYS, source)
        if "target" not in data:
            raise SpecError(f"{source}: key 'target': field required")
    for i, rule in enumerate(data.get("rules") or []):
        if isinstance(rule, Mapping):
            _check_keys(rule, _RULE_KEYS, f"{source}: rules[{i}]")
    diffs = data.get("diffs")
    if diffs is not None:
        if any(k in data for k in ("finetuned", "base", "diff", "alpha")):
            raise SpecError(f"{source}: key 'diffs': give either diffs or finetuned/base/alpha, not both "
                            f"(each diff has its own finetuned, base and alpha)")
        for i, d in enumerate(diffs if isinstance(diffs, list) else []):
            if isinstance(d, Mapping):
                _check_keys(d, _DIFF_KEYS, f"{source}: diffs[{i}]")
                _diff_form(d, f"{source}: diffs[{i}]")
                for j, rule in enumerate(d.get("rules") or []):
                    if isinstance(rule, Mapping):
                        _check_keys(rule, _RULE_KEYS, f"{source}: diffs[{i}].rules[{j}]")
    elif kind == "transfer":
        _diff_form(data, source)
    try:
        m = _SpecModel.model_validate(dict(data))
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "spec"
        given = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
        msg = err["msg"].removeprefix("Value error, ").replace(" or instance of _RuleModel",
                                                                " with keys match and alpha")
        raise SpecError(f"{source}: key '{loc}': {msg}{given}") from None
    if kind == "transfer" and m.target is None:
        raise SpecError(f"{source}: key 'target': Input should be a valid string (got None)")
    if m.diffs is None:
        diff_models = [_DiffModel(finetuned=m.finetuned, base=m.base, diff=m.diff, alpha=m.alpha)]
    else:
        diff_models = m.diffs
    for i, dm in enumerate(diff_models):
        where = "alpha" if m.diffs is None else f"diffs.{i}.alpha"
        if not math.isfinite(dm.alpha):
            raise SpecError(f"{source}: key '{where}' must be finite, got {dm.alpha}")
        for j, r in enumerate(dm.rules):
            if not math.isfinite(r.alpha):
                raise SpecError(f"{source}: key 'diffs.{i}.rules.{j}.alpha' must be finite, got {r.alpha}")
    for i, r in enumerate(m.rules):
        if not math.isfinite(r.alpha):
            raise SpecError(f"{source}: key 'rules.{i}.alpha' must be finite, got {r.alpha}")
    diffs_out = tuple(Diff(_normalize_location(dm.diff or dm.finetuned or ""),
                           "" if dm.diff else _normalize_location(dm.base or ""), float(dm.alpha),
                           tuple(Rule(r.match, float(r.alpha)) for r in dm.rules)) for dm in diff_models)
    rules = tuple(Rule(r.match, float(r.alpha)) for r in m.rules)
    if len(diffs_out) == 1:  # one diff is the plain form: its own rules simply come first
        rules = diffs_out[0].rules + rules
        diffs_out = (Diff(diffs_out[0].finetuned, diffs_out[0].base, diffs_out[0].alpha),)
    files = tuple((p, _donor(donor, diffs_out, f"{source}: key 'files.{p}'", kind)) for p, donor in m.files.items())
    if m.output.startswith("hf://"):
        raise SpecError(f"{source}: key 'output': the Hub is not a job output ({m.output}); write to a "
                        f"local path or an object store, then publish the committed result with "
                        f"`graft push OUTPUT {m.output}`")
    # A difference's side files are its fine-tune's (config.json too: the model family it belongs to).
    defaults = tuple((p, _donor("finetuned" if kind == "diff" else d, diffs_out, "", kind))
                     for p, d in DEFAULT_FILES if p not in m.files)
    return JobSpec(
        target=_normalize_location(m.target) if m.target else "",
        diffs=diffs_out,
        output=_normalize_location(m.output),
        # graft diff computes in float32 (the difference a float32 transfer computes) and measures
        # what it writes in its manifest, not in a transfer report.
        compute_dtype="float32" if kind == "diff" else m.compute_dtype,
        output_format=m.output_format,
        vocab=m.vocab,
        rules=rules,
        on_missing=m.on_missing,
        allow_nonfinite=m.allow_nonfinite,
        allow_family_mismatch=m.allow_family_mismatch,
        # User entries come first, so they win over the defaults for the same file.
        files=files + defaults,
        max_shard_size=(
            None if m.max_shard_size is None
            else parse_size(m.max_shard_size, f"{source}: key 'max_shard_size'")
        ),
        max_side_file_size=parse_size(m.max_side_file_size, f"{source}: key 'max_side_file_size'"),
        chunk_size=parse_size(m.chunk_size, f"{source}: key 'chunk_size'"),
        read_concurrency=m.read_concurrency,
        report="off" if kind == "diff" else m.report,
        storage_options={k: dict(v) for k, v in m.storage_options.items()},
        kind=kind,
        diff_dtype=m.diff_dtype,
    )


def _donor(value: str, diffs: tuple[Diff, ...], where: str, job: str = "transfer") -> str:
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


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``key=value`` overrides (dotted keys nest; values are parsed as YAML)."""
    out: dict[str, Any] = dict(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise SpecError(f"--set {item!r}: expected key=value, e.g. --set alpha=0.5")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise SpecError(f"--set {item!r}: value is not valid YAML ({e.__class__.__name__})") from None
        parts = key.strip().split(".")
        _check_keys({parts[0]: None}, (*_KEYS, "diff_dtype"), f"--set {item!r}")
        if parts[0] == "files" and len(parts) > 2:
            parts = ["files", ".".join(parts[1:])]  # file names have dots: files.config.json=base
        node: Any = out
        for i, p in enumerate(parts):
            if isinstance(node, list):  # diffs.1.alpha=0.5: an entry of a list, by its index
                if not (p.isdigit() and int(p) < len(node)):
                    raise SpecError(f"--set {item!r}: {'.'.join(parts[:i])} has {len(node)} entries; "
                                    f"{p!r} is not one of their indexes")
                p = int(p)  # type: ignore[assignment]
            if i == len(parts) - 1:
                node[p] = value
                break
            child = node[p] if isinstance(node, list) else node.get(p)
            node[p] = (dict(child) if isinstance(child, Mapping) else list(child) if isinstance(child, list)
                       else {})
            node = node[p]
    return out


def load_spec(path: str, overrides: Sequence[str] = (), kind: str = "transfer") -> JobSpec:
    """Read a YAML job spec from a local file, apply ``--set`` overrides and validate."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise SpecError(f"{path}: no such config file") from None
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise SpecError(f"{path}: expected a mapping of keys (target, finetuned, base, output, ...)")
    return spec_from_mapping(apply_overrides(data, overrides), source=os.path.basename(path), kind=kind)
