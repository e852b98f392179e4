"""The YAML edge of the job spec: pydantic models, one-line errors, ``--set`` overrides.

Order of use: ``load_spec(path, overrides)`` (or ``spec_from_mapping``) -> ``JobSpec`` (``spec.py``,
the frozen form everything else uses). Every error is a ``SpecError`` whose one-line message names
the key and what is allowed.
"""
from __future__ import annotations

import difflib
import math
import os
import re
from typing import Any, Literal, Mapping, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import SpecError
from .spec import DEFAULT_FILES, DEFAULT_MAX_SIDE_FILE_SIZE, Diff, JobSpec, Rule, donor_role, parse_size

__all__ = ["load_spec", "spec_from_mapping", "apply_overrides", "spec_schema"]


def _no_bool(v: Any) -> Any:
    # YAML reads yes/no/true/false as booleans, which pydantic would take as 1.0 and 0.0.
    if isinstance(v, bool):
        raise ValueError("expected a number like 1.0 or 0.5, not a boolean")
    return v


# The spec reference's words for a checkpoint location (target, finetuned, each diff's finetuned).
_LOCATION = ("a checkpoint location: a local path or fsspec URI of a directory (`model.safetensors`, or shards + "
             "`model.safetensors.index.json`; naming the index means its directory), or one `.safetensors` file; "
             "a Hugging Face cache snapshot folder or `models--org--name` folder works as it is. Relative paths "
             "are resolved against the working directory.")


class _RuleModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    match: str = Field(description=(
        "A regular expression searched (`re.search`) in each tensor name; the first rule that "
        "matches sets the tensor's alpha."))
    alpha: float = Field(description=(
        "The alpha of the tensors this rule matches; 0 copies the target tensor's bytes "
        "unchanged (finetuned/base need not hold it)."))

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
    finetuned: str | None = Field(default=None, min_length=1, description=(
        "This diff's fine-tune: " + _LOCATION))
    base: str | None = Field(default=None, min_length=1, description=(
        "The checkpoint this diff's fine-tune was trained from (each diff has its own base); with a LoRA "
        "adapter as `diff`, the base it was trained on, needed only for its whole tensors."))
    diff: str | None = Field(default=None, min_length=1, description=(
        "Instead of finetuned/base: a difference written by `graft diff`, or a PEFT LoRA adapter "
        "(a location with adapter_config.json), which changes only the weights it has factors for."))
    alpha: float = Field(default=1.0, description=(
        "The scale of this diff vector."))
    rules: list[_RuleModel] = Field(default=[], description=(
        "Rules for this diff only, tried before the job's `rules`; the first match wins."))

    _alpha_not_bool = field_validator("alpha", mode="before")(_no_bool)


class _SpecModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    target: str | None = Field(default=None, min_length=1, description=(
        "Required. The new base θ_target: " + _LOCATION))
    finetuned: str | None = Field(default=None, min_length=1, description=(
        "The fine-tune of the old base θ_ft (or give `diff` or `diffs`): " + _LOCATION))
    base: str | None = Field(default=None, min_length=1, description=(
        "The old base θ_base that `finetuned` was trained from (or give `diff` or `diffs`); with a LoRA "
        "adapter as `diff`, the base it was trained on, needed only for the whole tensors it holds "
        "(`modules_to_save`, trained biases)."))
    diff: str | None = Field(default=None, min_length=1, description=(
        "Instead of finetuned/base: a committed difference written by `graft diff` "
        "(two checkpoints read instead of three), or a PEFT LoRA adapter (a location with "
        "adapter_config.json and adapter_model.safetensors): each weight it has factors for changes "
        "by s·B·A, the others are copied (see the LoRA guide)."))
    diff_dtype: Literal["float32", "bf16"] = Field(default="float32", description=(
        "`graft diff` only: the dtype the difference is written in; "
        "bf16 is half the size, rounded (no bit-identity is claimed for it)."))
    diffs: list[_DiffModel] | None = Field(default=None, min_length=1, description=(
        "Instead of finetuned/base/alpha: several diff vectors applied "
        "in one streaming pass, one entry `{finetuned, base, alpha, rules}` or `{diff, alpha, rules}` each."))
    output: str = Field(min_length=1, description=(
        "Required. The output directory or URI (local, S3, GCS, Azure, ...; not `hf://`: "
        "publish with `graft push`); it must not exist, be empty, or hold an unfinished graft run."))
    alpha: float = Field(default=1.0, description=(
        "The scale α of the diff vector: out = target + α · (finetuned − base)."))
    compute_dtype: Literal["float32", "float64"] = Field(default="float32", description=(
        "The dtype the arithmetic runs in; the result is rounded "
        "once to the target tensor's dtype."))
    output_format: Literal["target", "bf16"] = Field(default="target", description=(
        "`target`: every tensor as the target stores it (FP8 codes "
        "with fresh scales for a quantized target); `bf16`: FP8 tensors written dequantized as BF16, their scale "
        "tensors left out and config.json's `quantization_config` removed."))
    vocab: Literal["error", "pad", "align"] = Field(default="error", description=(
        "When the embeddings / LM head row counts differ (a fine-tune "
        "that added tokens): `error` refuses, `pad` counts missing rows as zeros (the paper's rule), `align` "
        "matches rows by token through the three `tokenizer.json` files."))
    rules: list[_RuleModel] = Field(default=[], description=(
        "Ordered `{match: <regex>, alpha: <float>}` entries; the first match wins "
        "over `alpha`. With `diffs`, they set every diff's alpha after each diff's own rules."))
    on_missing: Literal["error", "carry_target"] = Field(default="error", description=(
        "`error`: the checkpoints must hold the same tensors; "
        "`carry_target`: target tensors missing from finetuned/base are carried over unchanged, tensors only in "
        "finetuned/base are left out; both are reported."))
    allow_nonfinite: bool = Field(default=False, description=(
        "NaN/Inf in an output tensor fails the run naming the tensor, unless true."))
    allow_family_mismatch: bool = Field(default=False, description=(
        "The config.json files must agree on `model_type` and "
        "`architectures`; true turns that refusal into a warning."))
    files: dict[str, str] = Field(default={}, description=(
        "Which checkpoint donates each non-weight file: `{<name or glob>: "
        "target|finetuned|base|none}` (with diffs also `diffs[i].finetuned`, `diffs[i].base`); entries win over the "
        "defaults (config.json from the target, generation config and tokenizer files from the fine-tune)."))
    # Validated by parse_size: pydantic's int|str would turn YAML `true` into 1 first.
    max_shard_size: Any = Field(default=None, description=(
        "A size such as `5GB` or `512MiB`: re-lay the output into "
        "`model-0000i-of-0000n.safetensors` shards. Unset: mirror the target's shard names and contents "
        "(a drop-in replacement)."))
    max_side_file_size: Any = Field(default=DEFAULT_MAX_SIDE_FILE_SIZE, description=(
        "The largest side file (config, tokenizer: anything "
        "`files` donates) copied whole through memory at commit; a larger one is refused at plan time."))
    chunk_size: Any = Field(default="16MiB", description=(
        "Bytes of compute buffer per chunk; bounds memory (larger tensors are "
        "processed in pieces)."))
    read_concurrency: int = Field(default=4, ge=1, le=64, strict=True, description=(
        "Object stores and the Hub: byte ranges in flight per "
        "input stream (1 to 64); each chunk read is split into up to this many range requests. Local files are "
        "read with one `preadv`."))
    report: Literal["sampled", "exact", "off"] = Field(default="sampled", description=(
        "The transfer report measured while the job streams: "
        "`sampled` (every 32nd block of each tensor on a CPU, all on a GPU), `exact` (every element), or `off`."))
    storage_options: dict[str, dict[str, Any]] = Field(default={}, description=(
        "fsspec options per protocol, e.g. "
        "`{s3: {endpoint_url: ...}}` or `{hf: {token: ...}}`; secrets are redacted in the manifest."))

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


def _check_keys(data: Mapping[str, Any], allowed: Sequence[str], where: str,
                problems: list[str] | None = None) -> None:
    """Each key of ``data`` not in ``allowed`` is a problem, with the closest valid key as a hint;
    appended to ``problems`` when given, else the first is raised."""
    for key in data:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(allowed)}"
            if problems is None:
                raise SpecError(f"{where}: unknown key '{key}'; {hint}")
            problems.append(f"{where}: unknown key '{key}'; {hint}")


def _raise_all(problems: list[str]) -> None:
    """One ``SpecError`` listing every problem found, one line each (``problems`` on the error)."""
    if problems:
        raise SpecError("\n".join(problems), problems)


def _misspelled(data: Any, loc: tuple[Any, ...]) -> bool:
    """Whether the required key at ``loc`` is missing because the mapping holding it has a
    misspelling of it (reported once, as the unknown key, not again as a missing one)."""
    node = data
    for part in loc[:-1]:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return False
    if not isinstance(node, Mapping):
        return False
    return any(difflib.get_close_matches(str(k), [str(loc[-1])], n=1, cutoff=0.5) for k in node)


def _pydantic_problems(e: ValidationError, source: str, data: Mapping[str, Any]) -> list[str]:
    """One line per pydantic error: the key path, what is allowed and what was given. Unknown keys
    are left out: ``_check_keys`` reports them with a hint."""
    out = []
    for err in e.errors():
        if err["type"] == "extra_forbidden" or (err["type"] == "missing" and _misspelled(data, err["loc"])):
            continue
        loc = ".".join(str(p) for p in err["loc"]) or "spec"
        given = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
        msg = err["msg"].removeprefix("Value error, ").replace(" or instance of _RuleModel",
                                                                " with keys match and alpha")
        out.append(f"{source}: key '{loc}': {msg}{given}")
    return out


def _normalize_location(uri: str) -> str:
    # Local paths become absolute so the manifest records where the bytes really were.
    if "://" in uri:
        return uri.rstrip("/")
    return os.path.abspath(os.path.expanduser(uri))


def _diff_form(d: Mapping[str, Any], where: str, problems: list[str]) -> None:
    """A diff is a fine-tune and its base, or one stored difference or adapter (``diff``), not both;
    ``diff`` may have a ``base``: the one a LoRA adapter was trained on, for its whole tensors."""
    if "diff" in d and "finetuned" in d:
        problems.append(f"{where}: key 'diff': give either diff (a difference written by graft diff, or a "
                        f"LoRA adapter) or finetuned and base, not both")
    if "diff" not in d:
        for key in ("finetuned", "base"):
            if key not in d:
                problems.append(f"{where}: key '{key}': field required (or diff: a difference written "
                                f"by graft diff)")


def spec_from_mapping(data: Any, source: str = "spec", kind: str = "transfer") -> JobSpec:
    """Validate a parsed YAML mapping; ``source`` (the file name) prefixes every error. ``kind``
    "diff" validates a ``graft diff`` spec (finetuned, base, output, diff_dtype, ...).

    Every problem found is reported at once: the ``SpecError`` lists each on a line of its own and
    in ``problems``."""
    if not isinstance(data, Mapping):
        raise SpecError(f"{source}: expected a mapping of keys (target, finetuned, base, output, ...)")
    problems: list[str] = []
    if kind == "diff":
        _check_keys(data, _DIFF_JOB_KEYS, f"{source} (graft diff)", problems)
        for key in ("finetuned", "base"):
            if key not in data:
                problems.append(f"{source}: key '{key}': field required (graft diff writes finetuned - base)")
    else:
        _check_keys(data, _KEYS, source, problems)
        if "target" not in data:
            problems.append(f"{source}: key 'target': field required")
    for i, rule in enumerate(data.get("rules") or []):
        if isinstance(rule, Mapping):
            _check_keys(rule, _RULE_KEYS, f"{source}: rules[{i}]", problems)
    diffs = data.get("diffs")
    if diffs is not None:
        if any(k in data for k in ("finetuned", "base", "diff", "alpha")):
            problems.append(f"{source}: key 'diffs': give either diffs or finetuned/base/alpha, not both "
                            f"(each diff has its own finetuned, base and alpha)")
        for i, d in enumerate(diffs if isinstance(diffs, list) else []):
            if isinstance(d, Mapping):
                _check_keys(d, _DIFF_KEYS, f"{source}: diffs[{i}]", problems)
                _diff_form(d, f"{source}: diffs[{i}]", problems)
                for j, rule in enumerate(d.get("rules") or []):
                    if isinstance(rule, Mapping):
                        _check_keys(rule, _RULE_KEYS, f"{source}: diffs[{i}].rules[{j}]", problems)
    elif kind == "transfer":
        _diff_form(data, source, problems)
    m: _SpecModel | None = None
    try:
        m = _SpecModel.model_validate(dict(data))
    except ValidationError as e:  # raised below, outside this block: not chained to pydantic's
        problems += _pydantic_problems(e, source, data)
    if m is None:
        raise SpecError("\n".join(problems), problems)
    if kind == "transfer" and m.target is None:
        problems.append(f"{source}: key 'target': Input should be a valid string (got None)")
    if m.diffs is None:
        diff_models = [_DiffModel(finetuned=m.finetuned, base=m.base, diff=m.diff, alpha=m.alpha)]
    else:
        diff_models = m.diffs
    for i, dm in enumerate(diff_models):
        where = "alpha" if m.diffs is None else f"diffs.{i}.alpha"
        if not math.isfinite(dm.alpha):
            problems.append(f"{source}: key '{where}' must be finite, got {dm.alpha}")
        for j, r in enumerate(dm.rules):
            if not math.isfinite(r.alpha):
                problems.append(f"{source}: key 'diffs.{i}.rules.{j}.alpha' must be finite, got {r.alpha}")
    for i, r in enumerate(m.rules):
        if not math.isfinite(r.alpha):
            problems.append(f"{source}: key 'rules.{i}.alpha' must be finite, got {r.alpha}")
    if m.output.startswith("hf://"):
        problems.append(f"{source}: key 'output': the Hub is not a job output ({m.output}); write to a "
                        f"local path or an object store, then publish the committed result with "
                        f"`graft push OUTPUT {m.output}`")
    sizes: dict[str, int | None] = {}
    for key, value in (("max_shard_size", m.max_shard_size), ("max_side_file_size", m.max_side_file_size),
                       ("chunk_size", m.chunk_size)):
        try:
            sizes[key] = None if value is None else parse_size(value, f"{source}: key '{key}'")
        except SpecError as e:
            problems.append(str(e))
    _raise_all(problems)
    diffs_out = tuple(Diff(_normalize_location(dm.diff or dm.finetuned or ""),
                           _normalize_location(dm.base) if dm.base else "", float(dm.alpha),
                           tuple(Rule(r.match, float(r.alpha)) for r in dm.rules)) for dm in diff_models)
    rules = tuple(Rule(r.match, float(r.alpha)) for r in m.rules)
    if len(diffs_out) == 1:  # one diff is the plain form: its own rules simply come first
        rules = diffs_out[0].rules + rules
        diffs_out = (Diff(diffs_out[0].finetuned, diffs_out[0].base, diffs_out[0].alpha),)
    files = tuple((p, donor_role(donor, diffs_out, f"{source}: key 'files.{p}'", kind)) for p, donor in m.files.items())
    # A difference's side files are its fine-tune's (config.json too: the model family it belongs to).
    defaults = tuple((p, donor_role("finetuned" if kind == "diff" else d, diffs_out, "", kind))
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
        max_shard_size=sizes["max_shard_size"],
        max_side_file_size=sizes["max_side_file_size"],
        chunk_size=sizes["chunk_size"],
        read_concurrency=m.read_concurrency,
        report="off" if kind == "diff" else m.report,
        storage_options={k: dict(v) for k, v in m.storage_options.items()},
        kind=kind,
        diff_dtype=m.diff_dtype,
    )


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


def spec_schema(kind: str = "transfer") -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a job spec, generated from the pydantic model, for editors
    (``# yaml-language-server: $schema=graft.schema.json``) and ``graft schema``. ``kind`` "diff":
    the keys a ``graft diff`` spec takes. Rules the model cannot state (a diff's finetuned and base,
    or diff, not both) are checked by ``spec_from_mapping`` only."""
    schema = _SpecModel.model_json_schema()
    if kind == "diff":
        schema["properties"] = {k: v for k, v in schema["properties"].items() if k in _DIFF_JOB_KEYS}
        schema["required"] = ["finetuned", "base", "output"]
        schema["$defs"] = {}
    else:
        del schema["properties"]["diff_dtype"]  # a graft diff key only
    title = "graft diff spec" if kind == "diff" else "graft job spec"
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema, "title": title}
