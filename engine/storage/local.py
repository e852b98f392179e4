"""Local disk (plain paths and ``file://``): one attempt per call, ``preadv`` reads, atomic files.

The same ``Storage`` face and the same ``read``/``stat``/``list`` code as remote stores; only the
innermost primitives differ (``LocalRangeReader``, ``LocalAtomicWriter``), so the code path tested
on local files is the one users run everywhere.
"""
from __future__ import annotations

from typing import Any, ClassVar, Mapping

from . import local_cas
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

    def conditional_writes(self) -> bool:
        return local_cas.hard_links(self.root)

    def put_if(self, name: str, data: bytes, version: str | None) -> str | None:
        try:
            if version is None:
                return local_cas.create(self, name, data)
            return local_cas.replace(self, name, data, version)
        except OSError as e:
            raise self._write_failed(name, "create" if version is None else "replace", e) from e

    def read_versioned(self, name: str) -> tuple[bytes, str]:
        try:
            return local_cas.read(self, name)
        except OSError as e:
            raise self._fail(name, "read", e) from e
