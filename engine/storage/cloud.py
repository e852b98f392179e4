"""Google Cloud Storage and Azure Blob (``gs://``, ``az://``, ``abfs://``): fsspec stores whose
buffered writers take ``autocommit=False``, so an object appears only on ``commit()`` and
``discard()`` drops it (``DeferredCommitWriter``). Their extras (``graft[gcs]``, ``graft[azure]``)
provide the filesystems; reads take the generic path of ``base.py``.
"""
from __future__ import annotations

from .atomic import AtomicWriter
from .base import Storage
from .writers import DeferredCommitWriter

__all__ = ["DeferredCommitStorage"]


class DeferredCommitStorage(Storage):
    protocols = ("gs", "gcs", "az", "abfs", "abfss")

    def writer(self, name: str, size: int | None = None) -> AtomicWriter:
        return DeferredCommitWriter(self, name)
