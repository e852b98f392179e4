"""The run mark ``.graft-run.json``: the output's lock and journal while a run is going.

It names its owner (host, pid, a random token), carries a heartbeat refreshed every
``HEARTBEAT_SECONDS``, the fingerprint of the job, and the size and sha256 of every shard committed so
far. Another run refuses the output while the mark is live; a mark is stale (its run crashed) when
its heartbeat is older than ``STALE_AFTER_SECONDS``, or at once when its owner was a process on this
host that no longer exists. A stale mark of the same job lets the next run keep the shards it lists,
after checking their size and sha256. The mark is removed when the run commits or rolls back.

Order of calls: ``read_mark`` / ``is_stale`` (checking), then ``RunMark(...).acquire()``,
``record(...)`` per committed shard, and ``release()``.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any

from . import __version__
from .errors import NotFoundError, OutputError, StorageError
from .storage import Storage

__all__ = ["RUN_MARK", "HEARTBEAT_SECONDS", "STALE_AFTER_SECONDS", "read_mark", "is_stale", "describe",
           "RunMark"]

RUN_MARK = ".graft-run.json"
HEARTBEAT_SECONDS = 5.0
STALE_AFTER_SECONDS = 30.0
# Where the store cannot create a file exclusively (object stores), or a stale mark is replaced, two
# runs may both write one; the last write wins. Each re-reads its mark after this pause and the
# loser backs off.
_SETTLE_SECONDS = 0.3


def read_mark(storage: Storage) -> dict[str, Any] | None:
    """The mark's content, None if absent; a mark that is not valid JSON reads as a stale one. A
    store that fails to answer (after its retries) raises ``StorageError``: a live run's mark must
    never be taken for a missing one, or a heartbeat for a takeover."""
    try:
        data = json.loads(storage.read(RUN_MARK))
    except NotFoundError:
        return None
    except ValueError:
        return {"heartbeat": 0.0}
    return data if isinstance(data, dict) else {"heartbeat": 0.0}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale(mark: dict[str, Any], now: float | None = None) -> bool:
    """True if the run that wrote ``mark`` is gone."""
    if mark.get("interrupted") is True:
        return True  # stopped by Ctrl-C / SIGTERM: its shards wait for the next run
    now = time.time() if now is None else now
    heartbeat = mark.get("heartbeat")
    if not isinstance(heartbeat, (int, float)) or now - heartbeat > STALE_AFTER_SECONDS:
        return True
    pid = mark.get("pid")
    return mark.get("host") == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid)


def describe(mark: dict[str, Any]) -> str:
    age = time.time() - float(mark.get("heartbeat", 0.0))
    return f"host {mark.get('host')}, pid {mark.get('pid')}, last heartbeat {age:.0f}s ago"


class RunMark:
    """This run's mark: written on ``acquire``, rewritten on every ``record`` and heartbeat."""

    def __init__(self, storage: Storage, fingerprint: str, shards: dict[str, dict[str, Any]],
                 files: list[str] | None = None):
        self.storage = storage
        self.fingerprint = fingerprint
        self.shards = dict(shards)
        self.files = sorted(files or [])  # every name the run may write: what `graft clean` removes
        self.token = uuid.uuid4().hex
        self.lost = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.started = time.time()

    def _content(self, interrupted: bool = False) -> bytes:
        mark = {
            "graft_version": __version__,
            "token": self.token,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.fromtimestamp(self.started, timezone.utc).isoformat(timespec="seconds"),
            "heartbeat": time.time(),
            "fingerprint": self.fingerprint,
            "files": self.files,
            "shards": self.shards,
            **({"interrupted": True} if interrupted else {}),
        }
        return json.dumps(mark, indent=1).encode()

    def _write(self) -> None:
        self.storage.write_bytes(RUN_MARK, self._content())

    def _still_ours(self) -> bool:
        mark = read_mark(self.storage)
        return mark is not None and mark.get("token") == self.token

    def acquire(self, replacing: bool) -> None:
        """Write the mark (``replacing`` a stale one, or new), make sure no concurrent run got it
        instead, start the heartbeat."""
        with self._lock:
            created = None
            if not replacing:
                try:
                    created = self.storage.create_exclusive(RUN_MARK, self._content())
                except NotImplementedError:
                    pass
            if created is False:
                raise self._taken()
            if created is None:
                self._write()
        if created is None:
            time.sleep(_SETTLE_SECONDS)
            if not self._still_ours():
                raise self._taken()
        self._thread = threading.Thread(target=self._beat, name="graft-heartbeat", daemon=True)
        self._thread.start()

    def confirm(self) -> bool:
        """Re-read the mark: True while it is still this run's. Called before anything is committed
        or removed, so a run that was taken over (its heartbeat judged dead) never deletes or commits
        into an output that is no longer its own. Once lost, always lost; a failed read raises."""
        with self._lock:
            if not self.lost and not self._still_ours():
                self.lost = True
            return not self.lost

    def _taken(self) -> OutputError:
        try:
            mark = read_mark(self.storage) or {}
        except StorageError:
            mark = {}
        return OutputError(f"{self.storage.uri} is being written by another graft run "
                           f"({describe(mark)}); wait for it to finish")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            with self._lock:
                if self._stop.is_set():
                    return
                try:
                    if not self._still_ours():
                        self.lost = True
                        return
                    self._write()
                except Exception:  # noqa: BLE001 - the heartbeat must outlive any one failure
                    pass  # a missed heartbeat is harmless; the next one retries

    def record(self, file: str, size: int, sha256: str) -> None:
        """Journal a committed shard, so a resumed run can keep it."""
        with self._lock:
            if self.lost:
                raise OutputError(f"{self.storage.uri}: another graft run took over this output "
                                  f"(this run's heartbeat was considered dead); stop one of them")
            self.shards[file] = {"size": size, "sha256": sha256}
            self._write()

    def suspend(self) -> None:
        """Stop the heartbeat and leave the journal for the next run, marked as interrupted (so that
        run takes over at once instead of waiting for the heartbeat to go stale)."""
        self._stop.set()
        with self._lock:
            if not self.lost and self._still_ours():
                self.storage.write_bytes(RUN_MARK, self._content(interrupted=True))
        if self._thread is not None:
            self._thread.join(timeout=HEARTBEAT_SECONDS)

    def release(self, remove: bool = True) -> None:
        """Stop the heartbeat; remove the mark if it is still ours."""
        self._stop.set()
        with self._lock:
            if remove and not self.lost:
                self.storage.remove(RUN_MARK)
        if self._thread is not None:
            self._thread.join(timeout=HEARTBEAT_SECONDS)
