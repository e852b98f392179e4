"""``graft clean``: remove what a stopped run kept, without ever touching another run's files."""
from __future__ import annotations

from typing import Any, Callable

from ..errors import OutputError
from ..formats.manifest import MANIFEST_NAME
from ..storage import TEMP_MARK, Storage
from .runmark import RUN_MARK, RunAlive, RunMark, describe, has_mark, observe, wait_until_stale

__all__ = ["clean_output"]


def clean_output(uri: str, storage_options: dict[str, Any] | None = None,
                 log: Callable[[str], None] = lambda s: None) -> list[str]:
    """Remove what an unfinished run left at ``uri`` (``graft clean``): its kept shards, whatever its
    commit had begun to write, temporaries, unfinished uploads and, last, the run mark. Returns the
    names removed. Refuses a committed output (it has a manifest) and a run that is still going
    (its mark changes while watched). Takes the mark over first, like a run would, so a clean and
    a resuming run cannot both act. Only names the mark lists as the run's own, or temporaries,
    are touched: a file someone else put there stays."""
    storage = Storage(uri, storage_options)
    listing = storage.list()
    if MANIFEST_NAME in listing:
        raise OutputError(f"{storage.display_uri} holds a committed graft output ({MANIFEST_NAME}); graft clean "
                          f"removes only unfinished runs: delete it with your store's tools if you mean to")
    seen = observe(storage) if has_mark(listing) else None
    if seen is None:
        raise OutputError(f"{storage.display_uri}: no unfinished graft run here (no {RUN_MARK}); nothing to clean")
    try:
        seen = wait_until_stale(storage, seen, log)
    except RunAlive as e:
        raise OutputError(f"{storage.display_uri} is being written by a graft run that is still going "
                          f"({describe(e.seen.mark)}); stop it first (Ctrl-C keeps its shards), or wait "
                          f"for it") from None
    mark = seen.mark
    ours = {n for n in (mark.get("files") or []) if isinstance(n, str)}
    ours |= {n for n in (mark.get("shards") or {}) if isinstance(n, str)}
    cleaner = RunMark(storage, "graft clean", {}, files=sorted(ours))
    cleaner.acquire(seen)
    removed = []
    try:
        with cleaner.held():
            for name in storage.list():  # names from the listing, never the mark: it cannot point elsewhere
                if name != RUN_MARK and (name in ours or TEMP_MARK in name):
                    storage.remove(name)
                    removed.append(name)
        storage.abort_uploads(lambda n: n in ours or TEMP_MARK in n)
    except BaseException:
        try:
            cleaner.suspend()  # marked as stopped: the next graft clean (or run) takes over at once
        except Exception:  # noqa: BLE001 - the store failing again: the mark goes stale by itself
            cleaner.abandon()
        raise
    cleaner.release()
    return [*removed, RUN_MARK]
