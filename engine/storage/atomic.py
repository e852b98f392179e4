"""The contract every store's writer follows: bytes appear at their final name only on ``commit()``.

Each store's ``writer()`` picks the implementation (``writers.py``: local atomic file, deferred
fsspec commit, rename; ``s3write.py``: S3 multipart upload); they import this face, never a store.
"""
from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from .base import Storage

__all__ = ["AtomicWriter", "TEMP_MARK", "temp_name"]

# Temporary files carry this in their name so a later run can recognise and remove its leftovers.
TEMP_MARK = ".graft-tmp-"


def temp_name(name: str) -> str:
    """A hidden, unique name next to ``name`` for a file being written."""
    return f".{name}{TEMP_MARK}{uuid.uuid4().hex[:12]}"


class AtomicWriter:
    """Streams bytes to a file that appears at its final name only on ``commit()``.

    Order of calls: ``write(...)`` any number of times, then exactly one of ``commit()`` or
    ``discard()``. Used as a context manager it commits on a clean exit and discards on an exception.
    """

    def __init__(self, storage: Storage, name: str):
        self.storage = storage
        self.name = name
        self.bytes_written = 0
        self._done = False

    def write(self, data: bytes | memoryview) -> None:
        raise NotImplementedError

    def commit(self) -> None:
        raise NotImplementedError

    def discard(self) -> None:
        raise NotImplementedError

    def _publish_or_discard(self, publish: Callable[[], None], store_errors: type[BaseException] = Exception) -> None:
        """Run ``publish`` (the steps that make the file visible); on any failure, KeyboardInterrupt
        included, discard first (nothing may outlive a failed commit), and report a store's error
        (``store_errors``) as a write failure naming the file."""
        try:
            publish()
        except BaseException as e:
            self.discard()
            if isinstance(e, store_errors):
                raise self.storage._write_failed(self.name, "commit", e) from e
            raise
        self._done = True

    def __enter__(self) -> AtomicWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self._done:
            return
        if exc_type is None:
            self.commit()
        else:
            self.discard()
