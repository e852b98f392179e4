"""What the output holds around the arithmetic: its shard files, side files and config.json.

- ``shard_layout``: the tasks grouped into output shards, mirroring the target's files (a drop-in
  replacement) or packed to ``max_shard_size``; each shard's size is known from its header.
- ``side_files``: the non-weight files each donor gives the output (sizes capped before any data
  moves), and ``quant_patch`` / ``weights_patch``: the config.json keys that must describe the
  output's weights rather than the donor's (``quantization_config``; ``vocab_size`` and
  ``tie_word_embeddings``, top-level and in a multimodal model's text sub-config), whichever
  checkpoint donates it; ``apply_patch`` makes the change.
"""
from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from ..errors import PlanError
from ..formats.checkpoint import INDEX_NAME, SINGLE_NAME, Checkpoint, unsafe_name
from ..formats.manifest import MANIFEST_NAME, REPORT_NAME, SUMS_NAME
from ..formats.safetensors import build_header
from .quant import HF_QUANT_CONFIG, Layout
from .spec import JobSpec
from .tasks import ExecSettings, ShardTask, TensorTask
from .vocab import config_entries, output_ties

__all__ = ["SideFile", "RESERVED_OUTPUT_NAMES", "QUANT_KEY", "shard_layout", "donated_files",
           "check_side_file_size", "quant_patch", "quant_side_file_problems", "weights_patch", "apply_patch",
           "describe_output"]


RESERVED_OUTPUT_NAMES = frozenset({MANIFEST_NAME, SUMS_NAME, INDEX_NAME, REPORT_NAME})

# The key of config.json that says how the weights are stored; the output's must match its weights.
QUANT_KEY = "quantization_config"
_ABSENT = object()  # a config.json key the donated file does not have


@dataclass(frozen=True)
class SideFile:
    """A non-weight file copied from the ``donor`` checkpoint: verbatim, unless ``patch`` sets JSON
    keys (``(path, JSON text)``, the path dotted for a key of a sub-object, ``text_config.vocab_size``;
    None removes the key), e.g. config.json's ``quantization_config`` so that it describes the
    output's weights (``apply_patch``)."""

    name: str
    donor: str
    patch: tuple[tuple[str, str | None], ...] = ()


def describe_output(tasks: Any) -> str:
    quantized = [t for t in tasks if t.scales is not None]
    if not quantized:
        return f"plain ({', '.join(sorted({t.dtype for t in tasks}))})"
    kinds = sorted({f"{t.dtype} codes with {t.scales.dtype} scales" for t in quantized})
    return f"FP8 like the target ({'; '.join(kinds)}): {len(quantized)} quantized tensors"


def quant_patch(spec: JobSpec, layouts: Mapping[str, Layout],
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


def quant_side_file_problems(spec: JobSpec, layouts: Mapping[str, Layout],
                             side_files: tuple[SideFile, ...]) -> list[str]:
    """A donated hf_quant_config.json tells vLLM the weights are ModelOpt FP8: true only of an output
    in the format of a ModelOpt target that donates it (graft cannot rewrite that file)."""
    scheme = layouts["target"].scheme
    modelopt = scheme is not None and scheme.method == "modelopt" and spec.output_format == "target"
    return [f"{HF_QUANT_CONFIG} is donated by {s.donor}, but it declares NVIDIA ModelOpt weights and the "
            f"output's are {'plain' if spec.output_format == 'bf16' or scheme is None else 'another format'}"
            f"; leave it out (files: {{{HF_QUANT_CONFIG}: none}})"
            for s in side_files if s.name == HF_QUANT_CONFIG and not (modelopt and s.donor == "target")]


def weights_patch(spec: JobSpec, configs: Mapping[str, Mapping[str, Any] | None], names: Iterable[str],
                  vocab_rows: int | None) -> tuple[tuple[str, str | None], ...]:
    """The changes config.json needs so its ``vocab_size`` and ``tie_word_embeddings`` (top-level,
    and in a text sub-config) describe the output's tensors ``names``, whichever checkpoint donates it.

    ``vocab_size``: the output's rows where the vocabulary was resized (``vocab_rows``);
    ``tie_word_embeddings``: ``output_ties``; otherwise the target's value (the output has the
    target's tensors). A donated config that does not say is given the key where the target's
    says (a resized vocabulary: at the top level in any case), as its class default need not
    describe the output. Empty when the donated file already describes the output."""
    donor = spec.donor_for("config.json")
    config = configs.get(donor) if donor else None
    if not isinstance(config, Mapping):
        return ()
    target = configs.get("target")
    wanted = {"vocab_size": vocab_rows, "tie_word_embeddings": output_ties(names, target)}
    out = []
    for key, value in wanted.items():
        theirs = config_entries(target, key)
        have: dict[str, Any] = config_entries(config, key) or {
            p: _ABSENT for p in theirs if "." not in p or isinstance(config.get(p.split(".")[0]), Mapping)}
        if not have and key == "vocab_size" and value is not None:
            have = {key: _ABSENT}  # resized: no class default can describe both the target and the output
        for path, now in have.items():
            want = theirs.get(path, now) if value is None else value
            if want is not _ABSENT and now != want:
                out.append((path, json.dumps(want)))
    return tuple(out)


def apply_patch(obj: dict[str, Any], patch: tuple[tuple[str, str | None], ...]) -> dict[str, Any]:
    """``obj`` (a parsed JSON object) with the ``SideFile.patch`` changes made, in place; a dotted
    path's parents must be objects already (the plan patches only keys it found)."""
    for path, value in patch:
        *parents, key = path.split(".")
        at = obj
        for p in parents:
            at = at[p]
        if value is None:
            at.pop(key, None)
        else:
            at[key] = json.loads(value)
    return obj


def shard_layout(spec: JobSpec, tgt: Checkpoint, tasks: Mapping[str, TensorTask], settings: ExecSettings,
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


def donated_files(spec: JobSpec, checkpoints: Mapping[str, Checkpoint],
                  config_patch: tuple[tuple[str, str | None], ...] = (),
                  adapters: frozenset[str] = frozenset()) -> tuple[tuple[SideFile, ...], list[str]]:
    """The side files the output gets, each from its donor (``spec.files``). A file graft gives a
    fine-tune by default (the tokenizer) comes from an adapter (``adapters``: roles) if it has one,
    else from the target: an adapter saved without its tokenizer was trained with the base's."""
    out: list[SideFile] = []
    warnings: list[str] = []
    names = sorted({n for c in checkpoints.values() for n in c.side_files})
    for name in names:
        if name in RESERVED_OUTPUT_NAMES:
            continue
        donor = spec.donor_for(name)
        if donor is None:
            continue
        if donor in adapters and name not in checkpoints[donor].side_files and _default_donor(spec, name, donor):
            donor = "target"
        why = unsafe_name(name)
        if why is not None:  # a pattern (chat_template.*) can match any name a listing holds
            raise PlanError(f"{checkpoints[donor].uri}: file name {name!r} {why}; graft will not copy it "
                            f"into the output: rename it, or set files: {{<its name>: none}}")
        if name in checkpoints[donor].side_files:
            check_side_file_size(spec, checkpoints[donor], name)
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


def _default_donor(spec: JobSpec, name: str, donor: str) -> bool:
    """Whether ``donor`` gives ``name`` by graft's default, not by a ``files`` entry of the user's."""
    pattern = next((p for p, _ in spec.files if fnmatch.fnmatchcase(name, p)), None)
    return pattern is not None and spec.is_default_donor(pattern, donor)


def check_side_file_size(spec: JobSpec, donor: Checkpoint, name: str) -> None:
    """A side file is read whole into memory when the output is committed: one over the cap is
    refused now, before any data moves (a pattern such as ``*.bin`` can pick up gigabytes of weights)."""
    size = donor.side_file_size(name)
    cap = spec.max_side_file_size
    if size > cap:
        raise PlanError(f"{donor.storage.url(name)}: side file of {size} bytes ({size / 2**20:.1f} MiB), "
                        f"over the {cap}-byte cap (max_side_file_size); side files are copied whole "
                        f"through memory: leave it out (files: {{{name}: none}}) or raise "
                        f"max_side_file_size if it really belongs in the output")
