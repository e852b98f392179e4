"""The transfer report: what the run measured of every combined tensor while streaming it.

Each shard's ``ShardResult.report`` holds, per combined tensor, the ``kernel.STATS`` sums. ``build``
turns them into ``graft.report.json`` (written with the output, listed in SHA256SUMS and the
manifest): per tensor and per layer the norms ||ft - base|| (the fine-tune's change),
||target - base|| (how far the new base moved), their cosine, the share of elements the fine-tune
left unchanged and ||out - target|| (what the transfer changed, after rounding), plus the flags a
release engineer must see before shipping. ``summary`` is what ``graft report`` prints.

Sampled measures (the default on a CPU: every 32nd block of 256Ki elements of each tensor)
are estimates: sums of squares are scaled by elements / measured, ratios are the sample's. Whether
the fine-tune touched a tensor at all is checked on every element in every mode.
"""
from __future__ import annotations

import math
import re
from typing import Any, Iterable, Mapping

from .tasks import STATS

__all__ = ["REPORT_NAME", "REPORT_FORMAT", "LARGE_CHANGE", "ROUNDING_LOSS", "build", "summary", "layer_of"]

REPORT_NAME = "graft.report.json"
REPORT_FORMAT = "graft.report/1"
# ||out - target|| above this share of ||target||: the transfer changed the tensor by more than the
# tensor's own size (a fine-tune's change is usually a few percent of it).
LARGE_CHANGE = 1.0
# ||out - target|| below this share of |alpha| * ||ft - base||: rounding to the output's dtype erased
# most of the fine-tune's change (a change far below the target's precision).
ROUNDING_LOSS = 0.5
_LAYER = re.compile(r"\.(?:layers|layer|h|blocks|block)\.(\d+)\.")


def layer_of(name: str) -> int | None:
    """The transformer block a tensor belongs to (``model.layers.3.mlp...`` -> 3), or None."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def _num(x: float) -> float | None:
    """JSON has no NaN or Inf: they are written as null (and flagged)."""
    return x if math.isfinite(x) else None


def _measures(v: Mapping[str, float]) -> dict[str, Any]:
    """Norms and ratios from summed STATS (sums of squares scaled up to the whole tensor)."""
    measured = v["measured"]
    scale = v["elements"] / measured if measured else float("nan")
    delta, moved = v["delta_sq"], v["moved_sq"]
    both = math.sqrt(delta * moved) if delta > 0 and moved > 0 else 0.0
    return {
        "ft_delta_norm": _num(math.sqrt(delta * scale)) if measured else None,
        "base_move_norm": _num(math.sqrt(moved * scale)) if measured else None,
        "cosine": _num(v["dot"] / both) if both and math.isfinite(both) else None,
        "unchanged_fraction": _num(v["unchanged"] / measured) if measured else None,
        "out_delta_norm": _num(math.sqrt(v["out_delta_sq"] * scale)) if measured else None,
        "target_norm": _num(math.sqrt(v["target_sq"] * scale)) if measured else None,
    }


def _scaled(v: Mapping[str, float]) -> dict[str, float]:
    """A tensor's sums scaled up to all its elements (as if every element were measured)."""
    s = v["elements"] / v["measured"] if v["measured"] else 0.0
    out = {k: v[k] * s for k in STATS}
    out.update(elements=v["elements"], measured=v["elements"] if v["measured"] else 0.0, differs=v["differs"])
    return out


def _sum(vectors: Iterable[Mapping[str, float]]) -> dict[str, float]:
    total = dict.fromkeys(STATS, 0.0)
    for v in vectors:
        for k, x in _scaled(v).items():
            total[k] += x
    return total


def build(measured: Iterable[tuple[str, tuple[float, ...]]], alphas: Mapping[str, float],
          mode: str, compute_dtype: str) -> dict[str, Any]:
    """The report's JSON from ``(tensor, STATS)`` pairs (every shard's ``ShardResult.report``);
    ``alphas``: every combined tensor's alpha. A combined tensor without measures (a shard kept
    from a run with ``report: off``, or from an older graft) is listed as ``unmeasured``."""
    raw = {name: dict(zip(STATS, values)) for name, values in measured}
    tensors = []
    for name in sorted(raw, key=lambda n: (layer_of(n) is None, layer_of(n) or 0, n)):
        v = raw[name]
        tensors.append({"name": name, "layer": layer_of(name), "alpha": alphas.get(name),
                         "elements": int(v["elements"]), "measured": int(v["measured"]),
                         "touched": v["differs"] > 0, **_measures(v)})
    by_layer: dict[int, list[dict[str, float]]] = {}
    for name, v in raw.items():
        layer = layer_of(name)
        if layer is not None:
            by_layer.setdefault(layer, []).append(v)
    layers = [{"layer": i, "tensors": len(vs), **_measures(_sum(vs))} for i, vs in sorted(by_layer.items())]
    model = _measures(_sum(raw.values())) if raw else {}
    return {"format": REPORT_FORMAT, "mode": mode, "compute_dtype": compute_dtype,
            "sampling": ("every element" if mode == "exact" else
                         "on a CPU every 32nd block of 256Ki elements of each tensor (its first always), every "
                         "element on a GPU; norms are estimates scaled to the whole tensor"),
            "model": model, "layers": layers, "tensors": tensors,
            "flags": _flags(tensors, layers, model), "unmeasured": sorted(n for n in alphas if n not in raw)}


def _flags(tensors: list[dict[str, Any]], layers: list[dict[str, Any]], model: Mapping[str, Any]) -> list[dict[str, Any]]:
    flags: list[dict[str, Any]] = []

    def flag(kind: str, where: dict[str, Any], message: str) -> None:
        flags.append({"kind": kind, **where, "message": message})

    for t in tensors:
        name = t["name"]
        values = [t[k] for k in ("ft_delta_norm", "base_move_norm", "out_delta_norm", "target_norm")]
        if t["measured"] and any(x is None for x in values):
            flag("nonfinite", {"tensor": name}, f"{name}: NaN or Inf in its measures (non-finite inputs "
                 f"or values that overflow): check the inputs before shipping")
            continue
        if not t["touched"]:
            flag("untouched", {"tensor": name}, f"{name}: the fine-tune left it bit-identical to its base, "
                 f"so the output keeps the target's values (frozen during fine-tuning?)")
            continue
        out_delta, target, delta = t["out_delta_norm"], t["target_norm"], t["ft_delta_norm"]
        if target and out_delta is not None and out_delta > LARGE_CHANGE * target:
            flag("large_change", {"tensor": name}, f"{name}: the transfer changed it by "
                 f"{out_delta / target:.2f}x its own norm (||out - target|| {out_delta:.4g}, ||target|| "
                 f"{target:.4g}): an exploding difference or a wrong alpha")
        alpha = abs(t["alpha"] or 0.0)
        if delta and alpha and out_delta is not None and out_delta < ROUNDING_LOSS * alpha * delta:
            flag("lost_in_rounding", {"tensor": name}, f"{name}: rounding to the output's dtype kept "
                 f"{out_delta / (alpha * delta):.0%} of the fine-tune's change (||out - target|| "
                 f"{out_delta:.4g} vs |alpha| ||ft - base|| {alpha * delta:.4g})")
    for layer in layers:
        moved, delta = layer["base_move_norm"], layer["ft_delta_norm"]
        if moved is not None and delta is not None and moved > delta:
            flag("base_moved_more", {"layer": layer["layer"]}, f"layer {layer['layer']}: the new base moved "
                 f"{moved:.4g} from the old one, more than the fine-tune's change {delta:.4g}: the "
                 f"difference is applied far from where it was learned")
    moved, delta = model.get("base_move_norm"), model.get("ft_delta_norm")
    if moved is not None and delta is not None and moved > delta:
        flag("base_moved_more", {"model": True}, f"the whole model: the new base moved {moved:.4g}, more "
             f"than the fine-tune's change {delta:.4g}; evaluate the output before shipping")
    return flags


def summary(report: Mapping[str, Any], limit: int = 5) -> list[str]:
    """Lines for ``graft report``: the whole model, then each kind of flag with a few examples."""
    model = report.get("model") or {}
    tensors = report.get("tensors") or []

    def fmt(x: Any, spec: str = ".4g") -> str:
        return "n/a" if x is None else format(x, spec)

    lines = [f"{len(tensors)} combined tensors, {len(report.get('layers') or [])} layers; measured "
             f"{report.get('mode')} ({report.get('compute_dtype')})",
             f"  ||ft - base||      {fmt(model.get('ft_delta_norm'))}   (the fine-tune's change)",
             f"  ||target - base||  {fmt(model.get('base_move_norm'))}   (how far the new base moved)",
             f"  cosine             {fmt(model.get('cosine'), '.3f')}",
             f"  unchanged elements {fmt(model.get('unchanged_fraction'), '.2%')}",
             f"  ||out - target||   {fmt(model.get('out_delta_norm'))}   (what the transfer changed)"]
    flags = report.get("flags") or []
    if not flags:
        lines.append("no flags")
    kinds: dict[str, list[Mapping[str, Any]]] = {}
    for f in flags:
        kinds.setdefault(f["kind"], []).append(f)
    for kind, items in kinds.items():
        lines.append(f"{kind}: {len(items)}")
        lines.extend(f"  {f['message']}" for f in items[:limit])
        if len(items) > limit:
            lines.append(f"  ... and {len(items) - limit} more (all in {REPORT_NAME})")
    return lines
