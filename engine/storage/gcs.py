"""Google Cloud Storage (``gs://``, ``gcs://``) through gcsfs's JSON-API filesystem.

- Filesystem: ``gcsfs.core.GCSFileSystem`` itself, not the experimental zonal / hierarchical
  layer gcsfs puts in front of it by default (it probes each bucket over gRPC and writes zonal
  buckets' appendable objects, whose commit semantics graft does not test).
- Versions: an object's *generation*, which every rewrite changes. Each range read carries
  ``ifGenerationMatch=<the generation planned>``, so an object rewritten during a run fails the
  read (GCS answers 412) instead of mixing two versions.
- Retries: gcsfs retries each request itself (6 attempts on 5xx, 429 and dropped connections, with
  backoff), so graft's layer only adds what it does not: a short answer read again.
- Writes: ``DeferredCommitWriter`` over a ``GCSFile`` opened with ``autocommit=False``: a resumable
  upload session that only ``commit()`` finalises (one request, atomic), which ``discard()``
  cancels (DELETE on the session), and which a writer dropped unclosed never finalises. The file
  is built directly rather than through ``fs.open``, which would keep every such writer alive in
  the filesystem's transaction list. A session left by a killed worker cannot be listed; GCS
  deletes it after a week, and nothing of it is ever visible.
- Compare-and-swap (``cas.py``): uploads with ``ifGenerationMatch`` (``0``: only if absent).
"""
from __future__ import annotations

from typing import Any, ClassVar, Mapping
from urllib.parse import quote

from ..errors import NotFoundError
from .atomic import AtomicWriter
from .generic import FsspecStorage
from .writers import DeferredCommitWriter

__all__ = ["GCSStorage"]

# Bytes a GCS writer buffers before it sends them to its upload session (a multiple of the 256 KiB
# GCS requires of every chunk but the last), unless the gs storage options set ``block_size``.
WRITE_BLOCK = 16 * 2**20


class GCSStorage(FsspecStorage):
    protocols = ("gs", "gcs")
    lists_stats: ClassVar[bool] = True
    pins_reads: ClassVar[bool] = True
    # Billed and throttled per request like S3: parts of at least 8 MiB.
    min_read_part: ClassVar[int] = 8 << 20
    client_retries: ClassVar[bool] = True

    def _filesystem(self, opts: dict[str, Any]) -> tuple[Any, str]:
        from gcsfs.core import GCSFileSystem

        fs = GCSFileSystem(**opts)
        return fs, fs._strip_protocol(self.uri)

    def _version(self, info: Mapping[str, Any]) -> Any:
        return info.get("generation")

    def _fetch(self, name: str, start: int | None, end: int | None, version: str | None) -> bytes:
        if version is None:
            return super()._fetch(name, start, end, version)
        headers = {"Range": f"bytes={start or 0}-{end - 1}"} if end is not None else (
            {"Range": f"bytes={start}-"} if start else {})
        try:
            _, data = self.fs.call("GET", self.fs.url(self.path(name)), headers=headers,
                                   ifGenerationMatch=version)
        except FileExistsError:  # gcsfs's name for a 412: the generation is not the one planned
            raise self._changed(name, "generation", version) from None
        return data

    def writer(self, name: str, size: int | None = None) -> AtomicWriter:
        from gcsfs.core import GCSFile

        block = int(self._fs_options.get("block_size") or WRITE_BLOCK)
        return DeferredCommitWriter(self, name, lambda path: GCSFile(
            self.fs, path, mode="wb", autocommit=False, block_size=block))

    # Compare-and-swap: a one-request upload with ``ifGenerationMatch`` (0: the object must not
    # exist); GCS refuses it with 412 when the condition fails. The version is the generation.

    def conditional_writes(self) -> bool:
        return True

    def put_if(self, name: str, data: bytes, version: str | None) -> str | None:
        bucket, key, _ = self.fs.split_path(self.path(name))
        url = f"{self.fs._location}/upload/storage/v1/b/{quote(bucket)}/o"

        def put() -> str | None:
            try:
                out = self.fs.call("POST", url, uploadType="media", name=key, ifGenerationMatch=version or "0",
                                   data=data, headers={"Content-Type": "application/octet-stream"},
                                   json_out=True)
            except FileExistsError:  # 412
                return None
            return str(out["generation"])

        return self._retry(name, "write conditionally", put)

    def read_versioned(self, name: str) -> tuple[bytes, str]:
        def get() -> tuple[bytes, str]:
            try:
                headers, data = self.fs.call("GET", self.fs.url(self.path(name)))
            except FileNotFoundError:
                raise NotFoundError(f"{self.url(name)}: no such file") from None
            return data, str(headers["x-goog-generation"])

        return self._retry(name, "read", get)
