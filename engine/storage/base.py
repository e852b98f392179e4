"""``Storage``: a directory (or key prefix) on one filesystem, and the contract every store keeps.

Order of use:

1. ``Storage(uri, storage_options)``: resolves the filesystem; no I/O. The class is chosen by the
   URI's protocol (as ``pathlib.Path`` picks its flavour): ``LocalStorage`` (``local.py``),
   ``S3Storage`` (``s3.py``), ``GCSStorage`` (``gcs.py``), ``AzureStorage`` (``azure.py``),
   ``HubStorage`` (``hub.py``), else ``FsspecStorage`` (``generic.py``: ``memory://``, ...).
2. ``pinned()``: the same location at a revision that cannot move (the Hub; itself elsewhere).
3. ``list()`` / ``stat(name)`` / ``read(name, start, end)``: small reads (headers, index, configs).
4. ``reader(name)``: a ``RangeReader`` for streaming a file's byte ranges into caller buffers.
5. ``writer(name)``: an ``AtomicWriter``; nothing is visible at ``name`` until ``commit()``, and
   ``discard()`` (or an exception inside ``with``) leaves nothing behind.

On remote stores, reads, stats, listings and removals that fail transiently (a dropped connection,
a timeout, throttling, a short read; ``retry.is_transient``) are retried with exponential backoff
and jitter (``retry.py``); writes are never retried (a failed write fails the file, which is
discarded). A store changes what differs through the hooks below (``_fetch``, ``_stat_once``,
``_version``, ``_retryable``, ``_expected_digest``, ``reader``, ``writer``), never by a protocol
test in this class, so the code path tested on one store is the one every store runs.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, TypeVar

import fsspec

from . import retry
from ..errors import GraftError, IntegrityError, NotFoundError, StorageError
from ..redaction import redact_text, redact_uri
from .retry import ShortRead, describe, is_full, is_transient

if TYPE_CHECKING:  # the face names its readers and writers, never builds one: each store chooses
    from .atomic import AtomicWriter
    from .readers import RangeReader

__all__ = ["FileStat", "Storage", "check_digest", "protocol_of"]

_T = TypeVar("_T")


@dataclass(frozen=True)
class FileStat:
    """What a store knows of a file without reading it.

    ``version`` is an ETag / VersionId / generation (an mtime locally); ``digest`` is a content hash
    the store vouches for (``sha256:<hex>`` or ``git-sha1:<hex>``, the Hub's LFS and git ids), checked
    whenever the whole file is read.
    """

    name: str
    size: int
    version: str | None = None
    digest: str | None = None


def protocol_of(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else "file"


def check_digest(where: str, data: bytes, expected: str) -> None:
    """Raise ``IntegrityError`` unless ``data`` hashes to ``expected`` (``sha256:`` / ``git-sha1:``)."""
    kind, _, want = expected.partition(":")
    if kind == "sha256":
        got = hashlib.sha256(data).hexdigest()
    elif kind == "git-sha1":  # a git blob id: sha1 over "blob <size>\0" + content
        got = hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()
    else:
        raise ValueError(f"unknown digest kind {kind!r}")
    if got != want:
        raise IntegrityError(f"{where}: content does not match its recorded {kind} ({want[:12]}..., "
                             f"read {got[:12]}...); the download was corrupted or the store serves "
                             f"other bytes than it lists, run again")


def _entry_name(entry: Mapping[str, Any]) -> str:
    """A listing entry's name inside its directory."""
    return str(entry["name"]).rstrip("/").rsplit("/", 1)[-1]


class Storage:
    """A directory on an fsspec filesystem, addressed by plain file names inside it.

    Subclasses name the protocols they serve in ``protocols``; ``Storage(uri)`` returns an instance
    of the one registered for the URI's protocol, else of the one declared with ``fallback=True``.
    Each store chooses its ``reader`` and ``writer``: this face imports none of them.
    """

    protocols: ClassVar[tuple[str, ...]] = ()
    _by_protocol: ClassVar[dict[str, type[Storage]]] = {}
    _fallback: ClassVar[type[Storage] | None] = None

    is_local: ClassVar[bool] = False
    # Whether a listing carries the size and version ``stat`` would give (saves a request per file).
    lists_stats: ClassVar[bool] = False
    # Whether ``read(..., version=...)`` makes the store refuse a read of any other version.
    pins_reads: ClassVar[bool] = False
    # Parts smaller than this cost more in request overhead than they gain in parallelism.
    min_read_part: ClassVar[int] = 1 << 20
    # Whether the store's client retries every request itself (with backoff): graft's layer then
    # only reads a short answer again, instead of multiplying the client's attempts by its own.
    client_retries: ClassVar[bool] = False
    # What fills up when a write fails for space.
    _space: ClassVar[str] = "disk or bucket"
    # The immutable revision every read uses (Hub: a commit sha); None where stores have none.
    commit: str | None = None

    def __init_subclass__(cls, fallback: bool = False, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for protocol in cls.protocols:
            Storage._by_protocol[protocol] = cls
        if fallback:
            Storage._fallback = cls

    def __new__(cls, uri: str, storage_options: Mapping[str, Mapping[str, Any]] | None = None) -> Storage:
        if cls is Storage:
            found = Storage._by_protocol.get(protocol_of(uri)) or Storage._fallback
            if found is None:  # only this module was imported: the package registers the stores
                raise StorageError(f"{redact_uri(uri)}: no store registered for protocol "
                                   f"'{protocol_of(uri)}'; import graft.engine.storage")
            cls = found
        return super().__new__(cls)

    def __getnewargs__(self) -> tuple[str, Mapping[str, Mapping[str, Any]]]:
        # A copy (pickle, copy) is made through ``__new__`` too: it must pick the same class.
        return (self.uri, self.storage_options)

    def __init__(self, uri: str, storage_options: Mapping[str, Mapping[str, Any]] | None = None):
        # ``uri`` is what the I/O uses (and what a worker rebuilds its Storage from); ``display_uri``,
        # credentials redacted, is what every message, log line and manifest entry shows.
        self.uri = uri.rstrip("/") or "/"
        self.display_uri = redact_uri(self.uri)
        self.storage_options = storage_options or {}
        self.protocol = protocol_of(self.uri)
        self._fs_options = self._with_defaults(dict((storage_options or {}).get(self.protocol, {})))
        try:
            self.fs, self.root = self._filesystem(self._fs_options)
        except (ImportError, ValueError) as e:
            raise StorageError(
                f"{self.display_uri}: no filesystem for protocol '{self.protocol}' ({redact_text(str(e))}); "
                f"install its fsspec extra, e.g. pip install 'graft[gcs]'"
            ) from None
        self.root = self.root.rstrip("/") or "/"

    def _filesystem(self, opts: dict[str, Any]) -> tuple[Any, str]:
        """The fsspec filesystem for this location and the root path inside it."""
        return fsspec.core.url_to_fs(self.uri, **opts)

    def _with_defaults(self, opts: dict[str, Any]) -> dict[str, Any]:
        """The user's filesystem options plus this store's defaults for what they left unset."""
        return opts

    @property
    def write_fs(self) -> Any:
        """The filesystem writers upload with (S3: one whose requests botocore retries)."""
        return self.fs

    def __repr__(self) -> str:
        return f"Storage({self.display_uri!r})"

    def pinned(self) -> Storage:
        """This location at a revision that cannot move (the Hub: a branch or tag resolved to its
        commit now); the same ``Storage`` on stores without revisions."""
        return self

    def path(self, name: str) -> str:
        """The filesystem path of ``name`` inside this directory."""
        return f"{self.root}/{name}" if self.root != "/" else f"/{name}"

    def url(self, name: str) -> str:
        """The user-facing location of ``name`` (for messages and the manifest), credentials
        redacted; ``path(name)`` is the one to read and write."""
        return f"{self.display_uri}/{name}"

    def _fail(self, name: str, action: str, e: BaseException) -> StorageError:
        return StorageError(f"{self.url(name)}: cannot {action}: {describe(e)}")

    def _write_failed(self, name: str, action: str, e: BaseException) -> StorageError:
        """A write-side failure; a full disk or bucket says so instead of only quoting errno."""
        err = self._fail(name, action, e)
        if is_full(e):
            return StorageError(f"{err}; the {self._space} is full (or over its quota): free some space "
                                f"and run again")
        return err

    def _attempts(self) -> int:
        """How many times a failing call is tried in all (read at call time: tests shorten it)."""
        return max(1, retry.RETRY_ATTEMPTS)

    def _retryable(self, e: BaseException) -> bool:
        """Whether a failed read is worth another attempt here."""
        return is_transient(e)

    def _retry(self, name: str, action: str, op: Callable[[], _T],
               retry_if: Callable[[BaseException], bool] = lambda e: is_transient(e)) -> _T:
        """``op()``, tried again after a growing pause while it fails with an error ``retry_if``
        accepts (default: ``is_transient``), up to ``_attempts()`` in all. Raises ``StorageError``
        naming the file, or the ``GraftError`` that ``op`` raised."""
        attempts = self._attempts()
        attempt = 1
        while True:
            try:
                return op()
            except GraftError:
                raise
            except Exception as e:  # noqa: BLE001 - every backend raises its own types
                if not retry_if(e) or (self.client_retries and not isinstance(e, ShortRead)):
                    raise self._fail(name, action, e) from e
                if attempt >= attempts:
                    if attempts == 1:
                        raise self._fail(name, action, e) from e
                    raise StorageError(f"{self.url(name)}: cannot {action}: failed after {attempts} "
                                       f"attempts: {describe(e)}; check the network or the store and "
                                       f"run the same command again") from e
            time.sleep(retry.backoff(attempt))
            attempt += 1

    def exists(self, name: str = "") -> bool:
        path = self.path(name) if name else self.root

        def once() -> bool:
            self.fs.invalidate_cache(path)  # as in ``_stat_once``
            return bool(self.fs.exists(path))

        return self._retry(name, "check existence", once)

    def list(self) -> list[str]:
        """Names of the files directly inside this directory (sorted; sub-directories left out)."""
        return sorted(self._entries())

    def subdirectories(self) -> list[str]:
        """Names of the directories (on object stores: key prefixes) directly inside this one, sorted."""
        return self.contents()[1]

    def contents(self) -> tuple[list[str], list[str]]:
        """``list()`` and ``subdirectories()`` from one listing (one request on an object store)."""
        entries = self._retry("", "list the directory", self._ls_or_nothing)
        files = sorted({_entry_name(e) for e in entries if e.get("type") != "directory"})
        return files, sorted(_entry_name(e) for e in entries if e.get("type") == "directory")

    def list_stats(self) -> dict[str, FileStat | None]:
        """The files directly inside this directory (sorted), each with its stat where the listing
        carries the same size and version as ``stat`` would (``lists_stats``), else ``None``: call
        ``stat``."""
        entries = self._entries()
        return {name: self._stat_of(name, info) if self.lists_stats else None
                for name, info in sorted(entries.items())}

    def _ls_or_nothing(self) -> list[dict[str, Any]]:
        try:
            return self._ls_fresh()
        except (FileNotFoundError, NotADirectoryError):
            return []

    def _entries(self) -> dict[str, dict[str, Any]]:
        entries = self._retry("", "list the directory", self._ls_or_nothing)
        return {_entry_name(entry): entry for entry in entries if entry.get("type") != "directory"}

    def _ls_fresh(self) -> list[dict[str, Any]]:
        """The directory's entries as the store has them now: other processes (shard workers) write
        here, so a cached listing would be stale."""
        return self.fs.ls(self.root, detail=True, refresh=True)

    def stat(self, name: str) -> FileStat:
        def once() -> FileStat:
            try:
                return self._stat_once(name)
            except FileNotFoundError:
                raise StorageError(f"{self.url(name)}: no such file") from None

        return self._retry(name, "stat", once)

    def _stat_once(self, name: str) -> FileStat:
        """One attempt of ``stat``; raises ``FileNotFoundError`` for a missing file."""
        path = self.path(name)
        # Other processes (shard workers) write here: a listing this filesystem cached before they
        # did must not answer (gcsfs looks there first, whatever ``refresh`` says).
        self.fs.invalidate_cache(path)
        return self._stat_of(name, self.fs.info(path, refresh=True))

    def _stat_of(self, name: str, info: Mapping[str, Any]) -> FileStat:
        version = self._version(info)
        return FileStat(name=name, size=int(info["size"]), version=str(version).strip('"') if version else None)

    def _version(self, info: Mapping[str, Any]) -> Any:
        # The ETag first: a listing carries it too (a VersionId only comes with a HEAD), and any change
        # of content changes it.
        return info.get("ETag") or info.get("etag") or info.get("VersionId") or info.get("generation")

    def read(self, name: str, start: int | None = None, end: int | None = None,
             version: str | None = None) -> bytes:
        """Bytes ``[start, end)`` of ``name`` (the whole file by default), exactly that many.

        With ``version`` (from ``stat``) on a store that ``pins_reads``, a ranged read of any other
        version fails with ``IntegrityError`` instead of returning its bytes. A whole file is checked
        against the digest the store vouches for, if any. On a remote store a dropped connection, a
        timeout, throttling or a short read is retried (``RETRY_ATTEMPTS``)."""
        if start is not None and end is not None and end <= start:
            return b""  # an empty HTTP range is invalid: S3 would answer with the whole object
        expected = self._expected_digest(name) if start is None and end is None else None
        data = self._retry(name, f"read bytes {start}..{end}",
                           lambda: self._read_once(name, start, end, version), self._retryable)
        if expected is not None:
            check_digest(self.url(name), data, expected)
        return data

    def _expected_digest(self, name: str) -> str | None:
        """The content digest a whole read of ``name`` must match (the Hub's), else None."""
        return None

    def _fetch(self, name: str, start: int | None, end: int | None, version: str | None) -> bytes:
        """The store's own request for bytes ``[start, end)``; ``version`` where it ``pins_reads``."""
        return self.fs.cat_file(self.path(name), start=start, end=end)

    def _read_once(self, name: str, start: int | None, end: int | None, version: str | None) -> bytes:
        """One attempt of ``read``: raises a ``GraftError`` for what no retry can fix, the store's
        own error for a failed request, ``ShortRead`` for a short answer from a long enough file."""
        try:
            data = self._fetch(name, start, end, version)
        except FileNotFoundError:
            raise NotFoundError(f"{self.url(name)}: no such file") from None
        except GraftError:
            raise
        except Exception as e:  # noqa: BLE001
            if not is_transient(e) and end is not None and self._ends_before(name, end):
                raise self._short(name, start, end, None) from None
            raise
        if start is not None and end is not None and len(data) != end - start:
            # A remote answer can end early (a connection closed mid-body); only a file that really
            # is shorter is an integrity problem.
            if not self.is_local and len(data) < end - start and not self._ends_before(name, end):
                raise ShortRead(f"got {len(data)} of {end - start} bytes")
            raise self._short(name, start, end, len(data))
        return data

    def _ends_before(self, name: str, end: int) -> bool:
        # Object stores refuse a range past the end ("not satisfiable") instead of returning less.
        try:
            return self.stat(name).size < end
        except StorageError:
            return False

    def _changed(self, name: str, what: str, version: str | None) -> IntegrityError:
        """A pinned read the store refused: ``name``'s ``what`` (ETag, generation) is not the one planned."""
        return IntegrityError(f"{self.url(name)}: changed during the run (its {what} is no longer "
                              f"{version}); nothing read from it was committed, run the job again to "
                              f"use the new version")

    def _short(self, name: str, start: int | None, end: int, got: int | None) -> IntegrityError:
        what = f"got {got}" if got is not None else "the file ends before that"
        return IntegrityError(f"{self.url(name)}: asked for bytes {start}..{end} but {what}; the file "
                              f"is shorter than its header says or changed during the run")

    def reader(self, name: str, concurrency: int = 1, version: str | None = None) -> RangeReader:
        """A reader for byte ranges of ``name``; close it (or use ``with``) when done.

        A range is split into up to ``concurrency`` parts of at least ``min_read_part`` fetched at
        once (each a ``read``), each pinned to ``version`` where the store ``pins_reads``.
        """
        raise NotImplementedError(f"{type(self).__name__}: no reader")

    def writer(self, name: str, size: int | None = None) -> AtomicWriter:
        """A writer whose bytes become visible at ``name`` only on ``commit()``. ``size``: the bytes
        the file will have, if known (on S3 it sizes the upload's parts)."""
        raise NotImplementedError(f"{type(self).__name__}: no writer")

    def write_bytes(self, name: str, data: bytes) -> None:
        """Atomically write a small file."""
        with self.writer(name, len(data)) as w:
            w.write(data)

    def remove(self, name: str) -> None:
        """Remove ``name`` if it exists (a transient failure is retried: removing twice is harmless)."""
        def rm() -> None:
            try:
                self.fs.rm_file(self.path(name))
            except FileNotFoundError:
                pass

        self._retry(name, "remove", rm)

    def makedirs(self) -> None:
        """Create this directory if the filesystem has directories (object stores do not)."""
        self._retry("", "create the directory", lambda: self.fs.makedirs(self.root, exist_ok=True))

    def conditional_writes(self) -> bool:
        """Whether this store offers compare-and-swap writes (``cas.py``: the run mark's lock)."""
        return False

    def put_if(self, name: str, data: bytes, version: str | None) -> str | None:
        """Write the small file ``name`` only if it is absent (``version`` None) or still at
        ``version``; its new version, or None when the condition failed. Where
        ``conditional_writes()``."""
        raise NotImplementedError(f"{self.protocol}: no conditional writes")

    def read_versioned(self, name: str) -> tuple[bytes, str]:
        """The whole of ``name`` and the version those bytes are (for ``put_if``); ``NotFoundError``
        when absent. Where ``conditional_writes()``."""
        raise NotImplementedError(f"{self.protocol}: no conditional writes")

    def abort_uploads(self, names: Callable[[str], bool]) -> list[str]:
        """Abort the unfinished uploads of files directly in this directory whose name ``names``
        accepts; returns those names. A writer killed between its first part and its commit (a
        SIGKILLed Ray worker) leaves one behind on a store with multipart uploads: invisible in
        listings, but stored and billed until aborted. Nothing to do on other stores."""
        return []
