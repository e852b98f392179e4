"""Azure Blob Storage (``az://``, ``abfs://``, ``abfss://``): adlfs to list and stat, the Azure SDK
(adlfs's own client) for everything whose semantics graft must hold.

- Writes: ``BlockWriter`` stages each part as a block (several in flight, ``parts.py``) and
  ``commit()`` commits the block list: one request, all or nothing. adlfs's own writer is not used:
  it commits whatever it holds on ``close()``, whatever ``autocommit`` says, so a writer closed by an
  exception or dropped by the garbage collector would publish a truncated blob at the final name.
  ``discard()`` deletes the staged blocks (a blob with no committed content); a killed writer's
  blocks are found with the uncommitted blobs of the listing and deleted (``abort_uploads``).
  Where a committed blob of the name already exists, its staged blocks are left to Azure, which
  drops them at the blob's next commit or after a week; they are never visible.
- Versions: the blob's ETag. Each range read carries ``If-Match: <the ETag planned>``, so a blob
  rewritten during a run fails the read (412) instead of mixing two versions.
- Listings: adlfs caches them and ignores ``refresh``; graft drops the cache before each listing.
- Retries: the SDK retries each request itself, so graft's layer only reads a short answer again.
- Compare-and-swap (``cas.py``): uploads with ``If-None-Match: *`` (create) or ``If-Match: <ETag>``.
"""
from __future__ import annotations

import uuid
from typing import Any, Callable, ClassVar

from fsspec.asyn import sync

from . import parts
from ..errors import NotFoundError
from .atomic import AtomicWriter
from .generic import FsspecStorage
from .parts import PartWriter

__all__ = ["AzureStorage", "BlockWriter"]

MIN_BLOCK = 64 * 2**20
MAX_BLOCKS = 50_000


class AzureStorage(FsspecStorage):
    protocols = ("az", "abfs", "abfss")
    lists_stats: ClassVar[bool] = True
    pins_reads: ClassVar[bool] = True
    min_read_part: ClassVar[int] = 8 << 20
    client_retries: ClassVar[bool] = True

    def _ls_fresh(self) -> list[dict[str, Any]]:
        self.fs.invalidate_cache(self.root)
        return self.fs.ls(self.root, detail=True)

    def _blob(self, name: str) -> Any:
        container, key, _ = self.fs.split_path(self.path(name))
        return self.fs.service_client.get_blob_client(container, key)

    def _run(self, coro_fn: Callable[..., Any], *args: Any) -> Any:
        return sync(self.fs.loop, coro_fn, *args)

    def _fetch(self, name: str, start: int | None, end: int | None, version: str | None) -> bytes:
        if version is None or start is None or end is None:
            return super()._fetch(name, start, end, version)
        from azure.core import MatchConditions
        from azure.core.exceptions import ResourceModifiedError, ResourceNotFoundError

        async def get() -> bytes:
            async with self._blob(name) as bc:
                stream = await bc.download_blob(offset=start, length=end - start, etag=version,
                                                match_condition=MatchConditions.IfNotModified)
                return await stream.readall()

        try:
            return self._run(get)
        except ResourceModifiedError:
            raise self._changed(name, "ETag", version) from None
        except ResourceNotFoundError:
            raise FileNotFoundError(self.path(name)) from None

    def writer(self, name: str, size: int | None = None) -> AtomicWriter:
        return BlockWriter(self, name, size or 0)

    def abort_uploads(self, names: Callable[[str], bool]) -> list[str]:
        """Delete the blobs directly in this directory that hold only staged blocks (what a killed
        writer leaves) and whose name ``names`` accepts."""
        container, key, _ = self.fs.split_path(self.root)
        prefix = f"{key}/" if key else ""

        async def staged_only() -> list[str]:
            client = self.fs.service_client.get_container_client(container)
            every = {b.name async for b in client.list_blobs(name_starts_with=prefix, include=["uncommittedblobs"])}
            committed = {b.name async for b in client.list_blobs(name_starts_with=prefix)}
            return sorted(every - committed)

        aborted = []
        for blob in self._retry("", "list unfinished uploads", lambda: self._run(staged_only)):
            name = blob[len(prefix):]
            if "/" in name or not names(name):
                continue
            self._retry(name, "delete an unfinished upload", lambda n=name: self._run(self._delete_staged, n))
            aborted.append(name)
        return aborted

    async def _delete_staged(self, name: str) -> None:
        from azure.core.exceptions import ResourceNotFoundError

        async with self._blob(name) as bc:
            try:
                await bc.delete_blob()
            except ResourceNotFoundError:
                pass

    # Compare-and-swap: uploads with ``If-None-Match: *`` (409 when the blob exists) or
    # ``If-Match: <ETag>`` (412 when it changed); the version is the ETag.

    def conditional_writes(self) -> bool:
        return True

    def put_if(self, name: str, data: bytes, version: str | None) -> str | None:
        from azure.core import MatchConditions
        from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError

        condition: dict[str, Any] = ({"if_none_match": "*"} if version is None else
                                     {"etag": version, "match_condition": MatchConditions.IfNotModified})

        async def put() -> str | None:
            async with self._blob(name) as bc:
                try:
                    out = await bc.upload_blob(data, overwrite=True, **condition)
                except (ResourceExistsError, ResourceModifiedError, ResourceNotFoundError):
                    return None
            return str(out["etag"]).strip('"')

        return self._retry(name, "write conditionally", lambda: self._run(put))

    def read_versioned(self, name: str) -> tuple[bytes, str]:
        from azure.core.exceptions import ResourceNotFoundError

        async def get() -> tuple[bytes, str]:
            async with self._blob(name) as bc:
                try:
                    stream = await bc.download_blob()
                except ResourceNotFoundError:
                    raise NotFoundError(f"{self.url(name)}: no such file") from None
                return await stream.readall(), str(stream.properties.etag).strip('"')

        return self._retry(name, "read", lambda: self._run(get))


class BlockWriter(PartWriter):
    """A block blob written as staged blocks and published by committing the block list. Blocks of
    at least ``MIN_BLOCK`` (or the az storage options' ``blocksize``)."""

    def __init__(self, storage: AzureStorage, name: str, expected: int):
        floor = storage._fs_options.get("blocksize") or MIN_BLOCK
        super().__init__(storage, name, expected, parts.part_size(expected, int(floor), MAX_BLOCKS, 2**20))
        self._store = storage
        # Block ids must all have one length per blob; a prefix of its own keeps a retried writer's
        # blocks apart from those of one that died.
        self._tag = uuid.uuid4().hex[:12]

    def _upload(self, number: int, body: bytes | bytearray) -> str:
        block = f"{self._tag}-{number:06d}"

        async def stage() -> None:
            async with self._store._blob(self.name) as bc:
                await bc.stage_block(block, bytes(body))

        self._store._run(stage)
        return block

    def _publish(self, blocks: list[Any] | None, whole: bytes) -> None:
        async def publish() -> None:
            async with self._store._blob(self.name) as bc:
                if blocks is None:
                    await bc.upload_blob(whole, overwrite=True)
                else:
                    await bc.commit_block_list(blocks)

        self._store._run(publish)

    def _abort(self) -> None:
        from azure.core.exceptions import ResourceNotFoundError

        async def drop() -> None:
            async with self._store._blob(self.name) as bc:
                try:
                    await bc.get_blob_properties()
                    return  # a committed blob of this name: its staged blocks go at its next commit
                except ResourceNotFoundError:
                    pass
            await self._store._delete_staged(self.name)

        self._store._run(drop)
