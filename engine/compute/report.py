"""The transfer report: what the run measured of every combined tensor while streaming it.

Each shard's ``ShardResult.report`` holds, per combined tensor, the ``kernel.STATS`` sums. ``build``
turns them into ``graft.report.json`` (written with the output, listed in SHA256SUMS and the
manifest): per tensor and per layer the norms ||ft - base|| (the fine-tune's change),
||target - base|| (how far the new base moved), their cosine, the share of elements the fine-tune
left unchanged and ||out - target|| (what the transfer changed, after rounding), plus the flags a
release engineer must see before shipping. ``summary`` is what ``graft report`` prints.

Every sum is taken in a fixed order (``tasks.SUM_ROW``; tensors by name), so the same job on the
same inputs writes the same report whatever the executor, workers, threads, chunk size or resume.

Sampled measures (the default on a CPU: every 32nd block of 256Ki elements of each tensor)
are estimates: sums of squares are scaled by elements / measured, ratios are the sample's. Whether
the fine-tune touched a tensor at all is checked on every element in every mode.
"""
from __future__ import annotations

import math
import re
from typing import Any, Iterable, Mapping

from ..formats.manifest import REPORT_NAME
from ..plan.tasks import STATS, TERM_STATS, stat_names

__all__ = ["REPORT_NAME", "REPORT_FORMAT", "LARGE_CHANGE", "ROUNDING_LOSS", "build", "summary", "layer_of"]

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


def _measures(v: Mapping[str, float], stored: bool = False) -> dict[str, Any]:
    """Norms and ratios from summed STATS (sums of squares scaled up to the whole tensor). A
    ``stored`` diff (``graft diff``) has no base here: how far the new base moved is unknown."""
    if stored:
        return {**_measures(v), "base_move_norm": None, "cosine": None}
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


def _scaled(v: Mapping[str, float], keys: tuple[str, ...] = STATS) -> dict[str, float]:
    """A tensor's sums scaled up to all its elements (as if every element were measured)."""
    s = v["elements"] / v["measured"] if v["measured"] else 0.0
    out = {k: v.get(k, 0.0) * s for k in keys}
    out.update(elements=v["elements"], measured=v["elements"] if v["measured"] else 0.0, differs=v["differs"])
    return out


def _sum(vectors: Iterable[Mapping[str, float]], keys: tuple[str, ...] = STATS) -> dict[str, float]:
    total = dict.fromkeys(keys, 0.0)
    for v in vectors:
        for k, x in _scaled(v, keys).items():
            total[k] += x
    return total


def _sampling(mode: str) -> str:
    return ("every element" if mode == "exact" else
            "on a CPU every 32nd block of 256Ki elements of each tensor (its first always), every "
            "element on a GPU; norms are estimates scaled to the whole tensor")


def build(measured: Iterable[tuple[str, tuple[float, ...]]], terms: Mapping[str, tuple[tuple[int, float], ...]],
          mode: str, compute_dtype: str, diffs: int = 1, stored: frozenset[int] = frozenset()) -> dict[str, Any]:
    """The report's JSON from ``(tensor, measures)`` pairs (every shard's ``ShardResult.report``,
    laid out as ``tasks.stat_names``); ``terms``: every combined tensor's (diff index, alpha) per
    diff it takes, of the job's ``diffs``. A combined tensor without measures (a shard kept from a
    run with ``report: off``, or from an older graft) is listed as ``unmeasured``. ``stored``: the
    diffs read from a ``graft diff`` artifact (no base: no base_move_norm, cosine)."""
    # Sums over tensors in name order: the shards' results come in whatever order they finished.
    measured = sorted(measured)
    if diffs > 1:
        return _build_many(dict(measured), terms, mode, compute_dtype, diffs, stored)
    known = 0 in stored
    alphas = {name: ts[0][1] for name, ts in terms.items() if ts}
    raw = {name: dict(zip(STATS, values)) for name, values in measured}
    tensors = []
    for name in sorted(raw, key=lambda n: (layer_of(n) is None, layer_of(n) or 0, n)):
        v = raw[name]
        tensors.append({"name": name, "layer": layer_of(name), "alpha": alphas.get(name),
                         "elements": int(v["elements"]), "measured": int(v["measured"]),
                         "touched": v["differs"] > 0, **_measures(v, known)})
    by_layer: dict[int, list[dict[str, float]]] = {}
    for name, v in raw.items():
        layer = layer_of(name)
        if layer is not None:
            by_layer.setdefault(layer, []).append(v)
    layers = [{"layer": i, "tensors": len(vs), **_measures(_sum(vs), known)} for i, vs in sorted(by_layer.items())]
    model = _measures(_sum(raw.values()), known) if raw else {}
    return {"format": REPORT_FORMAT, "mode": mode, "compute_dtype": compute_dtype, "sampling": _sampling(mode),
            "model": model, "layers": layers, "tensors": tensors,
            "flags": _flags(tensors, layers, model), "unmeasured": sorted(n for n in alphas if n not in raw)}


# --- several diffs: the output's measures, then each diff's -------------------------------------

_COMMON = ("elements", "measured", "target_sq", "out_delta_sq", "change_sq")
_PER_DIFF = ("ft_delta_norm", "base_move_norm", "cosine", "unchanged_fraction")
_MANY = (*STATS, "change_sq")  # what a several-diff tensor's per-diff view sums


def _split(values: tuple[float, ...], terms: tuple[tuple[int, float], ...]) -> list[dict[str, float]]:
    """A tensor's measures of several diffs as one STATS-like dict per diff it takes (the common
    measures repeated in each, plus ``change_sq``)."""
    v = dict(zip(stat_names(len(terms)), values))
    common = {k: v.get(k, 0.0) for k in _COMMON}
    out = []
    for i in range(len(terms)):
        own = {k: v[k if i == 0 else f"{k}.{i}"] for k in TERM_STATS}
        out.append({**common, **own})
    return out


def _entry(per: list[tuple[int, float, Mapping[str, float]]], stored: frozenset[int]) -> dict[str, Any]:
    """The output's measures and each diff's, from (diff, alpha, STATS-like dict) per diff."""
    first = per[0][2]
    m = _measures(first)
    scale = first["elements"] / first["measured"] if first["measured"] else float("nan")
    return {"out_delta_norm": m["out_delta_norm"], "target_norm": m["target_norm"],
            "change_norm": _num(math.sqrt(first["change_sq"] * scale)) if first["measured"] else None,
            "diffs": [{"diff": i, **({"alpha": a} if a is not None else {}),
                       **{k: v for k, v in _measures(d, i in stored).items() if k in _PER_DIFF}} for i, a, d in per]}


def _build_many(raw: Mapping[str, tuple[float, ...]], terms: Mapping[str, tuple[tuple[int, float], ...]],
                mode: str, compute_dtype: str, diffs: int, stored: frozenset[int]) -> dict[str, Any]:
    split = {name: list(zip(terms[name], _split(values, terms[name]))) for name, values in raw.items()
             if name in terms}
    tensors = []
    for name in sorted(split, key=lambda n: (layer_of(n) is None, layer_of(n) or 0, n)):
        per = split[name]
        first = per[0][1]
        entry = _entry([(i, a, d) for (i, a), d in per], stored)
        for x, ((_, _), d) in zip(entry["diffs"], per):
            x["touched"] = d["differs"] > 0
        tensors.append({"name": name, "layer": layer_of(name), "elements": int(first["elements"]),
                        "measured": int(first["measured"]), "touched": any(d["differs"] > 0 for _, d in per),
                        **entry})

    def grouped(names: Iterable[str]) -> dict[str, Any]:
        names = list(names)
        per = []
        for i in range(diffs):
            having = [d for n in names for (j, _), d in split[n] if j == i]
            if having:
                per.append((i, None, _sum(having, _MANY)))
        out = _entry(per, stored) if per else {}
        # The output's own measures count every tensor once.
        common = _sum([split[n][0][1] for n in names], _MANY)
        m = _measures(common)
        out.update(out_delta_norm=m["out_delta_norm"], target_norm=m["target_norm"],
                   change_norm=_num(math.sqrt(common["change_sq"])))
        return out

    by_layer: dict[int, list[str]] = {}
    for name in split:
        layer = layer_of(name)
        if layer is not None:
            by_layer.setdefault(layer, []).append(name)
    layers = [{"layer": i, "tensors": len(ns), **grouped(ns)} for i, ns in sorted(by_layer.items())]
    model = grouped(split) if split else {}
    return {"format": REPORT_FORMAT, "mode": mode, "compute_dtype": compute_dtype, "sampling": _sampling(mode),
            "diffs": diffs, "model": model, "layers": layers, "tensors": tensors,
            "flags": _flags_many(tensors, layers, model),
            "unmeasured": sorted(n for n in terms if n not in raw)}


def _flags_many(tensors: list[dict[str, Any]], layers: list[dict[str, Any]],
                model: Mapping[str, Any]) -> list[dict[str, Any]]:
    flags: list[dict[str, Any]] = []

    def flag(kind: str, where: dict[str, Any], message: str) -> None:
        flags.append({"kind": kind, **where, "message": message})

    for t in tensors:
        name = t["name"]
        values = [t["out_delta_norm"], t["target_norm"], t["change_norm"],
                  *(d[k] for d in t["diffs"] for k in ("ft_delta_norm", "base_move_norm"))]
        if t["measured"] and any(x is None for x in values):
            flag("nonfinite", {"tensor": name}, f"{name}: NaN or Inf in its measures (non-finite inputs "
                 f"or values that overflow): check the inputs before shipping")
            continue
        for d in t["diffs"]:
            if not d["touched"]:
                flag("untouched", {"tensor": name, "diff": d["diff"]}, f"{name}: diff {d['diff']}'s fine-tune "
                     f"left it bit-identical to its base, so that diff adds nothing to it (frozen during "
                     f"fine-tuning?)")
        out_delta, target, change = t["out_delta_norm"], t["target_norm"], t["change_norm"]
        if target and out_delta is not None and out_delta > LARGE_CHANGE * target:
            flag("large_change", {"tensor": name}, f"{name}: the transfer changed it by "
                 f"{out_delta / target:.2f}x its own norm (||out - target|| {out_delta:.4g}, ||target|| "
                 f"{target:.4g}): an exploding difference or a wrong alpha")
        if change and out_delta is not None and out_delta < ROUNDING_LOSS * change and t["touched"]:
            flag("lost_in_rounding", {"tensor": name}, f"{name}: rounding to the output's dtype kept "
                 f"{out_delta / change:.0%} of the diffs' summed change (||out - target|| {out_delta:.4g} vs "
                 f"||sum alpha_i (ft_i - base_i)|| {change:.4g})")
    for scope, entries in (("layer", layers), ("model", [model] if model else [])):
        for e in entries:
            for d in e.get("diffs", []):
                moved, delta = d["base_move_norm"], d["ft_delta_norm"]
                if moved is None or delta is None or moved <= delta:
                    continue
                where = f"layer {e['layer']}" if scope == "layer" else "the whole model"
                flag("base_moved_more", {scope: e["layer"] if scope == "layer" else True, "diff": d["diff"]},
                     f"{where}: the new base moved {moved:.4g} from diff {d['diff']}'s base, more than its "
                     f"fine-tune's change {delta:.4g}: that difference is applied far from where it was learned")
    return flags


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
             f"{report.get('mode')} ({report.get('compute_dtype')})"]
    per_diff = model.get("diffs") if isinstance(model.get("diffs"), list) else [model]
    for d in per_diff:
        if "diff" in d:
            lines.append(f"  diff {d['diff']}:")
        lines += [f"  ||ft - base||      {fmt(d.get('ft_delta_norm'))}   (the fine-tune's change)",
                  f"  ||target - base||  {fmt(d.get('base_move_norm'))}   (how far the new base moved)",
                  f"  cosine             {fmt(d.get('cosine'), '.3f')}",
                  f"  unchanged elements {fmt(d.get('unchanged_fraction'), '.2%')}"]
    if "change_norm" in model:
        lines.append(f"  ||sum of the diffs|| {fmt(model.get('change_norm'))}   (the change to apply)")
    lines.append(f"  ||out - target||   {fmt(model.get('out_delta_norm'))}   (what the transfer changed)")
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
