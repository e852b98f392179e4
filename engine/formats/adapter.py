"""A PEFT LoRA adapter as a diff: ``adapter_config.json`` + ``adapter_model.safetensors``.

An adapter trained on a base is a diff vector: for each weight it adapts, the change is
``Δ = s · B·A`` (``s = lora_alpha / r``, or ``lora_alpha / √r`` with ``use_rslora``), transposed
for fan-in-fan-out layers (GPT-2's ``Conv1D``) and for embeddings. ``read_adapter`` turns the
config and the safetensors header (nothing else is read) into one ``LoraFactors`` per adapted
weight, named as the weight is in the checkpoint the adapter was trained on:

- ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight``: A is ``r × in``, B ``out × r``,
  the change of ``<module>.weight`` (``out × in``; ``in × out`` with ``fan_in_fan_out``);
- ``base_model.model.<module>.lora_embedding_A`` / ``_B``: A is ``r × rows``, B ``cols × r``, the
  change of the embedding ``<module>.weight`` (``rows × cols``): ``(B·A)ᵀ``;
- ``<module>.base_layer.weight``: PEFT's copy of an unchanged base weight (saved with embedding
  LoRA): not a change, ignored;
- ``base_model.model.<module>.lora_B.bias`` (``lora_bias``): the change of ``<module>.bias`` is
  ``s · b``, as PEFT merges it (``Adapter.biases``);
- any other tensor is whole (``modules_to_save``, biases trained with ``bias: all`` or
  ``lora_only``): it replaces a weight, so its change is the tensor minus the base the adapter was
  trained on (``Adapter.whole``; the plan needs that base, or refuses).

The rank is the factors' (``A`` has ``r`` rows); ``lora_alpha`` is the config's, or the first
``alpha_pattern`` key, in file order, that matches the module's name as PEFT matches it (the key, a
regular expression, matches the whole name or a dot-aligned end of it); a ``rank_pattern`` that
disagrees with the factors is refused (PEFT itself could not load that adapter).

Refused by name, before any data moves (``PlanError``): every other ``peft_type`` (LoHa, LoKr, IA³,
VeRA, AdaLoRA, ...), and LoRA whose change is not ``s·B·A`` added to the weight: DoRA
(``use_dora``), replicated layers, aLoRA, Arrow, block-diagonal, KaSA and QALoRA variants, adapters
made by an initialisation that rewrote the base (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA), trainable
token rows and convolution LoRA.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..errors import CheckpointError, PlanError
from .checkpoint import Checkpoint, TensorRef

__all__ = ["ADAPTER_CONFIG", "LoraFactors", "LoraBias", "Adapter", "is_adapter", "read_adapter", "refuse_adapter_as_weights"]

ADAPTER_CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."
_FLOATING = {"F64", "F32", "F16", "BF16"}
_MAX_CONFIG_BYTES = 1 << 20
# Config keys whose (non-empty) value makes the change something other than s·B·A added to the
# weight, and why, in the words of the refusal.
_VARIANTS = (
    ("use_dora", "DoRA (use_dora): its change rescales each row of the weight it is merged into"),
    ("layer_replication", "replicated layers (layer_replication): PEFT cannot merge them either"),
    ("alora_invocation_tokens", "aLoRA (alora_invocation_tokens): its change applies only after its "
                                "invocation tokens, not to the weights"),
    ("arrow_config", "Arrow routing (arrow_config): it mixes several adapters per token"),
    ("use_bdlora", "block-diagonal LoRA (use_bdlora)"),
    ("kasa_config", "KaSA (kasa_config): it truncates the weight it is merged into"),
    ("use_qalora", "QALoRA (use_qalora)"),
    ("trainable_token_indices", "trainable token rows (trainable_token_indices): they replace rows"),
)
# Initialisations that rewrote the base weights when the adapter was made: the adapter is a change
# of that rewritten base, not of the checkpoint it names.
_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "lora-ga")


@dataclass(frozen=True)
class LoraFactors:
    """The change of ``weight``: ``scale · (B·A)``, or its transpose (``transpose``); ``a`` and ``b``
    are the factors' header entries in the adapter's file."""

    weight: str
    a: TensorRef
    b: TensorRef
    rank: int
    alpha: float
    scale: float
    transpose: bool

    @property
    def shape(self) -> tuple[int, int]:
        """The shape of the change (the weight's): ``out × in``, or ``in × out`` transposed."""
        rows, cols = self.b.shape[0], self.a.shape[1]
        return (cols, rows) if self.transpose else (rows, cols)


@dataclass(frozen=True)
class LoraBias:
    """The change of ``bias``: ``scale · b``, ``b`` being B's bias (``lora_bias``), with the scale of
    the module's factors."""

    bias: str
    ref: TensorRef
    scale: float


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter's changes, by the name of the weight each changes: ``factors`` (a LoRA), and
    ``whole`` tensors that replace a weight (their change is against the adapter's base)."""

    uri: str
    factors: dict[str, LoraFactors]
    config_sha256: str
    whole: dict[str, TensorRef] = field(default_factory=dict)
    use_rslora: bool = False
    base_model: str | None = None
    warnings: tuple[str, ...] = field(default=(), compare=False)
    biases: dict[str, LoraBias] = field(default_factory=dict)

    def touches(self, name: str) -> bool:
        return name in self.factors or name in self.whole or name in self.biases

    def describe(self) -> str:
        ranks = sorted({f.rank for f in self.factors.values()})
        rank = f"r={ranks[0]}" if len(ranks) == 1 else f"r={ranks[0]}..{ranks[-1]}"
        whole = f", and {len(self.whole)} whole tensor(s)" if self.whole else ""
        biases = f", {len(self.biases)} bias(es) by s·b" if self.biases else ""
        return (f"LoRA adapter ({rank}{', rsLoRA' if self.use_rslora else ''}; changes "
                f"{len(self.factors)} weight(s) by s·B·A{biases}{whole})")

    def record(self) -> dict[str, Any]:
        """What the manifest records of the adapter, beside its files and their versions."""
        return {"adapter": {"type": "LORA", "config": ADAPTER_CONFIG, "config_sha256": self.config_sha256,
                            "base_model_name_or_path": self.base_model, "use_rslora": self.use_rslora,
                            "whole": sorted(self.whole),
                            "biases": {name: {"scale": b.scale} for name, b in sorted(self.biases.items())},
                            "weights": {name: {"rank": f.rank, "alpha": f.alpha, "scale": f.scale,
                                               "transpose": f.transpose}
                                        for name, f in sorted(self.factors.items())}}}


def is_adapter(ckpt: Checkpoint) -> bool:
    return ADAPTER_CONFIG in ckpt.side_files


def refuse_adapter_as_weights(ckpt: Checkpoint, role: str) -> None:
    """``PlanError`` if ``ckpt``, given as ``role`` (weights: target, fine-tune or base), is a PEFT
    adapter: its tensors are factors of a change, not weights."""
    if is_adapter(ckpt):
        where = role.rpartition(".")[0]
        use = f"{where}.diff" if where else "diff"
        raise PlanError(f"{role} ({ckpt.uri}) is a PEFT adapter ({ADAPTER_CONFIG}), not a checkpoint of "
                        f"weights: give it as {use} instead (with base: the checkpoint it was trained on, "
                        f"if it holds whole tensors)")


def _config(ckpt: Checkpoint) -> tuple[dict[str, Any], str]:
    where = ckpt.storage.url(ADAPTER_CONFIG)
    size = ckpt.side_file_size(ADAPTER_CONFIG)
    if size > _MAX_CONFIG_BYTES:
        raise CheckpointError(f"{where}: {size} bytes, too big for an adapter config; it is not one")
    data = ckpt.storage.read(ADAPTER_CONFIG)
    try:
        config = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{where}: not valid JSON ({e.__class__.__name__}: {e}); re-save the "
                              f"adapter") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{where}: not a JSON object; re-save the adapter")
    return config, hashlib.sha256(data).hexdigest()


def _refusals(config: Mapping[str, Any], where: str) -> list[str]:
    kind = config.get("peft_type")
    if kind != "LORA":
        return [f"{where}: an adapter of peft_type {kind!r}; graft transfers LoRA adapters only (peft_type "
                f"'LORA'): merge this one into its base with PEFT and give the merged checkpoint as "
                f"finetuned, with that base"]
    out = [f"{where}: {why}; graft transfers plain LoRA, whose change s·B·A is added to the weight: "
           f"merge this adapter into its base with PEFT and give the merged checkpoint as finetuned"
           for key, why in _VARIANTS if config.get(key)]
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_REWRITING_INITS):
        out.append(f"{where}: init_lora_weights {init!r} rewrote the base weights when the adapter was made, "
                   f"so it is a change of that rewritten base: merge it with PEFT (or convert it with "
                   f"path_initial_model_for_weight_conversion) and give the result as finetuned")
    return out


def _pattern_value(patterns: Any, module: str, default: float, what: str, warnings: list[str]) -> float:
    """The value of the first key of ``patterns`` (file order) matching ``module`` as PEFT matches."""
    if not isinstance(patterns, Mapping):
        return default
    hits = [(key, value) for key, value in patterns.items()
            if isinstance(key, str) and re.fullmatch(rf"(?:.*\.)?(?:{key})", module)]
    if not hits:
        return default
    if len({v for _, v in hits}) > 1:
        warnings.append(f"{what} keys {', '.join(repr(k) for k, _ in hits)} all match {module}; graft "
                        f"uses the first ({hits[0][0]!r}), as PEFT reads the saved config")
    return float(hits[0][1])


def read_adapter(ckpt: Checkpoint, role: str) -> Adapter:
    """The adapter at ``ckpt`` (``is_adapter``), given as ``role``: its factors by weight name.
    ``PlanError`` for an adapter graft does not transfer (every reason at once); ``CheckpointError``
    for one that is malformed."""
    where = f"{role} ({ckpt.uri})"
    config, digest = _config(ckpt)
    problems = _refusals(config, where)
    if problems:
        raise PlanError(problems[0], problems)
    modules: dict[str, dict[str, TensorRef]] = {}
    whole: dict[str, TensorRef] = {}
    for name, ref in ckpt.tensors.items():
        m = re.fullmatch(r"base_model\.model\.(.+)\.(lora_A\.weight|lora_B\.weight|lora_B\.bias|"
                         r"lora_embedding_A|lora_embedding_B)", name)
        if m:
            part = "lora_B.bias" if m.group(2) == "lora_B.bias" else m.group(2).split(".")[0]
            modules.setdefault(m.group(1), {})[part] = ref
        elif name.endswith(".base_layer.weight"):  # PEFT's copy of an unchanged base weight
            continue
        elif name.startswith(_PREFIX) and ref.dtype in _FLOATING:
            whole[name.removeprefix(_PREFIX).replace(".base_layer.", ".")] = ref
        else:
            raise CheckpointError(f"{where}: tensor {name!r} is neither a LoRA factor nor a weight of the model "
                                  f"(base_model.model.<name>, floating point); re-save the adapter")
    if not modules and not whole:
        raise CheckpointError(f"{where}: {ADAPTER_CONFIG} but no tensor in its safetensors (LoRA factors "
                              f"base_model.model.*.lora_A.weight and lora_B.weight); re-save the adapter")
    warnings: list[str] = []
    alpha_default = config.get("lora_alpha", 8)
    r_default = config.get("r", 8)
    rslora = bool(config.get("use_rslora"))
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    factors: dict[str, LoraFactors] = {}
    biases: dict[str, LoraBias] = {}
    for module, parts in modules.items():
        embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        a = parts.get("lora_embedding_A" if embedding else "lora_A")
        b = parts.get("lora_embedding_B" if embedding else "lora_B")
        bias = None if embedding else parts.get("lora_B.bias")
        if a is None or b is None or len(parts) != 2 + (bias is not None):
            raise CheckpointError(f"{where}: {module} has {', '.join(sorted(parts))} but a LoRA needs its A and "
                                  f"B factors, one each; re-save the adapter")
        if len(a.shape) != 2 or len(b.shape) != 2:
            raise PlanError(f"{where}: {module} is a convolution LoRA (factors of shape {list(a.shape)} and "
                            f"{list(b.shape)}); graft transfers LoRA of linear and embedding layers only")
        if a.dtype not in _FLOATING or b.dtype not in _FLOATING:
            raise CheckpointError(f"{where}: {module}'s factors are {a.dtype} and {b.dtype}, not floating point")
        rank = a.shape[0]
        if b.shape[1] != rank or rank == 0:
            raise CheckpointError(f"{where}: {module}: A is {list(a.shape)} and B {list(b.shape)}: B must have "
                                  f"as many columns as A has rows (the rank); re-save the adapter")
        said = _pattern_value(config.get("rank_pattern"), module, float(r_default), "rank_pattern", warnings)
        if said != rank:
            raise CheckpointError(f"{where}: {module}'s factors have rank {rank} but its config says r={said:g}; "
                                  f"PEFT could not load this adapter either (were its rank_pattern keys "
                                  f"reordered?): fix r / rank_pattern in {ADAPTER_CONFIG}")
        alpha = _pattern_value(config.get("alpha_pattern"), module, float(alpha_default), "alpha_pattern",
                               warnings)
        scale = alpha / math.sqrt(rank) if rslora else alpha / rank
        factors[f"{module}.weight"] = LoraFactors(f"{module}.weight", a, b, rank, alpha, scale,
                                                  transpose=embedding or fan_in_fan_out)
        if bias is not None:
            if len(bias.shape) != 1 or bias.shape[0] != b.shape[0] or bias.dtype not in _FLOATING:
                raise CheckpointError(f"{where}: {module}'s lora_B.bias is {bias.dtype} {list(bias.shape)}; B is "
                                      f"{list(b.shape)}: the bias must be floating point, one per row of B; "
                                      f"re-save the adapter")
            if f"{module}.bias" in whole:
                raise PlanError(f"{where}: holds both a trained {module}.bias (bias: all or lora_only) and a LoRA "
                                f"bias for it (lora_bias); graft applies one change per tensor per adapter: "
                                f"merge this adapter into its base with PEFT and give the merged checkpoint as "
                                f"finetuned")
            biases[f"{module}.bias"] = LoraBias(f"{module}.bias", bias, scale)
    base = config.get("base_model_name_or_path")
    return Adapter(ckpt.uri, factors, digest, whole, rslora, base if isinstance(base, str) else None, tuple(warnings),
                   biases)
