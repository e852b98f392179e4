"""Planning: match the three checkpoints, apply the rules, lay out the output shards.

``make_plan(spec, checkpoints, configs)`` is a pure function of the spec and the headers (plus the
parsed config.json files: the model family, warnings, and how each checkpoint stores its weights,
``quant.py``). It matches *logical* tensors: a plain weight and the FP8 codes + scales of the same
name are one tensor. It raises ``PlanError`` listing what cannot be combined (``QuantizationError``
for a quantization graft refuses), and returns a ``Plan``: frozen, comparable with ``==``, small
enough to ship to a worker per shard.

The planner's rooms: ``compat.py`` (do the checkpoints belong together), ``vocab_plan.py`` (resized
vocabularies), ``output_files.py`` (shard files, side files, config.json), ``quant.py`` (how each
checkpoint stores its weights); this module matches the tensors and assembles the ``Plan``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from . import vocab as vocab_rows
from ..errors import PlanError, QuantizationError
from ..formats.adapter import Adapter
from ..formats.checkpoint import SINGLE_NAME, Checkpoint
from .chunks import shard_read_bytes
from .compat import config_warnings, describe_shapes, examples, family_warnings, overlap_problems, refusal
from .output_files import (QUANT_KEY, RESERVED_OUTPUT_NAMES, SideFile, describe_output, donated_files,
                           quant_patch, quant_side_file_problems, shard_layout, weights_patch)
from ..formats.safetensors import FLOATING_DTYPES
from .quant import FP8_CODES, Layout, Stored, layout_for, source_of
from .spec import JobSpec
from .lora_plan import bias_term, lora_problem, lora_term, whole_pair
from .tasks import REPORT_EVERY, ROLES, ExecSettings, OutScales, ShardTask, Source, TensorTask, Term, zero_source
from .vocab_plan import output_vocab_rows, resized_pieces, tokenizer_fits

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
        return sum(shard_read_bytes(s) for s in self.shards)

    @property
    def write_bytes(self) -> int:
        return sum(s.size for s in self.shards)

    def lora(self) -> dict[str, dict[str, dict[str, Any]]]:
        """The tensors each LoRA adapter changes (by the adapter's role): rank, scale and alpha; a
        LoRA bias has ``bias: true`` and no rank."""
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for s in self.shards:
            for t in s.tensors:
                for x in t.terms:
                    if x.lora is not None:
                        out.setdefault(x.lora.a.role, {})[t.name] = {
                            "rank": x.lora.rank, "scale": x.lora.scale, "alpha": x.alpha,
                            "transposed": x.lora.transpose}
                    elif x.scale is not None:  # a LoRA bias
                        out.setdefault(x.finetuned.role, {})[t.name] = {"bias": True, "scale": x.scale,
                                                                       "alpha": x.alpha}
        return out

    def weight_map(self) -> dict[str, str]:
        return {name: s.file for s in self.shards for t in s.tensors for name, _, _ in t.stored()}

    def index_json(self) -> dict[str, Any]:
        """The ``model.safetensors.index.json`` content (``total_size``: tensor bytes, HF's convention)."""
        total = sum(t.nbytes for s in self.shards for t in s.tensors)
        return {"metadata": {"total_size": total}, "weight_map": dict(sorted(self.weight_map().items()))}


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
        raise refusal(problems, QuantizationError)
    return {role: layouts[first] for role, first in canon.items()}


def _canonical(spec: JobSpec, checkpoints: Mapping[str, Checkpoint]) -> dict[str, str]:
    """Each role -> the first role (in the spec's order) opened as the same checkpoint: the name its
    sources are read under, so bytes two roles share (two diffs from one base) are read once."""
    roles = list(spec.roles)
    return {r: next(q for q in roles if checkpoints[q] is checkpoints[r]) for r in roles}


def make_plan(
    spec: JobSpec,
    checkpoints: Mapping[str, Checkpoint],
    configs: Mapping[str, Mapping[str, Any] | None] | None = None,
    adapters: Mapping[str, Adapter] | None = None,
) -> Plan:
    """Plan the job. ``checkpoints`` maps each role of ``spec.roles`` (``ROLES`` for one diff) to its
    opened checkpoint (one object for roles at the same location); ``configs`` their parsed
    config.json (None where absent), which also declare how each stores its weights; ``adapters``
    the diffs given as a PEFT LoRA adapter, by role: each changes the weights it has factors for
    and leaves the others as they are."""
    configs = configs or {}
    adapters = adapters or {}
    canon = _canonical(spec, checkpoints)
    roles = list(canon)
    weights = [r for r in roles if r not in adapters]  # the checkpoints of weights
    lora_of = {i: adapters[spec.diff_roles(i)[0]] for i in range(len(spec.diffs))
               if spec.diff_roles(i)[0] in adapters}
    tgt = checkpoints["target"]
    n_diffs = len(spec.diffs)
    problems: list[str] = []
    warnings: list[str] = []
    tasks: dict[str, TensorTask] = {}
    carried_missing: list[str] = []
    missing: dict[str, list[str]] = {role: [] for role in roles[1:]}
    combined = copied = 0
    resized: dict[str, tuple[Stored, Stored, Stored, float, str, OutScales | None]] = {}

    warnings.extend(family_warnings(spec, checkpoints, configs, weights))
    layouts = _layouts(checkpoints, configs, {r: c for r, c in canon.items() if r not in adapters})
    logical, tie_notes = vocab_rows.untie({role: layouts[role].tensors for role in weights}, configs)
    warnings.extend(tie_notes)
    problems.extend(overlap_problems(spec, checkpoints, logical))
    extra = sorted({n for role in weights[1:] for n in logical[role] if n not in logical["target"]})
    for i, adapter in lora_of.items():
        warnings.extend(adapter.warnings)
        foreign = [n for n in [*adapter.factors, *adapter.whole, *adapter.biases] if n not in logical["target"]]
        if foreign:
            role = spec.diff_roles(i)[0]
            problems.append(f"{role} ({adapter.uri}) changes {len(foreign)} weight(s) the target does not have: "
                            f"{examples(foreign)}; it is an adapter of another architecture: check the path")

    scheme = layouts["target"].scheme
    pow2 = scheme is not None and scheme.pow2
    for name, t in logical["target"].items():
        dtype, scales = _output_encoding(spec, t, pow2)
        shape = t.codes.shape
        target_source = source_of(tgt, "target", t, pow2)
        alphas = [spec.alpha_for(name, i) for i in range(n_diffs)]
        # A diff with alpha 0 is not read; nor is an adapter without factors for the tensor (it
        # leaves it as it is).
        active = [i for i, a in enumerate(alphas) if a != 0.0 and (i not in lora_of or lora_of[i].touches(name))]
        if t.codes.dtype not in FLOATING_DTYPES or not active:
            tasks[name] = TensorTask(name, dtype, shape, target_source, scales=scales)
            copied += 1
            continue
        lora = {i: lora_of[i].factors[name] for i in active if i in lora_of and name in lora_of[i].factors}
        biases = {i: lora_of[i].biases[name] for i in active if i in lora_of and name in lora_of[i].biases}
        if lora or biases:
            bad = lora_problem(name, t, shape, scales, {**lora, **biases}, spec, checkpoints)
            if bad:
                problems.append(bad)
                continue
        pairs = {i: tuple(logical[r].get(name) for r in spec.diff_roles(i)) for i in active if i not in lora_of}
        for i in active:  # an adapter's whole tensor: its change is against the adapter's base
            if i in lora_of and i not in lora and i not in biases:
                pairs[i], bad = whole_pair(name, lora_of[i], spec.diff_roles(i), logical, shape, checkpoints)
                if bad:
                    problems.append(bad)
        if any(p is None for p in pairs.values()):
            continue
        absent = [r for i in pairs for r, st in zip(spec.diff_roles(i), pairs[i]) if st is None]
        if absent:
            if spec.on_missing == "carry_target":
                tasks[name] = TensorTask(name, dtype, shape, target_source, scales=scales)
                carried_missing.append(name)
                copied += 1
            else:
                for r in absent:
                    missing[r].append(name)  # reported below, once for all tensors
            continue
        stored = {"target": t, **{r: st for i in pairs for r, st in zip(spec.diff_roles(i), pairs[i])}}
        shapes = {r: st.codes.shape for r, st in stored.items()}  # type: ignore[union-attr]
        if (pairs and not any(i in lora_of for i in pairs) and len(shape) in (1, 2)
                and all(s[1:] == shape[1:] for s in shapes.values())
                and (len(set(shapes.values())) > 1
                     or (spec.vocab == "align" and vocab_rows.VOCAB_TENSOR.search(name)))
                and vocab_rows.is_vocab_tensor(name, {r: s[0] for r, s in shapes.items()}, configs)):
            if spec.diffs[0].stored:
                problems.append(f"tensor {name!r} has shape {describe_shapes(shapes, checkpoints)}: a resized "
                                f"vocabulary, which graft transfers from a fine-tune and its base, not from "
                                f"a stored diff; run the job with finetuned and base (and vocab: pad)")
            elif n_diffs == 1:
                f, b = pairs[0]
                resized[name] = (t, f, b, alphas[0], dtype, scales)  # type: ignore[assignment]
            else:
                problems.append(f"tensor {name!r} has shape {describe_shapes(shapes, checkpoints)}: a resized "
                                f"vocabulary, which graft transfers for one diff only; transfer the diffs "
                                f"one at a time, or carry the target's rows with a rule alpha: 0")
            continue
        if len(set(shapes.values())) > 1:
            problems.append(
                f"tensor {name!r} has shape {describe_shapes(shapes, checkpoints)}; the checkpoints are not "
                f"the same architecture (exclude it with a rule alpha: 0 to carry the target's)"
            )
            continue
        odd = [r for r, st in stored.items() if r != "target" and st.codes.dtype not in FLOATING_DTYPES]  # type: ignore[union-attr]
        for r in odd:
            problems.append(f"tensor {name!r} is {stored[r].codes.dtype} in {r} ({checkpoints[r].uri}) "  # type: ignore[union-attr]
                            f"but {t.codes.dtype} in target; cannot compute a float difference from it")
        terms = tuple(lora_term(checkpoints[canon[spec.diff_roles(i)[0]]], canon[spec.diff_roles(i)[0]], lora[i],
                                 alphas[i], i) if i in lora
                      else bias_term(checkpoints[canon[spec.diff_roles(i)[0]]], canon[spec.diff_roles(i)[0]],
                                     biases[i], alphas[i], i) if i in biases
                      else _term(checkpoints, canon, spec.diff_roles(i), pairs[i], alphas[i], i)  # type: ignore[arg-type]
                      for i in active)
        tasks[name] = TensorTask(name, dtype, shape, target_source, terms, scales)
        combined += 1

    pieces, vocab_report, vocab_problems, vocabs = resized_pieces(spec, checkpoints, resized, canon)
    problems.extend(vocab_problems)
    for name, parts in pieces.items():
        tasks[name] = parts[0]
        combined += 1
    target_rows = {n: t.codes.shape[0] for n, t in logical["target"].items() if t.codes.shape}
    vocab_size, disagree = output_vocab_rows(tasks, pieces, target_rows)
    problems.extend(disagree)

    activations = layouts["target"].activation_scales
    if activations and spec.output_format == "target":
        for name, ref in activations.items():
            tasks[name] = TensorTask(name, ref.dtype, ref.shape, source_of(tgt, "target", Stored(ref)))
            copied += 1
        warnings.append(f"{len(activations)} calibrated activation scale(s) of the target are carried "
                        f"unchanged ({examples(list(activations), 2)}): they were calibrated on the "
                        f"target, not on the output; recalibrate them if that matters, or write "
                        f"output_format: bf16")

    inputs = "finetuned/base" if n_diffs == 1 else "the diffs' checkpoints"
    if spec.on_missing == "error":
        for role, names in missing.items():
            names = [n for n in names if n not in tasks]
            if names:
                problems.append(
                    f"{len(names)} tensor(s) of the target are missing from {role} "
                    f"({checkpoints[role].uri}): {examples(names)}; set on_missing: carry_target to "
                    f"carry them from the target, or add a rule with alpha: 0"
                )
        if extra:
            problems.append(
                f"{len(extra)} tensor(s) of {inputs} are not in the target ({tgt.uri}): "
                f"{examples(extra)}; set on_missing: carry_target to leave them out"
            )
    else:
        if carried_missing:
            warnings.append(f"{len(carried_missing)} tensor(s) missing from {inputs} are "
                            f"carried from the target unchanged: {examples(carried_missing)}")
        if extra:
            warnings.append(f"{len(extra)} tensor(s) only in {inputs} are left out: "
                            f"{examples(extra)}")
    if problems:
        raise refusal(problems)

    dtypes: dict[str, set[str]] = {role: set() for role in roles}
    for t in tasks.values():
        if t.combine:
            dtypes["target"].add(t.target.dtype)
            for x in t.terms:  # a LoRA term's base is zeros, not the base's tensor
                for r, src in zip(spec.diff_roles(x.diff)[:1 if x.base.zero else 2], (x.finetuned, x.base)):
                    dtypes[r].add(src.dtype)
    stored_dtypes = {r: sorted(d) for r, d in dtypes.items() if d}
    if len({tuple(d) for d in stored_dtypes.values()}) > 1:
        warnings.append("input dtypes differ (" + ", ".join(f"{r} {'/'.join(d)}" for r, d in stored_dtypes.items())
                        + f"): computed in {spec.compute_dtype}, written in the target's dtypes")
    warnings.extend(config_warnings(spec, configs))

    config_patch = quant_patch(spec, layouts, configs) + weights_patch(spec, configs, tasks, vocab_size)
    side_files, side_warnings = donated_files(spec, checkpoints, config_patch, frozenset(adapters))  # sizes first
    stale = quant_side_file_problems(spec, layouts, side_files)
    if stale:
        raise PlanError(stale[0], stale)
    fits = tokenizer_fits(spec, checkpoints, tasks, pieces, vocabs)
    if fits:
        raise PlanError(fits[0], fits)
    settings = ExecSettings(spec.compute_dtype, spec.chunk_size, spec.allow_nonfinite, spec.read_concurrency,
                            REPORT_EVERY[spec.report], hash_roles=unvouched(checkpoints, canon, adapters))
    shards = shard_layout(spec, tgt, tasks, settings, pieces)
    warnings.extend(side_warnings)
    write_index = len(shards) > 1 or shards[0].file != SINGLE_NAME
    left_out = tuple(extra) + (tuple(activations) if spec.output_format == "bf16" else ())
    formats = tuple((role, adapters[role].describe() if role in adapters else layouts[role].describe())
                    for role in roles) + (("output", describe_output(tasks.values())),)
    return Plan(shards, side_files, write_index, tuple(warnings), combined, copied, left_out, formats,
                tuple(vocab_report))


def unvouched(checkpoints: Mapping[str, Checkpoint], canon: Mapping[str, str], roles: Iterable[str]) -> tuple[str, ...]:
    """The (canonical) names of ``roles`` whose bytes are hashed as they stream, so the manifest binds
    their content: all but those whose store vouches for each file's sha256 (the Hub: its LFS id is
    the file's version, which the manifest records)."""
    return tuple(sorted({canon[r] for r in roles
                         if not all((f.version or "").startswith("sha256:") for f in checkpoints[r].files)}))


def _term(checkpoints: Mapping[str, Checkpoint], canon: Mapping[str, str], roles: tuple[str, ...],
          stored: tuple[Stored, ...], alpha: float, diff: int) -> Term:
    """A diff's term of one tensor: its fine-tune and base, or a stored difference over a zero base."""
    f = source_of(checkpoints[roles[0]], canon[roles[0]], stored[0])
    if len(roles) == 1:
        return Term(f, zero_source("", f.dtype), alpha, diff)
    return Term(f, source_of(checkpoints[roles[1]], canon[roles[1]], stored[1]), alpha, diff)


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
    warnings.extend(family_warnings(spec, checkpoints, configs, list(canon)))
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
            problems.append(f"{len(names)} tensor(s) of the fine-tune are {what} ({where}): {examples(names)}; "
                            f"set on_missing: carry_target to leave them out of the diff")
        else:
            warnings.append(f"{len(names)} tensor(s) {what} are left out of the diff: {examples(names)}")
            left_out += names if what == "missing from base" else []
    if not tasks and not problems:
        problems.append(f"finetuned ({ft.uri}) has no floating tensor the base also has: nothing to diff")
    if problems:
        raise refusal(problems)
    # The diff holds its fine-tune's side files; its config.json no longer describes FP8 weights.
    config = configs.get(spec.donor_for("config.json") or "")
    patch = ((QUANT_KEY, None),) if isinstance(config, Mapping) and QUANT_KEY in config else ()
    side_files, side_warnings = donated_files(spec, checkpoints, patch)
    settings = ExecSettings("float32", spec.chunk_size, spec.allow_nonfinite, spec.read_concurrency,
                            report_every=1, hash_roles=unvouched(checkpoints, canon, canon))
    shards = shard_layout(spec, ft, tasks, settings)
    write_index = len(shards) > 1 or shards[0].file != SINGLE_NAME
    formats = tuple((role, layouts[role].describe()) for role in ("finetuned", "base")) + (
        ("output", f"plain ({dtype}): finetuned - base"),)
    return Plan(shards, side_files, write_index, tuple(warnings + side_warnings), len(tasks), 0, tuple(left_out),
                formats)


