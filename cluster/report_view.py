"""``graft report OUTPUT``: read a committed output's transfer report, print it, draw it.

The report itself is made by the engine while the job streams (``graft.engine.report``); this module
only reads ``graft.report.json`` back from any store and draws the per-layer picture with
matplotlib (imported only here, only when a picture is asked for).
"""
from __future__ import annotations

import json
from typing import Any, Mapping

from graft.engine.errors import OutputError
from graft.engine.manifest import MANIFEST_NAME
from graft.engine.report import REPORT_NAME
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

    def series(key: str) -> list[float]:
        return [float("nan") if entry.get(key) is None else entry[key] for entry in layers]

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 2]})
    for key, label in (("ft_delta_norm", "||ft - base||  (the fine-tune's change)"),
                       ("base_move_norm", "||target - base||  (how far the new base moved)"),
                       ("out_delta_norm", "||out - target||  (what the transfer changed)")):
        top.plot(xs, series(key), marker="o", markersize=3, label=label)
    top.set_yscale("log")
    top.set_ylabel("L2 norm per layer")
    top.legend(fontsize=8)
    top.grid(True, alpha=0.3)
    bottom.plot(xs, series("cosine"), marker="o", markersize=3, color="tab:purple")
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
