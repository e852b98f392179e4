"""Range readers: a file's byte ranges streamed into caller-owned buffers.

``LocalRangeReader`` reads local files with ``preadv`` straight into the buffer;
``FsspecRangeReader`` splits a range into parts fetched at once through the store's ``read`` (so
every part gets the store's retries, version pinning and short-read checks).
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TYPE_CHECKING

from ..errors import IntegrityError

if TYPE_CHECKING:  # a store picks its reader: it imports this module, not the reverse
    from .base import Storage

__all__ = ["RangeReader", "LocalRangeReader", "FsspecRangeReader"]


class RangeReader:
    """Reads byte ranges of one file into caller-owned buffers.

    Contract: ``read_into(offset, buf)`` fills all of ``buf`` from ``offset`` or raises
    ``IntegrityError`` (file too short) / ``StorageError``. ``bytes_read`` counts what was read.
    Safe to call from several threads at once.
    """

    def __init__(self, storage: Storage, name: str):
        self.storage = storage
        self.name = name
        self.bytes_read = 0

    def read_into(self, offset: int, buf: memoryview) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> RangeReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalRangeReader(RangeReader):
    def __init__(self, storage: Storage, name: str):
        super().__init__(storage, name)
        try:
            self._fd = os.open(storage.path(name), os.O_RDONLY)
        except OSError as e:
            raise storage._fail(name, "open for reading", e) from e

    def read_into(self, offset: int, buf: memoryview) -> None:
        got, want = 0, len(buf)
        while got < want:
            # preadv reads straight into the tensor buffer (no bytes object) and needs no seek lock.
            try:
                n = os.preadv(self._fd, [buf[got:]], offset + got)
            except OSError as e:
                raise self.storage._fail(self.name, f"read at byte {offset + got}", e) from e
            if n == 0:
                raise IntegrityError(
                    f"{self.storage.url(self.name)}: ends before byte {offset + want}; "
                    f"the file is truncated or changed during the run"
                )
            got += n
        self.bytes_read += want

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class FsspecRangeReader(RangeReader):
    def __init__(self, storage: Storage, name: str, concurrency: int = 1, version: str | None = None):
        super().__init__(storage, name)
        self.min_part = storage.min_read_part
        self.concurrency = max(1, concurrency)
        self.version = version
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def _fetch(self, offset: int, buf: memoryview) -> None:
        buf[:] = self.storage.read(self.name, offset, offset + len(buf), version=self.version)

    def read_into(self, offset: int, buf: memoryview) -> None:
        n = len(buf)
        parts = max(1, min(self.concurrency, n // self.min_part))
        if parts == 1:
            self._fetch(offset, buf)
        else:
            step = -(-n // parts)
            with self._lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self.concurrency - 1,
                                                    thread_name_prefix="graft-range")
            # The calling thread fetches the first part itself; the others run alongside it.
            rest = [self._pool.submit(self._fetch, offset + a, buf[a:a + step])
                    for a in range(step, n, step)]
            try:
                self._fetch(offset, buf[:step])
            finally:
                # Every part must be finished with ``buf`` before the caller reuses it.
                wait(rest)
            for fut in rest:
                fut.result()
        with self._lock:
            self.bytes_read += n

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
