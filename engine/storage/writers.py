"""The atomic writers of files and fsspec stores; each store's ``writer()`` picks one.

- ``LocalAtomicWriter``: a hidden temporary in the same directory, written past the page cache
  (``directio.py``) or with early writeback, then ``fsync`` + ``rename`` + directory ``fsync``.
- ``DeferredCommitWriter``: an fsspec file opened with ``autocommit=False``; ``commit()`` publishes
  the object, ``discard()`` drops it (object stores whose uploads finish atomically).
- ``RenameAtomicWriter``: a temporary next to the name, moved onto it (``memory://`` and any other
  store whose ``mv`` is atomic).

The S3 multipart writer is ``s3write.py``.
"""
from __future__ import annotations

import ctypes
import os
import sys
from typing import TYPE_CHECKING, Any, Callable

from .atomic import AtomicWriter, temp_name
from .directio import DirectAppender

if TYPE_CHECKING:  # a store picks its writer: it imports this module, not the reverse
    from .base import Storage

__all__ = ["LocalAtomicWriter", "DeferredCommitWriter", "RenameAtomicWriter"]

# Dirty bytes a local writer lets pile up before it asks the kernel to start writing them out.
_WRITEBACK_EVERY = 64 * 2**20


def _writeback_starter() -> Callable[[int, int, int], None] | None:
    """``start(fd, offset, nbytes)``: begin writing a file range to disk without waiting (Linux
    ``sync_file_range(SYNC_FILE_RANGE_WRITE)``); None where the call does not exist."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    call.restype = ctypes.c_int

    def start(fd: int, offset: int, nbytes: int) -> None:
        call(fd, offset, nbytes, 2)  # SYNC_FILE_RANGE_WRITE; a failure only loses the head start

    return start


_start_writeback = _writeback_starter() if sys.platform.startswith("linux") else None


# GRAFT_DIRECT_WRITES=0 turns direct writes off (every local write then goes through the page cache).
_DIRECT_WRITES = os.environ.get("GRAFT_DIRECT_WRITES", "1") != "0"


class LocalAtomicWriter(AtomicWriter):
    def __init__(self, storage: Storage, name: str):
        super().__init__(storage, name)
        self._tmp = storage.path(temp_name(name))
        try:
            self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as e:
            raise storage._fail(name, "create a temporary file", e) from e
        self._queued = 0  # bytes already handed to the kernel's writeback
        # Whole blocks go to the device past the page cache; buffered where O_DIRECT is refused.
        self._out = DirectAppender(self._fd) if _DIRECT_WRITES else None

    def _push_to_disk(self) -> None:
        # Buffered writes: start writing what has piled up now, so the disk works while the shard is
        # computed and the fsync at commit finds little left (else the page cache holds it until then).
        if _start_writeback is not None and self.bytes_written - self._queued >= _WRITEBACK_EVERY:
            _start_writeback(self._fd, self._queued, self.bytes_written - self._queued)
            self._queued = self.bytes_written

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        n = len(view)
        try:
            if self._out is not None:
                self._out.write(view)
            else:
                while view:
                    view = view[os.write(self._fd, view):]
        except OSError as e:
            raise self.storage._write_failed(self.name, "write", e) from e
        self.bytes_written += n
        if self._out is None or not self._out.direct:
            self._push_to_disk()

    def commit(self) -> None:
        def publish() -> None:
            if self._out is not None:
                self._out.finish()
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
            os.replace(self._tmp, self.storage.path(self.name))

        self._publish_or_discard(publish, OSError)
        # The rename is durable only once the directory entry is on disk.
        try:
            dfd = os.open(self.storage.root, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as e:
            raise self.storage._fail(self.name, "sync the directory after commit", e) from e

    def discard(self) -> None:
        self._done = True
        if self._out is not None:
            self._out.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        try:
            os.unlink(self._tmp)
        except FileNotFoundError:
            pass


class _FsspecWriterBase(AtomicWriter):
    def _open(self, make: Callable[[], Any]) -> Any:
        """``make()``, the file to write; a failure names the file."""
        try:
            return make()
        except Exception as e:  # noqa: BLE001
            raise self.storage._write_failed(self.name, "open for writing", e) from e

    def write(self, data: bytes | memoryview) -> None:
        # Not retried: after a failed write the store may hold part of the data, and only the
        # writer's owner can start the file over; the shard fails and is discarded.
        try:
            self._f.write(data)
        except Exception as e:  # noqa: BLE001
            raise self.storage._write_failed(self.name, "write", e) from e
        self.bytes_written += len(memoryview(data).cast("B"))

    def _publish(self) -> None:
        """Make the closed file visible at its final name."""
        raise NotImplementedError

    def commit(self) -> None:
        def publish() -> None:
            self._f.close()
            self._publish()

        self._publish_or_discard(publish)


class DeferredCommitWriter(_FsspecWriterBase):
    """An fsspec file opened with ``autocommit=False``: ``commit()`` closes and publishes it,
    ``discard()`` drops it. ``opener(path)`` makes the file (default: the filesystem's own
    ``_open``, not ``fs.open``, which would keep every such file alive in its transaction list)."""

    def __init__(self, storage: Storage, name: str, opener: Callable[[str], Any] | None = None):
        super().__init__(storage, name)
        path = storage.path(name)
        self._f = self._open(lambda: opener(path) if opener else storage.write_fs._open(path, "wb", autocommit=False))

    def _publish(self) -> None:
        self._f.commit()

    def discard(self) -> None:
        self._done = True
        try:
            self._f.discard()
        except Exception:  # noqa: BLE001 - best effort: the object was never completed
            pass
        finally:
            self._f.closed = True  # a discarded file must never be closed (and so flushed) later


class RenameAtomicWriter(_FsspecWriterBase):
    def __init__(self, storage: Storage, name: str):
        super().__init__(storage, name)
        self._tmp = storage.path(temp_name(name))
        self._f = self._open(lambda: storage.write_fs.open(self._tmp, "wb"))

    def _publish(self) -> None:
        self.storage.fs.mv(self._tmp, self.storage.path(self.name))

    def discard(self) -> None:
        self._done = True
        try:
            self._f.close()
        except Exception:  # noqa: BLE001
            pass
        try:
            self.storage.fs.rm_file(self._tmp)
        except Exception:  # noqa: BLE001 - best effort; leftovers carry TEMP_MARK and are swept
            pass
