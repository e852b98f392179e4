"""A file streamed to an object store as parts uploaded in parallel, published in one request.

S3's multipart upload (``s3write.py``) and Azure's block blobs (``azure.py``) share this shape: the
writer fills one part in place and hands it to a small pool when full, going on with the next; it
waits only when ``PARTS_IN_FLIGHT`` parts are already on the wire (bounded memory:
``PARTS_IN_FLIGHT`` + 1 parts per file being written). Nothing is visible at the name until
``commit()`` publishes every part at once (S3: complete the upload; Azure: commit the block list),
and ``discard()`` (or any failure) drops what was sent. A file that fits in one part is one request.

A store's writer implements the four hooks: ``_start`` (before the first part), ``_upload`` (one
part, on a pool thread), ``_publish`` (the parts' tokens, or the whole small file) and ``_abort``.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from .atomic import AtomicWriter

if TYPE_CHECKING:
    from .base import Storage

__all__ = ["PARTS_IN_FLIGHT", "part_size", "PartWriter"]

PARTS_IN_FLIGHT = 4
_MiB = 2**20


def part_size(expected: int, floor: int, max_parts: int, minimum: int) -> int:
    """Bytes per part for a file of ``expected`` bytes: at least ``floor`` (and the store's
    ``minimum``), and enough that it takes at most ``max_parts`` parts; whole MiB."""
    need = -(-max(expected, 0) // max_parts)
    size = max(floor, minimum, need)
    return -(-size // _MiB) * _MiB


class PartWriter(AtomicWriter):
    def __init__(self, storage: Storage, name: str, expected: int, part: int):
        super().__init__(storage, name)
        self._part = part
        # Filled in place (no regrowth copies); a full part goes to the wire as it is.
        self._buf = bytearray(min(self._part, max(expected, 0)))
        self._fill = 0
        self._started = False
        self._sent: list[Future[Any]] = []
        self._pool: ThreadPoolExecutor | None = None

    # -- the store's hooks ----------------------------------------------------------------------

    def _start(self) -> None:
        """Before the first part goes out (S3: create the multipart upload)."""

    def _upload(self, number: int, body: bytes | bytearray) -> Any:
        """Send part ``number`` (1-based); its token for ``_publish``. Runs on a pool thread."""
        raise NotImplementedError

    def _publish(self, parts: list[Any] | None, whole: bytes) -> None:
        """Make the file visible: from the parts' tokens, or (``parts`` None: no part was sent) as
        the single request ``whole``."""
        raise NotImplementedError

    def _abort(self) -> None:
        """Drop what was sent (best effort); no part is in flight any more."""

    # -- the writer -----------------------------------------------------------------------------

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        n = len(view)
        try:
            while view:
                if len(self._buf) < self._part and self._fill + len(view) > len(self._buf):
                    self._buf.extend(bytes(self._part - len(self._buf)))  # longer than planned
                take = min(len(view), self._part - self._fill)
                self._buf[self._fill:self._fill + take] = view[:take]
                self._fill += take
                view = view[take:]
                if self._fill == self._part:
                    self._send()
        except Exception as e:  # noqa: BLE001
            raise self.storage._write_failed(self.name, "write", e) from e
        self.bytes_written += n

    def _send(self) -> None:
        """Hand the filled part to the pool; wait first if too many are in flight."""
        if not self._started:
            self._start()
            self._started = True
            self._pool = ThreadPoolExecutor(max_workers=PARTS_IN_FLIGHT, thread_name_prefix="graft-part")
        while sum(not f.done() for f in self._sent) >= PARTS_IN_FLIGHT:
            next(f for f in self._sent if not f.done()).exception(timeout=None)
        for f in self._sent:
            if f.done() and f.exception() is not None:
                raise f.exception()  # type: ignore[misc]
        body = self._buf if self._fill == len(self._buf) else bytes(memoryview(self._buf)[:self._fill])
        self._buf, self._fill = bytearray(self._part), 0
        number = len(self._sent) + 1
        assert self._pool is not None
        self._sent.append(self._pool.submit(self._upload, number, body))

    def commit(self) -> None:
        def publish() -> None:
            if not self._started:  # the whole file fits in one part
                self._publish(None, bytes(memoryview(self._buf)[:self._fill]))
                return
            if self._fill:
                self._send()  # the last part may be smaller than the others
            self._publish([f.result() for f in self._sent], b"")

        self._publish_or_discard(publish)
        self._close_pool()

    def _close_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def discard(self) -> None:
        self._done = True
        self._buf, self._fill = bytearray(), 0
        self._close_pool()  # no part may still be on its way once the upload is dropped
        if self._started:
            try:
                self._abort()
            except Exception:  # noqa: BLE001 - best effort: the run's sweep removes leftovers too
                pass
            self._started = False
