"""Local disk (plain paths and ``file://``): one attempt per call, ``preadv`` reads, atomic files.

The same ``Storage`` face and the same ``read``/``stat``/``list`` code as remote stores; only the
innermost primitives differ (``LocalRangeReader``, ``LocalAtomicWriter``), so the code path tested
on local files is the one users run everywhere.
"""
from __future__ import annotations

import os
import stat as stat_mode
from typing import Any, ClassVar, Mapping

from . import local_cas
from .atomic import AtomicWriter
from .base import FileStat, Storage
from .readers import LocalRangeReader, RangeReader
from .writers import LocalAtomicWriter

__all__ = ["LocalStorage"]


class LocalStorage(Storage):
    protocols = ("file", "local")
    is_local: ClassVar[bool] = True
    lists_stats: ClassVar[bool] = True
    _space: ClassVar[str] = "disk"

    def _attempts(self) -> int:
        return 1  # the OS retries for local files

    def _version(self, info: Mapping[str, Any]) -> Any:
        # Local files have no ETag. A rewrite changes the size or the modification time, but `cp -p`
        # and `rsync -a` restore the old mtime: the inode's change time (which no tool can set back)
        # and the size catch those too.
        if "mtime_ns" not in info:
            return super()._version(info)
        return f"size:{info['size']},mtime:{info['mtime_ns']},ctime:{info['ctime_ns']}"

    # Stats and listings follow symbolic links: in the Hugging Face cache every file of a snapshot is
    # a relative link to ``../../blobs/<sha256>``, and what graft reads (and must pin) is the blob.
    # fsspec's listing describes the link itself (its own mtime, type "other"), its ``info`` the blob.

    def _stat_once(self, name: str) -> FileStat:
        return self._stat_of(name, _followed(self.path(name)))

    def _ls_fresh(self) -> list[dict[str, Any]]:
        entries = []
        with os.scandir(self.root) as it:
            for entry in it:
                try:
                    entries.append(_followed(entry.path))
                except FileNotFoundError:
                    continue  # a dangling link (an unfinished download) is no file
        return entries

    def reader(self, name: str, concurrency: int = 1, version: str | None = None) -> RangeReader:
        return LocalRangeReader(self, name)

    def writer(self, name: str, size: int | None = None) -> AtomicWriter:
        return LocalAtomicWriter(self, name)

    def conditional_writes(self) -> bool:
        return local_cas.hard_links(self.root)

    def put_if(self, name: str, data: bytes, version: str | None) -> str | None:
        try:
            if version is None:
                return local_cas.create(self, name, data)
            return local_cas.replace(self, name, data, version)
        except OSError as e:
            raise self._write_failed(name, "create" if version is None else "replace", e) from e

    def read_versioned(self, name: str) -> tuple[bytes, str]:
        try:
            return local_cas.read(self, name)
        except OSError as e:
            raise self._fail(name, "read", e) from e


def _followed(path: str) -> dict[str, Any]:
    """What graft needs of the file at ``path``, through any symbolic links; ``FileNotFoundError``
    when there is none (or the link dangles)."""
    st = os.stat(path)  # follows links
    kind = "directory" if stat_mode.S_ISDIR(st.st_mode) else "file"
    return {"name": path, "type": kind, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns}
