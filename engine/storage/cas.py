"""Compare-and-swap writes of one small file: what makes the run mark a lock and not a convention.

Three calls, each naming the file's *version* (a token that changes with every write):

- ``create(storage, name, data)``: write ``name`` only if it does not exist; its new version, or
  None when it existed.
- ``replace(storage, name, data, version)``: write ``name`` only if it is still at ``version``; its
  new version, or None when someone else wrote (or removed) it since.
- ``read(storage, name)``: its bytes and their version; ``NotFoundError`` when absent.

``supported(storage)`` says whether the store offers them:

- local disk: the new content is written whole to a temporary and ``link()``-ed to the name (fails
  if the name exists), so no reader ever sees a half-written file; a replace first ``rename()``-s the
  current file aside (only one of two racers can) and puts it back when it is not the version
  expected. The version is the inode with its modification time: every write is a new inode.
- S3: ``PutObject`` with ``If-None-Match: *`` to create and ``If-Match: <ETag>`` to replace, which
  S3 (and moto) refuse with 412 when the condition fails; the version is the ETag.
- anything else (GCS, Azure, memory, ...): not supported; the caller falls back to plain writes and
  says so (last writer wins).

An answer lost after a write landed reads as a failed condition on the next call; callers that
must tell the two apart read the file back and look for their own token in it.
"""
from __future__ import annotations

import os
import time
import uuid

from fsspec.asyn import sync

from ..errors import NotFoundError
from .atomic import TEMP_MARK
from .base import Storage
from .local import LocalStorage
from .s3 import S3Storage
from .s3write import precondition_failed

__all__ = ["supported", "create", "replace", "read", "aside_prefix"]


_HARD_LINKS: dict[str, bool] = {}


def _hard_links(root: str) -> bool:
    """Whether the local filesystem at ``root`` makes hard links (some FUSE, SMB and FAT mounts do
    not: there graft falls back to plain writes, as on a store without conditional writes)."""
    if root not in _HARD_LINKS:
        probe = os.path.join(root, f".graft-link-probe{TEMP_MARK}{uuid.uuid4().hex[:12]}")
        try:
            with open(probe, "wb"):
                pass
            try:
                os.link(probe, probe + "-2")
                os.unlink(probe + "-2")
                _HARD_LINKS[root] = True
            except OSError:
                _HARD_LINKS[root] = False
            finally:
                os.unlink(probe)
        except OSError:
            return True  # the directory is not there yet (or not writable): the write will say so
    return _HARD_LINKS[root]


def supported(storage: Storage) -> bool:
    if isinstance(storage, LocalStorage):
        return _hard_links(storage.root)
    return isinstance(storage, S3Storage)


def _require(storage: Storage) -> None:
    if not supported(storage):
        raise NotImplementedError(f"{storage.protocol}: no conditional writes")


# --- local disk --------------------------------------------------------------------------------

def _local_version(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}:{st.st_mtime_ns}"


def _aside(storage: Storage, name: str, what: str) -> str:
    return storage.path(f".{name}{TEMP_MARK}{what}-{uuid.uuid4().hex[:12]}")


def _local_staged(storage: Storage, name: str, data: bytes) -> tuple[str, str]:
    """``data`` written whole and synced to a temporary; its path and the version it will have."""
    tmp = _aside(storage, name, "new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        version = _local_version(os.fstat(fd))
    finally:
        os.close(fd)
    return tmp, version


def _sync_dir(storage: Storage) -> None:
    fd = os.open(storage.root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _local_create(storage: Storage, name: str, data: bytes) -> str | None:
    tmp, version = _local_staged(storage, name, data)
    try:
        os.link(tmp, storage.path(name))
    except FileExistsError:
        return None
    finally:
        _unlink(tmp)
    _sync_dir(storage)
    return version


def _local_replace(storage: Storage, name: str, data: bytes, version: str) -> str | None:
    tmp, new_version = _local_staged(storage, name, data)
    old = _aside(storage, name, "old")
    path = storage.path(name)
    try:
        try:
            os.rename(path, old)  # of two racers, one moves the file; the other finds nothing
        except FileNotFoundError:
            return None
        if _local_version(os.stat(old)) != version:
            try:
                os.link(old, path)  # not the file expected: put it back as it was
            except FileExistsError:
                pass
            return None
        try:
            os.link(tmp, path)
        except FileExistsError:
            return None  # created anew in the instant the name was free
        _sync_dir(storage)
        return new_version
    finally:
        _unlink(tmp)
        _unlink(old)


def aside_prefix(name: str) -> str:
    """Names starting with this are ``name`` moved aside by a replace in progress (local disk)."""
    return f".{name}{TEMP_MARK}old-"


# A replace leaves the name free for an instant (between moving the old file aside and linking the
# new one). A reader that finds it free while an aside exists looks again for this long; if the name
# is still free, the writer stopped in that instant (killed): the file moved aside is put back.
_GAP_SECONDS = 1.0


def _local_read(storage: Storage, name: str) -> tuple[bytes, str]:
    path = storage.path(name)
    deadline, restored = time.monotonic() + _GAP_SECONDS, False
    while True:
        try:
            with open(path, "rb") as f:
                return f.read(), _local_version(os.fstat(f.fileno()))
        except FileNotFoundError:
            asides = [e for e in os.listdir(storage.root) if e.startswith(aside_prefix(name))]
            if not asides or restored:
                raise NotFoundError(f"{storage.url(name)}: no such file") from None
            if time.monotonic() < deadline:
                time.sleep(0.01)
                continue
            newest = max(asides, key=lambda e: os.stat(storage.path(e)).st_mtime_ns)
            try:
                os.link(storage.path(newest), path)
            except (FileExistsError, FileNotFoundError):
                pass  # the writer (or another reader) got there first
            restored = True


# --- S3 ----------------------------------------------------------------------------------------

def _conflict(e: BaseException) -> bool:
    """412 (the condition failed), or 409 (a concurrent conditional write to the same key won)."""
    if precondition_failed(e):
        return True
    for err in (e, e.__cause__):
        response = getattr(err, "response", None)
        if isinstance(response, dict) and response.get("Error", {}).get("Code") in (
                "ConditionalRequestConflict", "NoSuchKey"):
            return True
    return isinstance(e, FileNotFoundError)


def _s3_put(storage: Storage, name: str, data: bytes, **condition: str) -> str | None:
    bucket, key, _ = storage.fs.split_path(storage.path(name))

    def put() -> str | None:
        try:
            resp = storage.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition)
        except Exception as e:  # noqa: BLE001 - s3fs raises botocore's errors as OSErrors
            if _conflict(e):
                return None
            raise
        return str(resp["ETag"]).strip('"')

    return storage._retry(name, "write conditionally", put)


def _s3_read(storage: Storage, name: str) -> tuple[bytes, str]:
    bucket, key, _ = storage.fs.split_path(storage.path(name))

    def get() -> tuple[bytes, str]:
        try:
            resp = storage.fs.call_s3("get_object", Bucket=bucket, Key=key)
        except FileNotFoundError:
            raise NotFoundError(f"{storage.url(name)}: no such file") from None
        body = resp["Body"]
        try:
            data = sync(storage.fs.loop, body.read)
        finally:
            body.close()
        return data, str(resp["ETag"]).strip('"')

    return storage._retry(name, "read", get)


# --- the three calls ---------------------------------------------------------------------------

def create(storage: Storage, name: str, data: bytes) -> str | None:
    _require(storage)
    if isinstance(storage, LocalStorage):
        try:
            return _local_create(storage, name, data)
        except OSError as e:
            raise storage._write_failed(name, "create", e) from e
    return _s3_put(storage, name, data, IfNoneMatch="*")


def replace(storage: Storage, name: str, data: bytes, version: str) -> str | None:
    _require(storage)
    if isinstance(storage, LocalStorage):
        try:
            return _local_replace(storage, name, data, version)
        except OSError as e:
            raise storage._write_failed(name, "replace", e) from e
    return _s3_put(storage, name, data, IfMatch=f'"{version}"')


def read(storage: Storage, name: str) -> tuple[bytes, str]:
    _require(storage)
    if isinstance(storage, LocalStorage):
        try:
            return _local_read(storage, name)
        except OSError as e:
            raise storage._fail(name, "read", e) from e
    return _s3_read(storage, name)
