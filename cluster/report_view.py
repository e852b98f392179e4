"""``graft report OUTPUT``: read a committed output's transfer report, print it, draw it.

The report itself is made by the engine while the job streams (``graft.engine.compute.report``); this module
only reads ``graft.report.json`` back from any store and draws the per-layer picture with
matplotlib (imported only here, only when a picture is asked for).
"""
from __future__ import annotations

import json
from typing import Any, Mapping

from graft.engine.errors import OutputError
from graft.engine.formats.manifest import MANIFEST_NAME
from graft.engine.compute.report import REPORT_NAME
from graft.engine.storage import Storage

__all__ = ["load_report", "plot_report"]


def load_report(uri: str, storage_options: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """The report of the committed output at ``uri``; ``OutputError`` saying why there is none."""
    storage = Storage(uri, storage_options)
    listing = set(storage.list())
    if MANIFEST_NAME not in listing:
        raise OutputError(f"{storage.display_uri}: no committed graft output here ({MANIFEST_NAME} missing)")
    if REPORT_NAME not in listing:
        raise OutputError(f"{storage.display_uri}: this output has no {REPORT_NAME} (written with report: off, "
                          f"or by a graft older than the transfer report); run the job again to get one")
    try:
        report = json.loads(storage.read(REPORT_NAME))
    except ValueError as e:
        raise OutputError(f"{storage.url(REPORT_NAME)}: not valid JSON ({e}); check it with graft verify") from None
    if not isinstance(report, dict):
        raise OutputError(f"{storage.url(REPORT_NAME)}: not a transfer report; check it with graft verify")
    return report


def plot_report(report: Mapping[str, Any], path: str, title: str = "") -> None:
    """A PNG at ``path``: per layer, the three norms (log scale) and the cosine between the
    fine-tune's change and the base's move."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    layers = report.get("layers") or []
    xs = [entry["layer"] for entry in layers]

    def series(key: str, diff: int | None = None) -> list[float]:
        out = []
        for entry in layers:
            if diff is not None:  # several diffs: that diff's entry in the layer, if it has one
                entry = next((d for d in entry.get("diffs") or [] if d.get("diff") == diff), {})
            out.append(float("nan") if entry.get(key) is None else entry[key])
        return out

    # One diff: its measures at the top level of each layer; several: a "diffs" list per layer.
    diffs: list[int | None] = list(range(report["diffs"])) if report.get("diffs", 1) > 1 else [None]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 2]})
    for diff in diffs:
        tag = "" if diff is None else f"diff {diff}: "
        for key, label in (("ft_delta_norm", "||ft - base||  (the fine-tune's change)"),
                           ("base_move_norm", "||target - base||  (how far the new base moved)")):
            top.plot(xs, series(key, diff), marker="o", markersize=3, label=tag + label)
        bottom.plot(xs, series("cosine", diff), marker="o", markersize=3, label=tag.rstrip(": ") or None,
                    color="tab:purple" if diff is None else None)
    top.plot(xs, series("out_delta_norm"), marker="o", markersize=3,
             label="||out - target||  (what the transfer changed)")
    top.set_yscale("log")
    top.set_ylabel("L2 norm per layer")
    top.legend(fontsize=8)
    top.grid(True, alpha=0.3)
    if diffs != [None]:
        bottom.legend(fontsize=8)
    bottom.axhline(0.0, color="grey", linewidth=0.8)
    bottom.set_ylabel("cosine(ft - base, target - base)")
    bottom.set_xlabel("layer")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.grid(True, alpha=0.3)
    flagged = sorted({f["layer"] for f in report.get("flags") or [] if "layer" in f})
    for layer in flagged:
        top.axvline(layer, color="tab:red", alpha=0.15, linewidth=4)
    heading = title or f"graft transfer report ({report.get('mode')})"
    if flagged:
        heading += "; shaded: layers flagged base_moved_more"
    fig.suptitle(heading, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
