"""One byte store for every location: local paths, file://, memory://, s3://, gs://, ... via fsspec.

A ``Storage`` is a directory (or key prefix) on one filesystem. Order of use:

1. ``Storage(uri, storage_options)``: resolves the filesystem; no I/O.
2. ``list()`` / ``stat(name)`` / ``read(name, start, end)``: small reads (headers, index, configs).
3. ``reader(name)``: a ``RangeReader`` for streaming a file's byte ranges into caller buffers.
4. ``writer(name)``: an ``AtomicWriter``; nothing is visible at ``name`` until ``commit()``, and
   ``discard()`` (or an exception inside ``with``) leaves nothing behind.

On remote stores, reads, stats, listings and removals that fail transiently (a dropped connection,
a timeout, throttling, a short read; ``retry.is_transient``) are retried with exponential backoff
and jitter (``retry.py``); writes are never retried (a failed write fails the file, which is
discarded).

Local paths take the same ``Storage`` class as remote URIs; only the innermost primitives (pread,
fsync + rename) differ, so the tested code path is the one users run.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable, Mapping, TypeVar

import fsspec
from fsspec.asyn import sync

from .atomic import AtomicWriter
from . import retry
from .directio import DirectAppender
from .errors import GraftError, IntegrityError, NotFoundError, StorageError
from .redaction import redact_text, redact_uri
from .retry import ShortRead, describe, is_full, is_transient

__all__ = ["FileStat", "Storage", "RangeReader", "AtomicWriter", "TEMP_MARK", "check_digest",
           "is_transient"]

_T = TypeVar("_T")

# Temporary files carry this in their name so a later run can recognise and remove its leftovers.
TEMP_MARK = ".graft-tmp-"

# Object stores whose buffered writers support autocommit=False: the object only appears on
# commit() and discard() aborts it. (S3 has a writer of its own: ``s3write``.)
_DEFERRED_COMMIT = {"gs", "gcs", "az", "abfs", "abfss"}


# On S3 this is the only retry layer. s3fs retries every call itself (5 attempts, nested twice
# around a range read: 25 for a dropped connection) and botocore retries every request again (its
# default legacy mode: 5 attempts). Stacked under graft's, one throttled range cost 5 x 5 x 5 = 125
# requests and minutes of unjittered pauses before any error. So s3fs makes one attempt (an attribute
# of the filesystem, no option sets it) and botocore one (``_with_defaults``; a user who sets
# ``config_kwargs.retries`` keeps theirs, on top of graft's).
_S3FS_ATTEMPTS = 1
_BOTOCORE_RETRIES = {"mode": "standard", "total_max_attempts": 1}
# Writes are not retried by graft's layer (only the writer's owner could start a file over), so on
# S3 each request of an upload (a part, the completion, a small PutObject: all safe to send again)
# gets one layer of its own: botocore's standard mode, RETRY_ATTEMPTS in all, with jittered
# exponential backoff, on the writers' own filesystem (``Storage.write_fs``).
_BOTOCORE_WRITE_RETRIES_MODE = "standard"

# S3 range reads in flight share one connection pool per filesystem (aiobotocore's default is 10);
# graft sizes it to cover every part in flight (3 inputs x read_concurrency x shards per process).
_POOL_CONNECTIONS = 64


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


def _protocol(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else "file"


def _with_defaults(protocol: str, opts: dict[str, Any]) -> dict[str, Any]:
    """The user's options for ``protocol`` plus graft's defaults for what they left unset."""
    if protocol in ("s3", "s3a"):
        config = dict(opts.get("config_kwargs") or {})
        config.setdefault("max_pool_connections", _POOL_CONNECTIONS)
        # A fresh dict per filesystem: botocore normalises the one it is given in place.
        config.setdefault("retries", dict(_BOTOCORE_RETRIES))
        opts = {**opts, "config_kwargs": config}
    return opts


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

class Storage:
    """A directory on an fsspec filesystem, addressed by plain file names inside it."""

    def __init__(self, uri: str, storage_options: Mapping[str, Mapping[str, Any]] | None = None):
        # ``uri`` is what the I/O uses (and what a worker rebuilds its Storage from); ``display_uri``,
        # credentials redacted, is what every message, log line and manifest entry shows.
        self.uri = uri.rstrip("/") or "/"
        self.display_uri = redact_uri(self.uri)
        self.storage_options = storage_options or {}
        self.protocol = _protocol(self.uri)
        opts = _with_defaults(self.protocol, dict((storage_options or {}).get(self.protocol, {})))
        self._fs_options = opts
        user_config = dict((storage_options or {}).get(self.protocol, {})).get("config_kwargs") or {}
        self._user_retries = "retries" in user_config
        self._write_fs: Any = None
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.uri, **opts)
        except (ImportError, ValueError) as e:
            raise StorageError(
                f"{self.display_uri}: no filesystem for protocol '{self.protocol}' ({redact_text(str(e))}); "
                f"install its fsspec extra, e.g. pip install 'graft[gcs]'"
            ) from None
        self.root = self.root.rstrip("/") or "/"
        self.is_local = self.protocol in ("file", "local")
        self.is_hub = self.protocol == "hf"
        self.is_s3 = self.protocol in ("s3", "s3a")
        if self.is_s3:
            self.fs.retries = _S3FS_ATTEMPTS  # s3fs takes no option for it; see RETRY_ATTEMPTS
        # The immutable revision every read uses (Hub: a commit sha, written or from pinned()).
        self.commit: str | None = None
        if self.is_hub:
            m = re.search(r"@([0-9a-f]{40})(?:/|$)", self.uri)
            self.commit = m.group(1) if m else None

    @property
    def write_fs(self) -> Any:
        """The filesystem writers upload with: on S3 one whose requests botocore retries (see
        ``_BOTOCORE_WRITE_RETRIES_MODE``), unless the user set ``config_kwargs.retries``; elsewhere
        ``fs``."""
        if not self.is_s3:
            return self.fs
        if self._write_fs is None:
            config = dict(self._fs_options.get("config_kwargs") or {})
            if not self._user_retries:
                config["retries"] = {"mode": _BOTOCORE_WRITE_RETRIES_MODE,
                                     "total_max_attempts": max(1, retry.RETRY_ATTEMPTS)}
            self._write_fs = fsspec.filesystem(self.protocol, **{**self._fs_options, "config_kwargs": config})
            self._write_fs.retries = _S3FS_ATTEMPTS
        return self._write_fs

    def __repr__(self) -> str:
        return f"Storage({self.display_uri!r})"

    def pinned(self) -> Storage:
        """This location at a revision that cannot move: on the Hub, ``@branch`` or ``@tag``
        resolved to its commit sha now (the same ``Storage`` everywhere else)."""
        if not self.is_hub or self.commit is not None:
            return self
        from .hub import pin_revision  # the Hub client loads only for hf:// locations

        return Storage(pin_revision(self)[0], self.storage_options)

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
            where = "disk" if self.is_local else "disk or bucket"
            return StorageError(f"{err}; the {where} is full (or over its quota): free some space "
                                f"and run again")
        return err

    def _retry(self, name: str, action: str, op: Callable[[], _T],
               retry_if: Callable[[BaseException], bool] = lambda e: is_transient(e)) -> _T:
        """``op()``; on a remote store tried again after a growing pause while it fails with an
        error ``retry_if`` accepts (default: ``is_transient``). Raises ``StorageError`` naming the
        file, or the ``GraftError`` that ``op`` raised; local files get one attempt (the OS retries
        for them)."""
        attempts = 1 if self.is_local else max(1, retry.RETRY_ATTEMPTS)
        attempt = 1
        while True:
            try:
                return op()
            except GraftError:
                raise
            except Exception as e:  # noqa: BLE001 - every backend raises its own types
                if not retry_if(e):
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
        return self._retry(name, "check existence",
                           lambda: bool(self.fs.exists(self.path(name) if name else self.root)))

    def list(self) -> list[str]:
        """Names of the files directly inside this directory (sorted; sub-directories left out)."""
        return sorted(self._entries())

    def list_stats(self) -> dict[str, FileStat | None]:
        """The files directly inside this directory (sorted), each with its stat where the listing
        carries the same size and version as ``stat`` would (local disk, S3: saves a request per
        file on an object store), else ``None``: call ``stat``."""
        entries = self._entries()
        known = self.is_local or self.is_s3
        return {name: self._stat_of(name, info) if known else None for name, info in sorted(entries.items())}

    def _entries(self) -> dict[str, dict[str, Any]]:
        def ls() -> list[dict[str, Any]]:
            try:
                # refresh: other processes (shard workers) write here; a cached listing would be stale.
                return self.fs.ls(self.root, detail=True, refresh=True)
            except (FileNotFoundError, NotADirectoryError):
                return []

        entries = self._retry("", "list the directory", ls)
        return {entry["name"].rstrip("/").rsplit("/", 1)[-1]: entry
                for entry in entries if entry.get("type") != "directory"}

    def stat(self, name: str) -> FileStat:
        def once() -> FileStat:
            try:
                if self.is_hub:
                    from .hub import stat_hub_file

                    size, digest = stat_hub_file(self, name)
                    return FileStat(name=name, size=size, version=digest, digest=digest)
                info = self.fs.info(self.path(name), refresh=True)
            except FileNotFoundError:
                raise StorageError(f"{self.url(name)}: no such file") from None
            return self._stat_of(name, info)

        return self._retry(name, "stat", once)

    def _stat_of(self, name: str, info: Mapping[str, Any]) -> FileStat:
        # The ETag first: a listing carries it too (a VersionId only comes with a HEAD), and any change
        # of content changes it.
        version = info.get("ETag") or info.get("etag") or info.get("VersionId") or info.get("generation")
        if version is None and self.is_local and info.get("mtime") is not None:
            # Local files have no ETag; a rewrite changes the modification time.
            version = f"mtime:{info['mtime']!r}"
        return FileStat(name=name, size=int(info["size"]), version=str(version).strip('"') if version else None)

    @property
    def pins_reads(self) -> bool:
        """Whether ``read(..., version=...)`` makes the store refuse a read of any other version (S3:
        each range request carries ``If-Match: <ETag>``)."""
        return self.is_s3

    def read(self, name: str, start: int | None = None, end: int | None = None,
             version: str | None = None) -> bytes:
        """Bytes ``[start, end)`` of ``name`` (the whole file by default), exactly that many.

        With ``version`` (from ``stat``) on a store that ``pins_reads``, a ranged read of any other
        version fails with ``IntegrityError`` instead of returning its bytes. On a remote store a
        dropped connection, a timeout, throttling or a short read is retried (``RETRY_ATTEMPTS``)."""
        if start is not None and end is not None and end <= start:
            return b""  # an empty HTTP range is invalid: S3 would answer with the whole object
        whole = start is None and end is None
        expected = self.stat(name).digest if whole and self.is_hub else None
        # The Hub client already retries a range request itself (huggingface_hub's http_backoff: 6
        # attempts on 429/5xx, timeouts and network errors, honouring Retry-After), so graft's layer
        # only adds what it does not: a short answer read again.
        data = self._retry(name, f"read bytes {start}..{end}",
                           lambda: self._read_once(name, start, end, version),
                           (lambda e: isinstance(e, ShortRead)) if self.is_hub else is_transient)
        if expected is not None:
            check_digest(self.url(name), data, expected)
        return data

    def _read_once(self, name: str, start: int | None, end: int | None, version: str | None) -> bytes:
        """One attempt of ``read``: raises a ``GraftError`` for what no retry can fix, the store's
        own error for a failed request, ``ShortRead`` for a short answer from a long enough file."""
        try:
            if version is not None and self.pins_reads and start is not None and end is not None:
                data = sync(self.fs.loop, self._s3_get_if_match, name, start, end, version)
            else:
                # The Hub's file objects cache read-ahead blocks by default: ask for exactly the range.
                extra = {"cache_type": "none"} if self.is_hub else {}
                data = self.fs.cat_file(self.path(name), start=start, end=end, **extra)
        except FileNotFoundError:
            raise NotFoundError(f"{self.url(name)}: no such file") from None
        except Exception as e:  # noqa: BLE001
            if _precondition_failed(e):
                raise IntegrityError(f"{self.url(name)}: changed during the run (its ETag is no longer "
                                     f"{version}); nothing read from it was committed, run the job again "
                                     f"to use the new version") from None
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

    async def _s3_get_if_match(self, name: str, start: int, end: int, etag: str) -> bytes:
        bucket, key, _ = self.fs.split_path(self.path(name))
        resp = await self.fs._call_s3("get_object", Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}",
                                      IfMatch=f'"{etag}"')
        try:
            return await resp["Body"].read()
        finally:
            resp["Body"].close()

    def _ends_before(self, name: str, end: int) -> bool:
        # Object stores refuse a range past the end ("not satisfiable") instead of returning less.
        try:
            return self.stat(name).size < end
        except StorageError:
            return False

    def _short(self, name: str, start: int | None, end: int, got: int | None) -> IntegrityError:
        what = f"got {got}" if got is not None else "the file ends before that"
        return IntegrityError(f"{self.url(name)}: asked for bytes {start}..{end} but {what}; the file "
                              f"is shorter than its header says or changed during the run")

    def reader(self, name: str, concurrency: int = 1, version: str | None = None) -> RangeReader:
        """A reader for byte ranges of ``name``; close it (or use ``with``) when done.

        On remote stores a range is split into up to ``concurrency`` parts fetched at once (each
        an HTTP range request), each pinned to ``version`` where the store ``pins_reads``; local
        files are read with one ``preadv``.
        """
        if self.is_local:
            return _LocalRangeReader(self, name)
        return _FsspecRangeReader(self, name, concurrency, version)

    def writer(self, name: str, size: int | None = None) -> AtomicWriter:
        """A writer whose bytes become visible at ``name`` only on ``commit()``. ``size``: the bytes
        the file will have, if known (on S3 it sizes the upload's parts)."""
        if self.is_local:
            return _LocalAtomicWriter(self, name)
        if self.is_s3:
            from .s3write import S3PartWriter

            return S3PartWriter(self, name, size or 0)
        if self.protocol in _DEFERRED_COMMIT:
            return _DeferredCommitWriter(self, name)
        return _RenameAtomicWriter(self, name)

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

    def abort_uploads(self, names: Callable[[str], bool]) -> list[str]:
        """Abort the unfinished multipart uploads of files directly in this directory whose name
        ``names`` accepts; returns those names. A writer killed between its first part and its
        commit (a SIGKILLed Ray worker) leaves one behind: invisible in listings, but stored and
        billed until aborted. Only S3 has them; elsewhere nothing to do."""
        if not self.is_s3:
            return []
        bucket, _, key = self.root.partition("/")
        prefix = f"{key}/" if key else ""
        aborted: list[str] = []
        page_args: dict[str, str] = {"Bucket": bucket, "Prefix": prefix}
        while True:
            page = self._retry("", "list unfinished uploads",
                               lambda: self.fs.call_s3("list_multipart_uploads", **page_args))
            for upload in page.get("Uploads", []):
                name = upload["Key"][len(prefix):]
                if not upload["Key"].startswith(prefix) or "/" in name or not names(name):
                    continue
                self._retry(name, "abort an unfinished upload", lambda u=upload: self.fs.call_s3(
                    "abort_multipart_upload", Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"]))
                aborted.append(name)
            if not page.get("IsTruncated"):
                return aborted
            page_args.update(KeyMarker=page.get("NextKeyMarker", ""),
                             UploadIdMarker=page.get("NextUploadIdMarker", ""))


def _precondition_failed(e: BaseException) -> bool:
    """An S3 412 (s3fs raises it as an OSError caused by botocore's ClientError)."""
    for err in (e, e.__cause__):
        response = getattr(err, "response", None)
        if isinstance(response, dict) and response.get("Error", {}).get("Code") == "PreconditionFailed":
            return True
    return False


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


class _LocalRangeReader(RangeReader):
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


class _FsspecRangeReader(RangeReader):
    # Parts smaller than this cost more in request overhead than they gain in parallelism.
    MIN_PART = 1 << 20
    # S3 bills and throttles per request, and AWS advises ranged GETs of 8-16 MB: a chunk is split
    # into parts of at least this (a default 8 MiB bf16 chunk read is one request).
    MIN_S3_PART = 8 << 20

    def __init__(self, storage: Storage, name: str, concurrency: int = 1, version: str | None = None):
        super().__init__(storage, name)
        self.min_part = self.MIN_S3_PART if storage.is_s3 else self.MIN_PART
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


def _temp_name(name: str) -> str:
    return f".{name}{TEMP_MARK}{uuid.uuid4().hex[:12]}"


class _LocalAtomicWriter(AtomicWriter):
    def __init__(self, storage: Storage, name: str):
        super().__init__(storage, name)
        self._tmp = storage.path(_temp_name(name))
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
    _path: str

    def _open(self, path: str, **kwargs: Any) -> Any:
        try:
            return self.storage.write_fs.open(path, "wb", **kwargs)
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


class _DeferredCommitWriter(_FsspecWriterBase):
    def __init__(self, storage: Storage, name: str):
        super().__init__(storage, name)
        self._f = self._open(storage.path(name), autocommit=False)

    def _publish(self) -> None:
        self._f.commit()  # e.g. S3: complete the multipart upload

    def discard(self) -> None:
        self._done = True
        try:
            self._f.discard()
        except Exception:  # noqa: BLE001 - best effort: the object was never completed
            pass


class _RenameAtomicWriter(_FsspecWriterBase):
    def __init__(self, storage: Storage, name: str):
        super().__init__(storage, name)
        self._tmp = storage.path(_temp_name(name))
        self._f = self._open(self._tmp)

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
