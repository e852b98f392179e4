"""``FsspecStorage``: any fsspec filesystem no store claims (``memory://``, ...), and the reads and
writes the remote stores build on.

Range reads go through the store's own ``read`` in parallel parts (``FsspecRangeReader``: each part
retried and pinned like any read); a write is a temporary renamed onto its name on commit
(``RenameAtomicWriter``), so a store whose rename is not atomic overrides ``writer`` (S3, GCS,
Azure do).
"""
from __future__ import annotations

from .atomic import AtomicWriter
from .base import Storage
from .readers import FsspecRangeReader, RangeReader
from .writers import RenameAtomicWriter

__all__ = ["FsspecStorage"]


class FsspecStorage(Storage, fallback=True):
    def reader(self, name: str, concurrency: int = 1, version: str | None = None) -> RangeReader:
        return FsspecRangeReader(self, name, concurrency, version)

    def writer(self, name: str, size: int | None = None) -> AtomicWriter:
        return RenameAtomicWriter(self, name)
