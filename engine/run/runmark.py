"""The run mark ``.graft-run.json``: the output's lock and journal while a run is going.

It names its owner (a random token, with host and pid for people), counts heartbeats (rewritten
every ``HEARTBEAT_SECONDS``), and carries the fingerprint of the job and the size, sha256 and store
version of every shard committed so far.

**A lock.** On a store with compare-and-swap writes (local disk, S3; ``graft.engine.cas``) the mark
is created only if absent, and every later write (heartbeat, journal, takeover) replaces it only if
it is still the version this run last wrote or judged stale: of two runs, exactly one wins, and a
run whose mark was taken over finds out on its next write instead of overwriting the new owner.
Elsewhere the writes are plain (the last writer wins) and each run re-reads its mark after a pause.

**Staleness without trusting clocks.** A mark is stale (its run is gone) when the reader, on its own
monotonic clock, watched it not change for ``STALE_AFTER_SECONDS`` (a live run rewrites it every
``HEARTBEAT_SECONDS``); at once when its run was interrupted (Ctrl-C, SIGTERM, a failure: it says so
in the mark), or when its pid is gone *and* it ran in this process space (same kernel boot and
same PID namespace; a host name alone is not enough: containers share them). The writer's wall
clock is never compared with the reader's.

Order of calls: ``observe`` then ``wait_until_stale`` (checking), then ``RunMark(...).acquire(...)``,
``record(...)`` per committed shard, and ``suspend()`` or ``release()``.
"""
from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Iterator

from .. import __version__
from ..errors import NotFoundError, OutputError, StorageError
from ..formats.manifest import RUN_MARK
from ..plan.tasks import DIFF_STATS, STATS, TERM_STATS, ShardResult
from ..storage import Storage, cas

__all__ = ["RUN_MARK", "has_mark", "journal_form", "kept_result", "HEARTBEAT_SECONDS", "STALE_AFTER_SECONDS", "Observed", "observe", "read_mark",
           "stale_at_once", "RunAlive", "wait_until_stale", "describe", "RunMark"]

HEARTBEAT_SECONDS = 5.0
STALE_AFTER_SECONDS = 30.0
# Where the store has no compare-and-swap writes, two runs taking over one stale mark may both
# write one; the last write wins. Each re-reads its mark after this pause and the loser backs off.
_SETTLE_SECONDS = 0.3


@dataclass(frozen=True)
class Observed:
    """A mark as read: its parsed content (``{}`` when not valid JSON), raw bytes and store version
    (None where the store has no compare-and-swap writes)."""

    mark: dict[str, Any]
    raw: bytes
    version: str | None


def _parse(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def observe(storage: Storage) -> Observed | None:
    """The mark now, None if absent. A store that fails to answer (after its retries) raises
    ``StorageError``: a live run's mark must never be taken for a missing one."""
    try:
        if cas.supported(storage):
            raw, version = cas.read(storage, RUN_MARK)
        else:
            raw, version = storage.read(RUN_MARK), None
    except NotFoundError:
        return None
    return Observed(_parse(raw), raw, version)


def read_mark(storage: Storage) -> dict[str, Any] | None:
    """The mark's content (``{}`` when it is not valid JSON), None if absent."""
    seen = observe(storage)
    return None if seen is None else seen.mark


def _process_space() -> str | None:
    """This kernel boot and PID namespace: two processes can judge each other's pids only when both
    run in the same one (a host name is shared by containers with their own pid numbering)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return None


_PROCESS_SPACE = _process_space()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_at_once(mark: dict[str, Any]) -> bool:
    """True when the mark says by itself that its run is over: it was interrupted, or its process
    ran in this process space and is gone. Otherwise only watching it tells (``wait_until_stale``)."""
    if mark.get("interrupted") is True:
        return True  # stopped by Ctrl-C / SIGTERM / a failure: its shards wait for the next run
    pid, space = mark.get("pid"), mark.get("process_space")
    return (_PROCESS_SPACE is not None and space == _PROCESS_SPACE and isinstance(pid, int)
            and not _pid_alive(pid))


def _poll_seconds() -> float:
    return max(0.01, min(HEARTBEAT_SECONDS, STALE_AFTER_SECONDS) / 5)


class RunAlive(OutputError):
    """The mark changed while it was watched: the run that writes it is alive."""

    def __init__(self, seen: Observed, message: str):
        super().__init__(message)
        self.seen = seen


def wait_until_stale(storage: Storage, seen: Observed, log: Callable[[str], None] = lambda s: None,
                     clock: Callable[[], float] = time.monotonic) -> Observed:
    """Return ``seen`` once it is known stale; raise ``OutputError`` as soon as the mark changes
    (its run is alive) or goes away (its run just ended: look again).

    Watches the mark for ``STALE_AFTER_SECONDS`` on this process's own clock unless
    ``stale_at_once`` already tells."""
    if stale_at_once(seen.mark):
        return seen
    log(f"{storage.display_uri} holds the mark of an unfinished graft run ({describe(seen.mark)}); watching it "
        f"for up to {STALE_AFTER_SECONDS:.0f}s to tell whether that run is alive")
    deadline = clock() + STALE_AFTER_SECONDS
    while (left := deadline - clock()) > 0:
        time.sleep(min(_poll_seconds(), left))
        now = observe(storage)
        if now is None:
            raise OutputError(f"{storage.display_uri}: the graft run that held this output ended while this one "
                              f"was checking it; run the same command again")
        if now.raw != seen.raw or now.version != seen.version:
            raise RunAlive(now, f"{storage.display_uri} is being written by another graft run ({describe(now.mark)}; "
                                f"its mark changed while this run watched it); wait for it to finish")
    return seen


def has_mark(listing: list[str]) -> bool:
    """The run mark is in ``listing``, or is being replaced this instant (moved aside, on local disk)."""
    return RUN_MARK in listing or any(n.startswith(cas.aside_prefix(RUN_MARK)) for n in listing)


def describe(mark: dict[str, Any]) -> str:
    if not mark:
        return "a mark graft cannot read"
    return (f"host {mark.get('host')}, pid {mark.get('pid')}, heartbeat {mark.get('beat', '?')} "
            f"at {mark.get('heartbeat_utc', '?')} by its clock")


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
        self.cas = cas.supported(storage)
        self.version: str | None = None  # of this run's last write, on a compare-and-swap store
        self._beats = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.started = time.time()

    def _content(self, interrupted: bool = False) -> bytes:
        self._beats += 1  # every write differs (an S3 ETag is a hash of the content)
        now = time.time()
        mark = {
            "graft_version": __version__,
            "token": self.token,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "process_space": _PROCESS_SPACE,
            "started": datetime.fromtimestamp(self.started, timezone.utc).isoformat(timespec="seconds"),
            "beat": self._beats,
            "heartbeat_utc": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="seconds"),
            "fingerprint": self.fingerprint,
            "files": self.files,
            "shards": self.shards,
            **({"interrupted": True} if interrupted else {}),
        }
        return json.dumps(mark, indent=1).encode()

    def _ours(self, seen: Observed | None) -> bool:
        return seen is not None and seen.mark.get("token") == self.token

    def acquire(self, previous: Observed | None) -> None:
        """Write the mark: new, or in place of ``previous`` (a mark judged stale, replaced only if it
        is still that version); raise ``OutputError`` when another run got the output first. Then
        start the heartbeat."""
        with self._lock:
            content = self._content()
            if self.cas:
                if previous is None:
                    self.version = cas.create(self.storage, RUN_MARK, content)
                elif previous.version is not None:
                    self.version = cas.replace(self.storage, RUN_MARK, content, previous.version)
                if self.version is None:
                    # A write that landed but whose answer was lost (the client re-sent it and the
                    # store refused the copy) reads as a failed condition: the token tells.
                    seen = observe(self.storage)
                    if not self._ours(seen):
                        raise self._taken()
                    self.version = seen.version  # type: ignore[union-attr]
            else:
                self.storage.write_bytes(RUN_MARK, content)
        if not self.cas:
            time.sleep(_SETTLE_SECONDS)
            if not self._ours(observe(self.storage)):
                raise self._taken()
        self._thread = threading.Thread(target=self._beat, name="graft-heartbeat", daemon=True)
        self._thread.start()

    def _write(self, interrupted: bool = False) -> None:
        """Rewrite the mark (hold ``_lock``); on a compare-and-swap store only over this run's own
        last version. Raise ``OutputError`` (and stay lost) when another run took the output over."""
        if self.lost:
            raise self._lost_error()
        content = self._content(interrupted)
        if not self.cas:
            if not self._ours(observe(self.storage)):
                self.lost = True
                raise self._lost_error()
            self.storage.write_bytes(RUN_MARK, content)
            return
        version = cas.replace(self.storage, RUN_MARK, content, self.version or "")
        if version is None:
            # Someone else wrote it, or this run's previous write landed and only its answer was
            # lost: the token in the mark tells.
            seen = observe(self.storage)
            if self._ours(seen):
                self.version = seen.version  # type: ignore[union-attr]
                version = cas.replace(self.storage, RUN_MARK, content, self.version or "")
            if version is None:
                self.lost = True
                raise self._lost_error()
        self.version = version

    def confirm(self) -> bool:
        """Re-read the mark: True while it is still this run's. Called before anything is committed
        or removed, so a run that was taken over never deletes or commits into an output that is no
        longer its own. Once lost, always lost; a failed read raises."""
        with self._lock:
            if not self.lost and not self._ours(observe(self.storage)):
                self.lost = True
            return not self.lost

    def _taken(self) -> OutputError:
        try:
            seen = observe(self.storage)
        except StorageError:
            seen = None
        return OutputError(f"{self.storage.display_uri} is being written by another graft run "
                           f"({describe(seen.mark if seen else {})}); wait for it to finish")

    def _lost_error(self) -> OutputError:
        return OutputError(f"{self.storage.display_uri}: another graft run took over this output (it judged this "
                           f"run's heartbeat dead); stop one of the two runs")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            with self._lock:
                if self._stop.is_set():
                    return
                try:
                    self._write()
                except OutputError:
                    return  # lost: the next record or confirm says so
                except Exception:  # noqa: BLE001 - the heartbeat must outlive any one failure
                    pass  # a missed heartbeat is harmless; the next one retries

    def record(self, file: str, size: int, sha256: str, version: str | None,
               extra: dict[str, Any] | None = None) -> None:
        """Journal a committed shard (and what it measured: its transfer-report measures, the
        digests of the inputs it read), so a resumed run can keep it without reading it again."""
        with self._lock:
            if self.lost:
                raise self._lost_error()
            self.shards[file] = {"size": size, "sha256": sha256, "version": version, **(extra or {})}
            self._write()

    def forget(self, files: list[str]) -> None:
        """Take shards out of the journal (a kept shard that failed its check)."""
        with self._lock:
            for f in files:
                self.shards.pop(f, None)
            self._write()

    @contextmanager
    def held(self) -> Iterator[None]:
        """No write of the mark is in flight inside this block (a sweep of temporaries must not
        remove the ones a compare-and-swap write is using)."""
        with self._lock:
            yield

    def _stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=HEARTBEAT_SECONDS)

    def suspend(self) -> None:
        """Stop the heartbeat and leave the journal for the next run, marked as interrupted (so that
        run takes over at once instead of watching the mark go stale). Not when lost."""
        self._stop_heartbeat()
        with self._lock:
            if not self.lost:
                self._write(interrupted=True)

    def release(self) -> None:
        """Stop the heartbeat and remove the mark if it is still ours (the run committed or rolled
        back). A run that was taken over removes nothing."""
        self._stop_heartbeat()
        with self._lock:
            if self.lost or not self._ours(observe(self.storage)):
                self.lost = True
                return
            self.storage.remove(RUN_MARK)

    def abandon(self) -> None:
        """Stop the heartbeat and touch nothing (the output is another run's)."""
        self._stop_heartbeat()


def journal_form(result: ShardResult) -> dict[str, Any]:
    """What a shard measured, as the journal keeps it: its report measures (JSON: NaN/Inf as
    strings) and the digests of the inputs it read."""
    out: dict[str, Any] = {}
    if result.report:
        out["report"] = {name: [v if math.isfinite(v) else repr(v) for v in values] for name, values in result.report}
    if result.digests:
        out["digests"] = dict(result.digests)
    return out


def kept_result(name: str, size: int, sha256: str, info: dict[str, Any]) -> ShardResult:
    """A kept shard's result, with what its journal entry says it measured."""
    digests = info.get("digests")
    digests = tuple((str(k), str(v)) for k, v in digests.items()) if isinstance(digests, dict) else ()
    return ShardResult(name, size, sha256, 0, 0.0, _journaled_report(info), digests)


def _journaled_report(info: dict[str, Any]) -> tuple[tuple[str, tuple[float, ...]], ...]:
    """A kept shard's report measures back from its journal entry; none if absent or malformed."""
    entries = info.get("report")
    extra = len(STATS) + 1  # several diffs: the change, then TERM_STATS per further diff
    try:
        return tuple((str(n), tuple(float(v) for v in vs)) for n, vs in entries.items()
                     if len(vs) in (len(STATS), len(DIFF_STATS))
                     or (len(vs) > extra and (len(vs) - extra) % len(TERM_STATS) == 0)
                     ) if isinstance(entries, dict) else ()
    except (TypeError, ValueError):
        return ()
