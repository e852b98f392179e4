"""A LoRA adapter's part of the plan: whether its change fits a target tensor, and the term that
applies it (``tasks.LowRank``: the two factors, read whole by the worker, over zero sources).
"""
from __future__ import annotations

from typing import Any, Mapping

from ..formats.adapter import LoraFactors
from ..formats.checkpoint import Checkpoint
from .quant import Stored
from .spec import JobSpec
from .tasks import LowRank, OutScales, Source, Term, zero_source

__all__ = ["lora_problem", "lora_term"]


def lora_problem(name: str, t: Stored, shape: tuple[int, ...], scales: OutScales | None,
                 lora: Mapping[int, LoraFactors], spec: JobSpec, checkpoints: Mapping[str, Checkpoint]) -> str | None:
    """Why an adapter's change cannot be applied to target tensor ``name`` (None: it can)."""
    for i, f in lora.items():
        role = spec.diff_roles(i)[0]
        if tuple(f.shape) != tuple(shape):
            return (f"tensor {name!r} is {list(shape)} in target ({checkpoints['target'].uri}) but {role}'s LoRA "
                    f"({checkpoints[role].uri}) changes it as {list(f.shape)}: the adapter was trained on "
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
