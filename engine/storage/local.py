"""Local disk (plain paths and ``file://``): one attempt per call, ``preadv`` reads, atomic files.

The same ``Storage`` face and the same ``read``/``stat``/``list`` code as remote stores; only the
innermost primitives differ (``LocalRangeReader``, ``LocalAtomicWriter``), so the code path tested
on local files is the one users run everywhere.
"""
from __future__ import annotations

from typing import Any, ClassVar, Mapping

from .atomic import AtomicWriter
from .base import Storage
from .readers import LocalRangeReader, RangeReader
from .writers import LocalAtomicWriter

__all__ = ["LocalStorage"]


class LocalStorage(Storage):
    protocols = ("file", "local")
    is_local: ClassVar[bool] = True
    lists_stats: ClassVar[bool] = True
    _space: ClassVar[str] = "disk"

    def _attempts(self) -> int:
        return 1  # the OS retries for local files

    def _version(self, info: Mapping[str, Any]) -> Any:
        # Local files have no ETag; a rewrite changes the modification time.
        mtime = info.get("mtime")
        return super()._version(info) or (f"mtime:{mtime!r}" if mtime is not None else None)

    def reader(self, name: str, concurrency: int = 1, version: str | None = None) -> RangeReader:
        return LocalRangeReader(self, name)

    def writer(self, name: str, size: int | None = None) -> AtomicWriter:
        return LocalAtomicWriter(self, name)
