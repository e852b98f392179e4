"""One byte store for every location: local paths, file://, memory://, s3://, hf://, gs://, ...

A package of small rooms, each arrow pointing down:

    base.py       Storage: the face every caller uses (list, stat, read, reader, writer), its
                  retry loop and the hooks a store overrides; FileStat, check_digest. It builds
                  no reader or writer: each store below chooses its own
    local.py      LocalStorage: plain paths and file://
    generic.py    FsspecStorage: any other fsspec protocol (memory://, ...); the parallel range
                  reads and rename-on-commit writes the remote stores build on
    s3.py         S3Storage: one retry layer, If-Match reads, multipart writes
    s3write.py    the S3 multipart writer and the cleanup of unfinished uploads
    gcs.py        GCSStorage: gs:// (generation-pinned reads, resumable uploads finalised on commit)
    azure.py      AzureStorage: az:// (If-Match reads, block blobs committed on commit)
    hub.py        HubStorage: hf:// (revision pinning, tree digests), and the Hub client helpers
    parts.py      a file uploaded as parallel parts and published in one request (S3, Azure)
    readers.py    RangeReader and its local (preadv) and fsspec (parallel parts) forms
    writers.py    the local atomic, deferred-commit and rename writers
    directio.py   O_DIRECT appends for the local writer
    atomic.py     AtomicWriter, the writer contract; TEMP_MARK
    retry.py      which failures are transient, the backoff, the one-line failure account
    cas.py        compare-and-swap writes of one small file (local_cas.py: on local disk)

``Storage(uri, options)`` returns the store registered for the URI's protocol; importing this
package registers them all.

May import: ``engine.errors``, ``engine.redaction`` (and fsspec and each store's client); nothing
else of graft: every other package of the engine sits above it.
"""
from __future__ import annotations

from .atomic import TEMP_MARK, AtomicWriter
from .azure import AzureStorage
from .base import FileStat, Storage, check_digest
from .gcs import GCSStorage
from .generic import FsspecStorage
from .hub import HubStorage
from .local import LocalStorage
from .readers import RangeReader
from .retry import is_transient
from .s3 import S3Storage

__all__ = ["FileStat", "Storage", "RangeReader", "AtomicWriter", "TEMP_MARK", "check_digest",
           "is_transient", "LocalStorage", "FsspecStorage", "S3Storage", "HubStorage", "GCSStorage", "AzureStorage"]
