"""A LoRA adapter's part of the plan: whether its change fits a target tensor, and the term that
applies it (``tasks.LowRank``: the two factors, read whole by the worker, over zero sources); a LoRA
bias (``lora_bias``) is B's bias times the scale, over a zero base (``Term.scale``); a whole tensor
of the adapter (``modules_to_save``, a trained bias) is a fine-tune's tensor against the adapter's
base, as in any diff.
"""
from __future__ import annotations

from typing import Any, Mapping

from ..formats.adapter import Adapter, LoraBias, LoraFactors
from ..formats.checkpoint import Checkpoint
from .quant import Stored
from .spec import JobSpec
from .tasks import LowRank, OutScales, Source, Term, zero_source

__all__ = ["lora_problem", "lora_term", "bias_term", "whole_pair"]


def lora_problem(name: str, t: Stored, shape: tuple[int, ...], scales: OutScales | None,
                 lora: Mapping[int, LoraFactors | LoraBias], spec: JobSpec,
                 checkpoints: Mapping[str, Checkpoint]) -> str | None:
    """Why an adapter's change (factors or a LoRA bias) cannot be applied to target tensor ``name``
    (None: it can)."""
    for i, f in lora.items():
        role = spec.diff_roles(i)[0]
        changes = tuple(f.shape if isinstance(f, LoraFactors) else f.ref.shape)
        if changes != tuple(shape):
            return (f"tensor {name!r} is {list(shape)} in target ({checkpoints['target'].uri}) but {role}'s LoRA "
                    f"({checkpoints[role].uri}) changes it as {list(changes)}: the adapter was trained on "
                    f"another shape (a resized vocabulary, another architecture); leave it out with a rule "
                    f"alpha: 0")
    if t.scales is not None or scales is not None:
        return (f"tensor {name!r} is stored {t.codes.dtype} with scales in the target; graft applies a LoRA "
                f"adapter to plain (bf16, fp16, fp32) weights only: give a plain target")
    return None


def lora_term(ckpt: Checkpoint, role: str, f: LoraFactors, alpha: float, diff: int) -> Term:
    """An adapter's term of one tensor: its factors (read whole by the worker), over zero sources."""
    def source(ref: Any) -> Source:
        return Source(role, ref.file, ref.dtype, ref.begin, ref.end, ckpt.version_of(ref.file))

    low = LowRank(source(f.a), source(f.b), tuple(f.a.shape), tuple(f.b.shape), f.scale, f.transpose)
    return Term(zero_source(role, f.a.dtype), zero_source("", f.a.dtype), alpha, diff, low)


def bias_term(ckpt: Checkpoint, role: str, b: LoraBias, alpha: float, diff: int) -> Term:
    """An adapter's LoRA bias as a term of its bias tensor: ``scale * b`` over a zero base."""
    ref = b.ref
    return Term(Source(role, ref.file, ref.dtype, ref.begin, ref.end, ckpt.version_of(ref.file)),
                zero_source("", ref.dtype), alpha, diff, scale=b.scale)


def whole_pair(name: str, adapter: Adapter, roles: tuple[str, ...], logical: Mapping[str, Mapping[str, Stored]],
               shape: tuple[int, ...], checkpoints: Mapping[str, Checkpoint]
               ) -> tuple[tuple[Stored, Stored] | None, str | None]:
    """The adapter's whole tensor ``name`` and its base's, as a fine-tune's pair; or why not."""
    ref = adapter.whole[name]
    where = f"{roles[0]} ({adapter.uri})"
    if len(roles) < 2:
        return None, (f"{where} holds a whole tensor for {name!r} (modules_to_save or a trained bias): it "
                      f"replaces the weight, and its change is against the base the adapter was trained on: "
                      f"add base: <that checkpoint> beside diff, or leave it out with a rule alpha: 0")
    base = logical[roles[1]].get(name)
    if base is None:
        return None, (f"{where} holds a whole tensor for {name!r} but base ({checkpoints[roles[1]].uri}) has no "
                      f"such tensor; check the base, or leave it out with a rule alpha: 0")
    if tuple(ref.shape) != tuple(shape) or tuple(base.codes.shape) != tuple(shape):
        return None, (f"tensor {name!r} is {list(shape)} in target, {list(ref.shape)} in {where} and "
                      f"{list(base.codes.shape)} in base: an adapter's whole tensor must have the target's "
                      f"shape (a resized vocabulary in an adapter is not supported: merge it with PEFT and "
                      f"give the merged checkpoint as finetuned)")
    return (Stored(ref), base), None
