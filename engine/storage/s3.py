"""S3 (``s3://``, ``s3a://``): one retry layer, reads pinned to an ETag, multipart uploads.

- Retries: graft's layer is the only one on reads (see ``_S3FS_ATTEMPTS``); writes get botocore's
  own per-request retries on a filesystem of their own (``write_fs``).
- Reads: each range request carries ``If-Match: <ETag>`` when a version is given, so an object
  rewritten during a run fails the read (``IntegrityError``) instead of mixing two versions; ranges
  are split into parts of at least 8 MiB (AWS's ranged-GET advice).
- Listings: one LIST of the directory's prefix (pages of it), never of its parent.
- Writes: ``S3PartWriter`` (``s3write.py``), with the cleanup of unfinished uploads beside it.
"""
from __future__ import annotations

from typing import Any, ClassVar, Callable, Mapping

import fsspec
from fsspec.asyn import sync

from . import retry
from ..errors import NotFoundError
from .atomic import AtomicWriter
from .generic import FsspecStorage
from .s3write import S3PartWriter, abort_uploads, precondition_failed

__all__ = ["S3Storage"]

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
# exponential backoff, on the writers' own filesystem (``write_fs``).
_BOTOCORE_WRITE_RETRIES_MODE = "standard"

# S3 range reads in flight share one connection pool per filesystem (aiobotocore's default is 10);
# graft sizes it to cover every part in flight (3 inputs x read_concurrency x shards per process).
_POOL_CONNECTIONS = 64


class S3Storage(FsspecStorage):
    protocols = ("s3", "s3a")
    lists_stats: ClassVar[bool] = True
    pins_reads: ClassVar[bool] = True
    # S3 bills and throttles per request, and AWS advises ranged GETs of 8-16 MB: a chunk is split
    # into parts of at least this (a default 8 MiB bf16 chunk read is one request).
    min_read_part: ClassVar[int] = 8 << 20

    def __init__(self, uri: str, storage_options: Mapping[str, Mapping[str, Any]] | None = None):
        super().__init__(uri, storage_options)
        user_config = dict((storage_options or {}).get(self.protocol, {})).get("config_kwargs") or {}
        self._user_retries = "retries" in user_config
        self._write_fs: Any = None
        self.fs.retries = _S3FS_ATTEMPTS  # s3fs takes no option for it

    def _with_defaults(self, opts: dict[str, Any]) -> dict[str, Any]:
        config = dict(opts.get("config_kwargs") or {})
        config.setdefault("max_pool_connections", _POOL_CONNECTIONS)
        # A fresh dict per filesystem: botocore normalises the one it is given in place.
        config.setdefault("retries", dict(_BOTOCORE_RETRIES))
        return {**opts, "config_kwargs": config}

    @property
    def write_fs(self) -> Any:
        """A filesystem whose requests botocore retries (``_BOTOCORE_WRITE_RETRIES_MODE``), unless
        the user set ``config_kwargs.retries``."""
        if self._write_fs is None:
            config = dict(self._fs_options.get("config_kwargs") or {})
            if not self._user_retries:
                config["retries"] = {"mode": _BOTOCORE_WRITE_RETRIES_MODE,
                                     "total_max_attempts": max(1, retry.RETRY_ATTEMPTS)}
            self._write_fs = fsspec.filesystem(self.protocol, **{**self._fs_options, "config_kwargs": config})
            self._write_fs.retries = _S3FS_ATTEMPTS
        return self._write_fs

    def _ls_fresh(self) -> list[dict[str, Any]]:
        # s3fs's ``ls`` of a prefix with nothing under it lists the parent too, every page of it (to
        # tell whether a file has the directory's name): a new output beside many others cost pages
        # of LISTs for nothing. A file at the root lists as empty, as a local file does.
        return sync(self.fs.loop, self.fs._lsdir, self.root, refresh=True)

    def _fetch(self, name: str, start: int | None, end: int | None, version: str | None) -> bytes:
        if version is None or start is None or end is None:
            return super()._fetch(name, start, end, version)
        try:
            return sync(self.fs.loop, self._get_if_match, name, start, end, version)
        except Exception as e:  # noqa: BLE001
            if precondition_failed(e):
                raise self._changed(name, "ETag", version) from None
            raise

    async def _get_if_match(self, name: str, start: int, end: int, etag: str) -> bytes:
        bucket, key, _ = self.fs.split_path(self.path(name))
        resp = await self.fs._call_s3("get_object", Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}",
                                      IfMatch=f'"{etag}"')
        try:
            return await resp["Body"].read()
        finally:
            resp["Body"].close()

    def writer(self, name: str, size: int | None = None) -> AtomicWriter:
        return S3PartWriter(self, name, size or 0)

    def abort_uploads(self, names: Callable[[str], bool]) -> list[str]:
        return abort_uploads(self, names)

    # Compare-and-swap: PutObject with ``If-None-Match: *`` to create and ``If-Match: <ETag>`` to
    # replace, which S3 (and moto) refuse with 412 when the condition fails; the version is the ETag.

    def conditional_writes(self) -> bool:
        return True

    def put_if(self, name: str, data: bytes, version: str | None) -> str | None:
        bucket, key, _ = self.fs.split_path(self.path(name))
        condition = {"IfNoneMatch": "*"} if version is None else {"IfMatch": f'"{version}"'}

        def put() -> str | None:
            try:
                resp = self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition)
            except Exception as e:  # noqa: BLE001 - s3fs raises botocore's errors as OSErrors
                if _conflict(e):
                    return None
                raise
            return str(resp["ETag"]).strip('"')

        return self._retry(name, "write conditionally", put)

    def read_versioned(self, name: str) -> tuple[bytes, str]:
        bucket, key, _ = self.fs.split_path(self.path(name))

        def get() -> tuple[bytes, str]:
            try:
                resp = self.fs.call_s3("get_object", Bucket=bucket, Key=key)
            except FileNotFoundError:
                raise NotFoundError(f"{self.url(name)}: no such file") from None
            body = resp["Body"]
            try:
                data = sync(self.fs.loop, body.read)
            finally:
                body.close()
            return data, str(resp["ETag"]).strip('"')

        return self._retry(name, "read", get)


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
