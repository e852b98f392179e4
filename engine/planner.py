"""Planning: match the three checkpoints, apply the rules, lay out the output shards.

``make_plan(spec, checkpoints, configs)`` is a pure function of the spec and the headers (plus the
parsed config.json files: the model family, warnings, and how each checkpoint stores its weights,
``quant.py``). It matches *logical* tensors: a plain weight and the FP8 codes + scales of the same
name are one tensor. It raises ``PlanError`` listing what cannot be combined (``QuantizationError``
for a quantization graft refuses), and returns a ``Plan``: frozen, comparable with ``==``, small
enough to ship to a worker per shard.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping

from .checkpoint import INDEX_NAME, SINGLE_NAME, Checkpoint, unsafe_name
from .errors import PlanError, QuantizationError
from .manifest import MANIFEST_NAME, SUMS_NAME
from .report import REPORT_NAME
from .quant import FP8_CODES, Layout, Stored, layout_for
from .safetensors import FLOATING_DTYPES, build_header
from .spec import JobSpec
from .tasks import (REPORT_EVERY, ROLES, ExecSettings, OutScales, Scales, ShardTask, Source, TensorTask, Term,
                    zero_source)
from . import vocab as vocab_rows

__all__ = [
    "ROLES",
    "RESERVED_OUTPUT_NAMES",
    "Source",
    "TensorTask",
    "ShardTask",
    "ExecSettings",
    "SideFile",
    "Plan",
    "make_plan",
    "make_diff_plan",
]

RESERVED_OUTPUT_NAMES = frozenset({MANIFEST_NAME, SUMS_NAME, INDEX_NAME, REPORT_NAME})
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
# The key of config.json that says how the weights are stored; the output's must match its weights.
QUANT_KEY = "quantization_config"


@dataclass(frozen=True)
class SideFile:
    """A non-weight file copied from the ``donor`` checkpoint: verbatim, unless ``patch`` sets
    top-level JSON keys (``(key, JSON text)``; None removes the key), e.g. config.json's
    ``quantization_config`` so that it describes the output's weights."""

    name: str
    donor: str
    patch: tuple[tuple[str, str | None], ...] = ()


@dataclass(frozen=True)
class Plan:
    """Everything execution and commit need; built from headers only."""

    shards: tuple[ShardTask, ...]
    side_files: tuple[SideFile, ...]
    write_index: bool
    warnings: tuple[str, ...]
    combined: int
    copied: int
    left_out: tuple[str, ...]
    formats: tuple[tuple[str, str], ...] = ()  # (role or "output", how it stores its weights)
    vocab: tuple[tuple[str, str], ...] = ()  # (tensor, where its rows come from): resized vocabularies

    @property
    def tensor_count(self) -> int:
        return sum(1 for s in self.shards for t in s.tensors if not t.continues)

    @property
    def read_bytes(self) -> int:
        return sum(s.read_bytes for s in self.shards)

    @property
    def write_bytes(self) -> int:
        return sum(s.size for s in self.shards)

    def weight_map(self) -> dict[str, str]:
        return {name: s.file for s in self.shards for t in s.tensors for name, _, _ in t.stored()}

    def index_json(self) -> dict[str, Any]:
        """The ``model.safetensors.index.json`` content (``total_size``: tensor bytes, HF's convention)."""
        total = sum(t.nbytes for s in self.shards for t in s.tensors)
        return {"metadata": {"total_size": total}, "weight_map": dict(sorted(self.weight_map().items()))}


def _source(ckpt: Checkpoint, role: str, stored: Stored, pow2: bool = False) -> Source:
    ref, sc = stored.codes, stored.scales
    scales = None
    if sc is not None and stored.block is not None:
        scales = Scales(sc.name, sc.dtype, sc.shape, stored.block, pow2, sc.file, sc.begin, sc.end,
                        ckpt.version_of(sc.file))
    return Source(role, ref.file, ref.dtype, ref.begin, ref.end, ckpt.version_of(ref.file), scales)


def _output_encoding(spec: JobSpec, t: Stored, pow2: bool) -> tuple[str, OutScales | None]:
    """The output's dtype and scales for a target tensor: the target's format, or BF16."""
    if spec.output_format == "bf16" and t.codes.dtype in FP8_CODES:
        return "BF16", None
    if t.scales is not None and t.block is not None:
        return t.codes.dtype, OutScales(t.scales.name, t.scales.dtype, t.scales.shape, t.block, pow2)
    return t.codes.dtype, None


def _layouts(checkpoints: Mapping[str, Checkpoint], configs: Mapping[str, Mapping[str, Any] | None],
             canon: Mapping[str, str]) -> dict[str, Layout]:
    """Each checkpoint's logical tensors (once per checkpoint, whatever roles it plays); every
    refused quantization is listed at once."""
    layouts: dict[str, Layout] = {}
    problems: list[str] = []
    for role, first in canon.items():
        if first != role:
            continue
        c = checkpoints[role]
        try:
            layouts[role] = layout_for(c, configs.get(role), role)
        except QuantizationError as e:
            problems.append(str(e))
    if problems:
        raise _refusal(problems, QuantizationError)
    return {role: layouts[first] for role, first in canon.items()}


def _refusal(problems: list[str], kind: type[PlanError] = PlanError) -> PlanError:
    """One error for every problem found: the first one's message, how many more, all of them listed."""
    more = f" (and {len(problems) - 1} more problem(s); run graft plan to list them)" if len(problems) > 1 else ""
    return kind(problems[0] + more, problems)


def _family(spec: JobSpec, checkpoints: Mapping[str, Checkpoint],
            configs: Mapping[str, Mapping[str, Any] | None], roles: list[str]) -> list[str]:
    """The warnings about checkpoints of different model families (``allow_family_mismatch``);
    without it they are refused, before anything else (another family's quantization or tensor
    names would only add noise)."""
    family = _family_problems(configs, {r: checkpoints[r].uri for r in roles})
    if spec.allow_family_mismatch or not family:
        return family
    raise PlanError(family[0] + "; set allow_family_mismatch: true if this is really intended",
                    [f"{p}; set allow_family_mismatch: true if this is really intended" for p in family])


def _examples(names: list[str], n: int = 3) -> str:
    shown = ", ".join(repr(x) for x in names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def _canonical(spec: JobSpec, checkpoints: Mapping[str, Checkpoint]) -> dict[str, str]:
    """Each role -> the first role (in the spec's order) opened as the same checkpoint: the name its
    sources are read under, so bytes two roles share (two diffs from one base) are read once."""
    roles = list(spec.roles)
    return {r: next(q for q in roles if checkpoints[q] is checkpoints[r]) for r in roles}


def make_plan(
    spec: JobSpec,
    checkpoints: Mapping[str, Checkpoint],
    configs: Mapping[str, Mapping[str, Any] | None] | None = None,
) -> Plan:
    """Plan the job. ``checkpoints`` maps each role of ``spec.roles`` (``ROLES`` for one diff) to its
    opened checkpoint (one object for roles at the same location); ``configs`` their parsed
    config.json (None where absent), which also declare how each stores its weights."""
    configs = configs or {}
    canon = _canonical(spec, checkpoints)
    roles = list(canon)
    tgt = checkpoints["target"]
    n_diffs = len(spec.diffs)
    problems: list[str] = []
    warnings: list[str] = []
    tasks: dict[str, TensorTask] = {}
    carried_missing: list[str] = []
    missing: dict[str, list[str]] = {role: [] for role in roles[1:]}
    combined = copied = 0
    resized: dict[str, tuple[Stored, Stored, Stored, float, str, OutScales | None]] = {}

    warnings.extend(_family(spec, checkpoints, configs, roles))
    layouts = _layouts(checkpoints, configs, canon)
    logical, tie_notes = vocab_rows.untie({role: layouts[role].tensors for role in roles}, configs)
    warnings.extend(tie_notes)
    problems.extend(_overlap_problems(spec, checkpoints, logical))
    extra = sorted({n for role in roles[1:] for n in logical[role] if n not in logical["target"]})

    scheme = layouts["target"].scheme
    pow2 = scheme is not None and scheme.pow2
    for name, t in logical["target"].items():
        dtype, scales = _output_encoding(spec, t, pow2)
        shape = t.codes.shape
        target_source = _source(tgt, "target", t, pow2)
        alphas = [spec.alpha_for(name, i) for i in range(n_diffs)]
        active = [i for i, a in enumerate(alphas) if a != 0.0]  # a diff with alpha 0 is not read
        if t.codes.dtype not in FLOATING_DTYPES or not active:
            tasks[name] = TensorTask(name, dtype, shape, target_source, scales=scales)
            copied += 1
            continue
        pairs = {i: tuple(logical[r].get(name) for r in spec.diff_roles(i)) for i in active}
        absent = [r for i in active for r, st in zip(spec.diff_roles(i), pairs[i]) if st is None]
        if absent:
            if spec.on_missing == "carry_target":
                tasks[name] = TensorTask(name, dtype, shape, target_source, scales=scales)
                carried_missing.append(name)
                copied += 1
            else:
                for r in absent:
                    missing[r].append(name)  # reported below, once for all tensors
            continue
        stored = {"target": t, **{r: st for i in active for r, st in zip(spec.diff_roles(i), pairs[i])}}
        shapes = {r: st.codes.shape for r, st in stored.items()}  # type: ignore[union-attr]
        if (len(shape) == 2 and all(s[1:] == shape[1:] for s in shapes.values())
                and (len(set(shapes.values())) > 1
                     or (spec.vocab == "align" and vocab_rows.VOCAB_TENSOR.search(name)))
                and vocab_rows.is_vocab_tensor(name, {r: s[0] for r, s in shapes.items()}, configs)):
            if spec.diffs[0].stored:
                problems.append(f"tensor {name!r} has shape {_where(shapes, checkpoints)}: a resized "
                                f"vocabulary, which graft transfers from a fine-tune and its base, not from "
                                f"a stored diff; run the job with finetuned and base (and vocab: pad)")
            elif n_diffs == 1:
                f, b = pairs[0]
                resized[name] = (t, f, b, alphas[0], dtype, scales)  # type: ignore[assignment]
            else:
                problems.append(f"tensor {name!r} has shape {_where(shapes, checkpoints)}: a resized "
                                f"vocabulary, which graft transfers for one diff only; transfer the diffs "
                                f"one at a time, or carry the target's rows with a rule alpha: 0")
            continue
        if len(set(shapes.values())) > 1:
            problems.append(
                f"tensor {name!r} has shape {_where(shapes, checkpoints)}; the checkpoints are not "
                f"the same architecture (exclude it with a rule alpha: 0 to carry the target's)"
            )
            continue
        odd = [r for r, st in stored.items() if r != "target" and st.codes.dtype not in FLOATING_DTYPES]  # type: ignore[union-attr]
        for r in odd:
            problems.append(f"tensor {name!r} is {stored[r].codes.dtype} in {r} ({checkpoints[r].uri}) "  # type: ignore[union-attr]
                            f"but {t.codes.dtype} in target; cannot compute a float difference from it")
        terms = tuple(_term(checkpoints, canon, spec.diff_roles(i), pairs[i], alphas[i], i) for i in active)  # type: ignore[arg-type]
        tasks[name] = TensorTask(name, dtype, shape, target_source, terms, scales)
        combined += 1

    pieces, vocab_report, vocab_problems, vocabs = _resized(spec, checkpoints, resized, canon)
    problems.extend(vocab_problems)
    for name, parts in pieces.items():
        tasks[name] = parts[0]
        combined += 1

    activations = layouts["target"].activation_scales
    if activations and spec.output_format == "target":
        for name, ref in activations.items():
            tasks[name] = TensorTask(name, ref.dtype, ref.shape, _source(tgt, "target", Stored(ref)))
            copied += 1
        warnings.append(f"{len(activations)} calibrated activation scale(s) of the target are carried "
                        f"unchanged ({_examples(list(activations), 2)}): they were calibrated on the "
                        f"target, not on the output; recalibrate them if that matters, or write "
                        f"output_format: bf16")

    inputs = "finetuned/base" if n_diffs == 1 else "the diffs' checkpoints"
    if spec.on_missing == "error":
        for role, names in missing.items():
            names = [n for n in names if n not in tasks]
            if names:
                problems.append(
                    f"{len(names)} tensor(s) of the target are missing from {role} "
                    f"({checkpoints[role].uri}): {_examples(names)}; set on_missing: carry_target to "
                    f"carry them from the target, or add a rule with alpha: 0"
                )
        if extra:
            problems.append(
                f"{len(extra)} tensor(s) of {inputs} are not in the target ({tgt.uri}): "
                f"{_examples(extra)}; set on_missing: carry_target to leave them out"
            )
    else:
        if carried_missing:
            warnings.append(f"{len(carried_missing)} tensor(s) missing from {inputs} are "
                            f"carried from the target unchanged: {_examples(carried_missing)}")
        if extra:
            warnings.append(f"{len(extra)} tensor(s) only in {inputs} are left out: "
                            f"{_examples(extra)}")
    if problems:
        raise _refusal(problems)

    dtypes: dict[str, set[str]] = {role: set() for role in roles}
    for t in tasks.values():
        if t.combine:
            dtypes["target"].add(t.target.dtype)
            for x in t.terms:
                for r, src in zip(spec.diff_roles(x.diff), (x.finetuned, x.base)):
                    dtypes[r].add(src.dtype)
    stored_dtypes = {r: sorted(d) for r, d in dtypes.items() if d}
    if len({tuple(d) for d in stored_dtypes.values()}) > 1:
        warnings.append("input dtypes differ (" + ", ".join(f"{r} {'/'.join(d)}" for r, d in stored_dtypes.items())
                        + f"): computed in {spec.compute_dtype}, written in the target's dtypes")
    warnings.extend(_config_warnings(spec, configs))

    config_patch = _quant_patch(spec, layouts, configs) + _vocab_patch(spec, configs, pieces)
    side_files, side_warnings = _side_files(spec, checkpoints, config_patch)  # sizes checked first
    fits = _tokenizer_fits(spec, checkpoints, tasks, pieces, vocabs)
    if fits:
        raise PlanError(fits[0], fits)
    settings = ExecSettings(spec.compute_dtype, spec.chunk_size, spec.allow_nonfinite, spec.read_concurrency,
                            REPORT_EVERY[spec.report])
    shards = _layout(spec, tgt, tasks, settings, pieces)
    warnings.extend(side_warnings)
    write_index = len(shards) > 1 or shards[0].file != SINGLE_NAME
    left_out = tuple(extra) + (tuple(activations) if spec.output_format == "bf16" else ())
    formats = tuple((role, layouts[role].describe()) for role in roles) + (
        ("output", _describe_output(tasks.values())),)
    return Plan(shards, side_files, write_index, tuple(warnings), combined, copied, left_out, formats,
                tuple(vocab_report))


def _term(checkpoints: Mapping[str, Checkpoint], canon: Mapping[str, str], roles: tuple[str, ...],
          stored: tuple[Stored, ...], alpha: float, diff: int) -> Term:
    """A diff's term of one tensor: its fine-tune and base, or a stored difference over a zero base."""
    f = _source(checkpoints[roles[0]], canon[roles[0]], stored[0])
    if len(roles) == 1:
        return Term(f, zero_source("", f.dtype), alpha, diff)
    return Term(f, _source(checkpoints[roles[1]], canon[roles[1]], stored[1]), alpha, diff)


def make_diff_plan(
    spec: JobSpec,
    checkpoints: Mapping[str, Checkpoint],
    configs: Mapping[str, Mapping[str, Any] | None] | None = None,
) -> Plan:
    """Plan ``graft diff``: every floating tensor of the fine-tune, minus the base's, written as
    ``spec.diff_dtype`` in the fine-tune's shard layout (or re-laid by ``max_shard_size``). Integer
    tensors and activation scales are left out (a transfer takes them from its target)."""
    configs = configs or {}
    canon = _canonical(spec, checkpoints)
    ft, bs = checkpoints["finetuned"], checkpoints["base"]
    problems: list[str] = []
    warnings: list[str] = []
    warnings.extend(_family(spec, checkpoints, configs, list(canon)))
    layouts = _layouts(checkpoints, configs, canon)
    logical, notes = vocab_rows.untie({"target": layouts["finetuned"].tensors, "base": layouts["base"].tensors},
                                      {"target": configs.get("finetuned"), "base": configs.get("base")})
    warnings.extend(n.replace("the target", "the fine-tune") for n in notes)
    mine, theirs = logical["target"], logical["base"]
    dtype = "F32" if spec.diff_dtype == "float32" else "BF16"
    tasks: dict[str, TensorTask] = {}
    left_out = [n for n, st in mine.items() if st.codes.dtype not in FLOATING_DTYPES]
    left_out += list(layouts["finetuned"].activation_scales)
    missing = []
    for name, f in mine.items():
        if f.codes.dtype not in FLOATING_DTYPES:
            continue
        b = theirs.get(name)
        if b is None:
            missing.append(name)
            continue
        if f.codes.shape != b.codes.shape:
            vocab = " (a resized vocabulary: run the transfer from the fine-tune and its base, with vocab: pad)"
            problems.append(f"tensor {name!r} has shape {list(f.codes.shape)} in finetuned ({ft.uri}) but "
                            f"{list(b.codes.shape)} in base ({bs.uri}); graft diff needs equal shapes"
                            + (vocab if vocab_rows.VOCAB_TENSOR.search(name) else ""))
            continue
        if b.codes.dtype not in FLOATING_DTYPES:
            problems.append(f"tensor {name!r} is {b.codes.dtype} in base ({bs.uri}) but {f.codes.dtype} in "
                            f"finetuned; cannot compute a float difference from it")
            continue
        term = _term(checkpoints, canon, ("finetuned", "base"), (f, b), 1.0, 0)
        tasks[name] = TensorTask(name, dtype, f.codes.shape, Source("", "", dtype, 0, 0), (term,))
    extra = sorted(n for n, st in theirs.items() if n not in mine and st.codes.dtype in FLOATING_DTYPES)
    for what, names, where in (("missing from base", missing, bs.uri), ("only in base", extra, bs.uri)):
        if not names:
            continue
        if spec.on_missing == "error":
            problems.append(f"{len(names)} tensor(s) of the fine-tune are {what} ({where}): {_examples(names)}; "
                            f"set on_missing: carry_target to leave them out of the diff")
        else:
            warnings.append(f"{len(names)} tensor(s) {what} are left out of the diff: {_examples(names)}")
            left_out += names if what == "missing from base" else []
    if not tasks and not problems:
        problems.append(f"finetuned ({ft.uri}) has no floating tensor the base also has: nothing to diff")
    if problems:
        raise _refusal(problems)
    # The diff holds its fine-tune's side files; its config.json no longer describes FP8 weights.
    config = configs.get(spec.donor_for("config.json") or "")
    patch = ((QUANT_KEY, None),) if isinstance(config, Mapping) and QUANT_KEY in config else ()
    side_files, side_warnings = _side_files(spec, checkpoints, patch)
    # The Hub vouches for each file's sha256 (its LFS id, the file's version in the manifest): the
    # others' bytes are hashed as they stream.
    hashed = tuple(sorted({canon[r] for r in canon if not all((f.version or "").startswith("sha256:")
                                                              for f in checkpoints[r].files)}))
    settings = ExecSettings("float32", spec.chunk_size, spec.allow_nonfinite, spec.read_concurrency,
                            report_every=1, hash_roles=hashed)
    shards = _layout(spec, ft, tasks, settings)
    write_index = len(shards) > 1 or shards[0].file != SINGLE_NAME
    formats = tuple((role, layouts[role].describe()) for role in ("finetuned", "base")) + (
        ("output", f"plain ({dtype}): finetuned - base"),)
    return Plan(shards, side_files, write_index, tuple(warnings + side_warnings), len(tasks), 0, tuple(left_out),
                formats)


def _where(shapes: Mapping[str, tuple[int, ...]], checkpoints: Mapping[str, Checkpoint]) -> str:
    return ", ".join(f"{list(s)} in {r} ({checkpoints[r].uri})" for r, s in shapes.items())


def _resized(spec: JobSpec, checkpoints: Mapping[str, Checkpoint],
             resized: Mapping[str, tuple[Stored, Stored, Stored, float, str, OutScales | None]],
             canon: Mapping[str, str]) -> tuple[dict[str, tuple[TensorTask, ...]], list[tuple[str, str]], list[str],
                        dict[str, dict[str, int]] | None]:
    """The pieces of each embedding / LM head whose vocabulary differs between the checkpoints (as
    ``spec.vocab`` says), what the plan reports about their rows, the problems, and the three
    tokenizers' vocabularies if ``align`` read them."""
    pieces: dict[str, tuple[TensorTask, ...]] = {}
    report: list[tuple[str, str]] = []
    problems: list[str] = []
    vocabs: dict[str, dict[str, int]] | None = None
    for name, (t, f, b, alpha, dtype, scales) in resized.items():
        stored = {"target": t, "finetuned": f, "base": b}
        rows = {role: st.codes.shape[0] for role, st in stored.items()}
        where = ", ".join(f"{list(stored[r].codes.shape)} in {r} ({checkpoints[r].uri})" for r in ROLES)
        if spec.vocab == "error":
            problems.append(f"tensor {name!r} has shape {where}: a resized vocabulary; set vocab: pad to "
                            f"transfer the shared rows and take the new ones from the fine-tune (the "
                            f"paper's way), or vocab: align to match rows by token through tokenizer.json")
            continue
        odd = [r for r in ROLES if stored[r].codes.dtype not in FLOATING_DTYPES]
        if odd:
            problems.append(f"tensor {name!r} is {stored[odd[0]].codes.dtype} in {odd[0]} "
                            f"({checkpoints[odd[0]].uri}); cannot compute a float difference from it")
            continue
        if scales is not None or any(st.scales is not None for st in stored.values()):
            problems.append(f"tensor {name!r}: vocab: {spec.vocab} needs plain (unquantized) rows, but it is "
                            f"stored as FP8 in some checkpoint; use output_format: bf16 or an unquantized "
                            f"release")
            continue
        if spec.vocab == "pad":
            lost = [r for r in ("target", "base") if rows[r] > rows["finetuned"]]
            if lost:
                problems.append(f"tensor {name!r} has shape {where}: vocab: pad keeps the fine-tune's "
                                f"{rows['finetuned']} rows, so {lost[0]}'s rows past them would be lost; "
                                f"use vocab: align (rows matched by token)")
                continue
            rowmap = vocab_rows.pad_map(rows)
        else:
            out_role = spec.donor_for(vocab_rows.TOKENIZER)
            if out_role is None:
                problems.append(f"vocab: align gives the output the rows of the checkpoint that donates "
                                f"{vocab_rows.TOKENIZER}, but files says none does; donate one")
                continue
            if vocabs is None:
                try:
                    for c in checkpoints.values():
                        if vocab_rows.TOKENIZER in c.side_files:
                            _check_side_file_size(spec, c, vocab_rows.TOKENIZER)
                    vocabs = vocab_rows.load_vocabs(checkpoints)
                except PlanError as e:
                    problems.append(str(e))
                    break
            rowmap = vocab_rows.align_map(vocabs, rows, out_role)
        sources = {r: _source(checkpoints[r], canon[r], st) for r, st in stored.items()}
        pieces[name] = vocab_rows.pieces(name, dtype, t.codes.shape[1], alpha, sources, rowmap)
        report.append((name, rowmap.describe()))
    return pieces, report, problems, vocabs


def _output_rows(tasks: Mapping[str, TensorTask], pieces: Mapping[str, tuple[TensorTask, ...]]) -> dict[str, int]:
    """Rows of the output's embedding / LM-head tensors."""
    out = {}
    for name, t in tasks.items():
        if vocab_rows.VOCAB_TENSOR.search(name) and len(t.shape) == 2:
            out[name] = pieces[name][0].piece[1] if name in pieces else t.shape[0]  # type: ignore[index]
    return out


def _tokenizer_fits(spec: JobSpec, checkpoints: Mapping[str, Checkpoint], tasks: Mapping[str, TensorTask],
                    pieces: Mapping[str, tuple[TensorTask, ...]],
                    vocabs: Mapping[str, Mapping[str, int]] | None = None) -> list[str]:
    """The output's tokenizer must not hold ids past its embeddings' rows (every such id would index
    outside the matrix at inference)."""
    donor = spec.donor_for(vocab_rows.TOKENIZER)
    rows = _output_rows(tasks, pieces)
    if donor is None or not rows or vocab_rows.TOKENIZER not in checkpoints[donor].side_files:
        return []
    # Its size was checked with the other side files; align has read it already.
    vocab = (vocabs or {}).get(donor) or vocab_rows.read_vocab(checkpoints[donor].read_json(vocab_rows.TOKENIZER))
    if vocab is None:
        return []
    need = vocab_rows.tokenizer_size(vocab)
    short = {n: r for n, r in rows.items() if r < need}
    if not short:
        return []
    name, have = next(iter(short.items()))
    hint = ("set vocab: pad or vocab: align so the output takes the fine-tune's rows (a rule with "
            "alpha: 0 carries the target's)" if spec.vocab == "error" else
            f"donate a tokenizer that fits (files: {{{vocab_rows.TOKENIZER}: target}}, with its other "
            f"tokenizer files)")
    return [f"the output's {vocab_rows.TOKENIZER} (from {donor}, {checkpoints[donor].uri}) has token ids up "
            f"to {need - 1} but {name!r} has {have} rows: those tokens would index past the embeddings "
            f"at inference; {hint}"]


def _vocab_patch(spec: JobSpec, configs: Mapping[str, Mapping[str, Any] | None],
                 pieces: Mapping[str, tuple[TensorTask, ...]]) -> tuple[tuple[str, str | None], ...]:
    """config.json's ``vocab_size`` set to the output's embedding rows when the vocabulary was resized."""
    if not pieces:
        return ()
    rows = next(iter(pieces.values()))[0].piece[1]  # type: ignore[index]
    donor = spec.donor_for("config.json")
    config = configs.get(donor) if donor else None
    if not isinstance(config, Mapping) or config.get("vocab_size") in (None, rows):
        return ()
    return (("vocab_size", json.dumps(rows)),)


def _describe_output(tasks: Any) -> str:
    quantized = [t for t in tasks if t.scales is not None]
    if not quantized:
        return f"plain ({', '.join(sorted({t.dtype for t in tasks}))})"
    kinds = sorted({f"{t.dtype} codes with {t.scales.dtype} scales" for t in quantized})
    return f"FP8 like the target ({'; '.join(kinds)}): {len(quantized)} quantized tensors"


def _quant_patch(spec: JobSpec, layouts: Mapping[str, Layout],
                 configs: Mapping[str, Mapping[str, Any] | None]) -> tuple[tuple[str, str | None], ...]:
    """The change config.json needs so its quantization_config describes the output's weights: the
    target's (output_format target) or none (bf16). Empty when the donated one already does."""
    scheme = layouts["target"].scheme
    wanted = scheme.config if scheme is not None and spec.output_format == "target" else None
    donor = spec.donor_for("config.json")
    config = configs.get(donor) if donor else None
    if not isinstance(config, Mapping) or config.get(QUANT_KEY) == wanted:
        return ()
    return ((QUANT_KEY, None if wanted is None else json.dumps(wanted, sort_keys=True)),)


def _layout(spec: JobSpec, tgt: Checkpoint, tasks: Mapping[str, TensorTask], settings: ExecSettings,
            pieces: Mapping[str, tuple[TensorTask, ...]] | None = None) -> tuple[ShardTask, ...]:
    """Group the tasks into output shards; a tensor written in pieces keeps them together, in order."""
    pieces = pieces or {}

    def parts(name: str) -> tuple[TensorTask, ...]:
        return pieces.get(name) or (tasks[name],)

    groups: list[tuple[str, list[TensorTask], dict[str, str]]] = []
    if spec.max_shard_size is None:
        # Mirror the target: same file names, same tensors in each, same order (a drop-in replacement).
        # A scale tensor is written right after its codes, in the codes' file (the target may have
        # put it in another shard): it is computed from the same rows.
        for f in tgt.files:
            members = [p for e in tgt.headers[f.name].tensors if e.name in tasks for p in parts(e.name)]
            meta = dict(tgt.headers[f.name].metadata or {})
            meta.setdefault("format", "pt")
            groups.append((f.name, members, meta))
    else:
        bins: list[list[TensorTask]] = [[]]
        size = 0
        for name in tasks:
            unit = parts(name)
            nbytes = sum(t.nbytes for t in unit)
            if bins[-1] and size + nbytes > spec.max_shard_size:
                bins.append([])
                size = 0
            bins[-1].extend(unit)
            size += nbytes
        n = len(bins)
        for i, members in enumerate(bins):
            name = SINGLE_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            groups.append((name, members, {"format": "pt"}))
    shards = []
    for i, (name, members, meta) in enumerate(groups):
        prefix, offsets = build_header([st for t in members for st in t.stored()], meta)
        size = len(prefix) + (offsets[-1][1] if offsets else 0)
        shards.append(ShardTask(i, name, tuple(members), tuple(sorted(meta.items())), size, settings))
    return tuple(shards)


def _side_files(spec: JobSpec, checkpoints: Mapping[str, Checkpoint],
                config_patch: tuple[tuple[str, str | None], ...] = ()) -> tuple[tuple[SideFile, ...], list[str]]:
    out: list[SideFile] = []
    warnings: list[str] = []
    names = sorted({n for c in checkpoints.values() for n in c.side_files})
    for name in names:
        if name in RESERVED_OUTPUT_NAMES:
            continue
        donor = spec.donor_for(name)
        if donor is None:
            continue
        why = unsafe_name(name)
        if why is not None:  # a pattern (chat_template.*) can match any name a listing holds
            raise PlanError(f"{checkpoints[donor].uri}: file name {name!r} {why}; graft will not copy it "
                            f"into the output: rename it, or set files: {{<its name>: none}}")
        if name in checkpoints[donor].side_files:
            _check_side_file_size(spec, checkpoints[donor], name)
            out.append(SideFile(name, donor, config_patch if name == "config.json" else ()))
        else:
            warnings.append(f"{name} is donated by {donor} but {donor} has none; the output has no {name}")
    # A file named explicitly (by the user, or config.json) that no checkpoint has is worth a word.
    for pattern, donor in spec.files:
        if donor == "none" or any(c in pattern for c in "*?[") or pattern in names:
            continue
        if not spec.is_default_donor(pattern, donor) or pattern == "config.json":
            warnings.append(f"{pattern} is donated by {donor} but no checkpoint has it")
    return tuple(out), warnings


def _check_side_file_size(spec: JobSpec, donor: Checkpoint, name: str) -> None:
    """A side file is read whole into memory when the output is committed: one over the cap is
    refused now, before any data moves (a pattern such as ``*.bin`` can pick up gigabytes of weights)."""
    size = donor.side_file_size(name)
    cap = spec.max_side_file_size
    if size > cap:
        raise PlanError(f"{donor.storage.url(name)}: side file of {size} bytes ({size / 2**20:.1f} MiB), "
                        f"over the {cap}-byte cap (max_side_file_size); side files are copied whole "
                        f"through memory: leave it out (files: {{{name}: none}}) or raise "
                        f"max_side_file_size if it really belongs in the output")


def _family_problems(configs: Mapping[str, Mapping[str, Any] | None], uris: Mapping[str, str]) -> list[str]:
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


def _overlap_problems(spec: JobSpec, checkpoints: Mapping[str, Checkpoint],
                      logical: Mapping[str, Mapping[str, Stored]]) -> list[str]:
    """A finetuned or base that holds few of the target's tensors is another architecture: say so
    plainly instead of listing hundreds of missing tensors (or carrying them all)."""
    out = []
    for i in range(len(spec.diffs)):
        wanted = [n for n, t in logical["target"].items()
                  if t.codes.dtype in FLOATING_DTYPES and spec.alpha_for(n, i) != 0.0]
        for role in spec.diff_roles(i):
            out.extend(_overlap(role, checkpoints, logical[role], wanted))
    return out


def _overlap(role: str, checkpoints: Mapping[str, Checkpoint], have: Mapping[str, Stored],
             wanted: list[str]) -> list[str]:
    found = sum(n in have for n in wanted)
    if not wanted or found >= _MIN_OVERLAP * len(wanted):
        return []
    lacking = _examples([n for n in wanted if n not in have], 2)
    return [f"{role} ({checkpoints[role].uri}) holds only {found} of the {len(wanted)} tensors of the "
            f"target ({checkpoints['target'].uri}) to combine, e.g. not {lacking}; it is not the target's "
            f"architecture: check the path (a rule with alpha: 0 carries the tensors it lacks, if that "
            f"is really intended)"]


def _config_warnings(spec: JobSpec, configs: Mapping[str, Mapping[str, Any] | None]) -> list[str]:
    out = []
    tc = configs.get("target")
    for i in range(len(spec.diffs)):
        ft = spec.diff_roles(i)[0]
        fc = configs.get(ft)
        if not tc or not fc:
            continue
        diffs = [f"{k}: target {tc.get(k)!r} vs {ft} {fc.get(k)!r}"
                 for k in _CONFIG_FIELDS if tc.get(k) != fc.get(k)]
        if diffs:
            out.append(f"config.json differs between target and {ft} in {'; '.join(diffs)}; the output "
                       f"takes the target's config.json")
    return out
